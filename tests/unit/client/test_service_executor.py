"""The site's ClientApp service runs tasks in its own process, a few at a time."""

from __future__ import annotations

import threading

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from client.service_executor import InProcessExecutor


def _spec(task_id: int) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:9094",
        token=f"token-{task_id}",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=False,
        task_id=task_id,
    )


def test_tasks_run_in_this_process_and_capacity_is_bounded() -> None:
    release = threading.Event()
    seen: list[tuple[str, str, bool, bytes | None]] = []
    threads: list[threading.Thread] = []

    def run_task(address: str, token: str, insecure: bool, certificates: bytes | None) -> int:
        seen.append((address, token, insecure, certificates))
        threads.append(threading.current_thread())
        release.wait(5)
        return 0

    executor = InProcessExecutor(run_task, max_tasks=2)
    wanted = {TaskType.CLIENT_APP}
    assert executor.get_eligible_capacity(wanted) == (wanted, set())
    assert executor.launch(_spec(1)).status == LaunchResultStatus.ACCEPTED
    assert executor.launch(_spec(2)).status == LaunchResultStatus.ACCEPTED
    assert executor.get_eligible_capacity(wanted) == (set(), set())
    assert executor.launch(_spec(3)).status == LaunchResultStatus.CAPACITY_REJECTED
    release.set()
    executor.close()
    assert executor.get_eligible_capacity(wanted) == (wanted, set())
    assert sorted(token for _, token, _, _ in seen) == ["token-1", "token-2"]
    assert all(t is not threading.main_thread() for t in threads)


def test_a_task_that_raises_does_not_stop_the_service(caplog: pytest.LogCaptureFixture) -> None:
    def run_task(*_: object) -> int:
        raise RuntimeError("boom")

    executor = InProcessExecutor(run_task)
    assert executor.launch(_spec(1)).status == LaunchResultStatus.ACCEPTED
    executor.close()
    assert "failed outside the ClientApp" in caplog.text
    assert executor.launch(_spec(2)).status == LaunchResultStatus.ACCEPTED
    executor.close()


def test_the_site_superexec_puts_the_executor_in_flowers_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    from flwr.supercore import constant
    from flwr.supercore.superexec.plugin import base_exec_plugin

    from client import launcher

    plugin = base_exec_plugin.AutoExecPlugin
    monkeypatch.setattr(plugin, "supported_task_types", plugin.supported_task_types)
    client_app = constant.TaskType.CLIENT_APP
    monkeypatch.setitem(
        constant.TASK_TYPE_TO_COMMAND, client_app, constant.TASK_TYPE_TO_COMMAND[client_app]
    )
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    flower_superexec = importlib.import_module("flwr.supercore.cli.flower_superexec")
    used: list[object] = []
    monkeypatch.setattr(loop, "get_executor", loop.get_executor)
    monkeypatch.setattr(
        flower_superexec, "flower_superexec", lambda: used.append(loop.get_executor("subprocess"))
    )
    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/usr/bin/true")
    monkeypatch.setattr("sys.argv", ["fedlora-superexec", "--insecure"])
    launcher.superexec_main()
    assert isinstance(used[0], InProcessExecutor)
    assert plugin.supported_task_types == frozenset({client_app})
