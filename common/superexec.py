"""The SuperExec side of Flower's process isolation, as both the coordinator and the
sites run it.

fedlora starts ``flower-superlink`` and ``flower-supernode`` with ``--isolation process``:
they then start no app process themselves, and serve the app runs as tasks on their
Runtime API (loopback only). A ``flower-superexec`` process that fedlora starts beside
each daemon takes those tasks and runs them. Both ends hold the same shared secret, so
the Runtime API serves only that SuperExec: another local process that reaches the
port cannot take a task, push messages or read the run's objects. Flower ignores the
secret in ``subprocess`` isolation, which is why fedlora does not use that mode.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from common.files import PRIVATE_FILE_MODE, write_private_file
from common.processes import executable

SECRET_FILE = "superexec.secret"
SECRET_BYTES = 32


def ensure_secret(state_dir: Path) -> Path:
    """The daemon's SuperExec secret (made on first use, mode 0600, never sent anywhere).

    Kept in the daemon's own state directory; a file readable by others is refused,
    since whoever reads it can act as the SuperExec."""
    path = state_dir / SECRET_FILE
    if not path.exists():
        write_private_file(path, secrets.token_hex(SECRET_BYTES).encode("ascii"))
    mode = path.stat().st_mode & 0o777
    if mode & ~PRIVATE_FILE_MODE:
        raise PermissionError(
            f"{path} is readable by others (mode {mode:o}): chmod 600 it, or delete it "
            "to have a new one made"
        )
    return path


def superexec_command(
    runtime_address: str,
    secret: Path,
    root_certificates: Path | None = None,
    program: str = "flower-superexec",
) -> list[str]:
    """``program`` (Flower's ``flower-superexec``, or the site's ``fedlora-superexec``
    built on it) for the Runtime API at ``runtime_address`` (loopback), authenticated
    by ``secret``; over TLS pinned to ``root_certificates`` when given.

    No runtime dependency installation: nothing is downloaded while a run starts."""
    command = [
        executable(program),
        "--runtime-api-address",
        runtime_address,
        "--superexec-auth-secret-file",
        str(secret),
    ]
    if root_certificates is None:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", str(root_certificates)]


def run_flower_superexec(
    task_type: str, command: str | None = None, executor: object | None = None
) -> None:
    """Flower's ``flower-superexec`` (arguments from ``sys.argv``), narrowed: it takes
    tasks of ``task_type`` only (``"SERVER_APP"`` at the coordinator, ``"CLIENT_APP"`` at a
    site; Flower's default takes every type, agent, model and connector tasks included,
    which would run a bundle's code or call outside services), and starts ``command``
    for them instead of Flower's own process when given. With ``executor`` (an object
    with the methods of Flower's ``Executor``) tasks go to it instead of Flower's
    subprocess executor. All three are attributes of Flower modules (checked by
    tests/unit/common/test_superexec.py against the pinned Flower, so an upgrade that
    moves them fails the tests, not a deployment)."""
    import sys

    from flwr.supercore import constant
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec.plugin import base_exec_plugin

    wanted = constant.TaskType[task_type]
    if command is not None:
        constant.TASK_TYPE_TO_COMMAND[wanted] = command
    if executor is not None:
        from flwr.supercore.superexec import run_superexec as loop

        loop.get_executor = lambda *args, **kwargs: executor  # type: ignore[assignment]
    base_exec_plugin.AutoExecPlugin.supported_task_types = frozenset({wanted})
    sys.argv[0] = "flower-superexec"
    flower_superexec()


def server_superexec_main() -> None:
    """``fedlora-server-superexec``: the coordinator's SuperExec, ServerApp tasks only."""
    run_flower_superexec("SERVER_APP")
