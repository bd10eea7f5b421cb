"""common/superexec.py: the SuperExec secret, and the Flower attributes fedlora's
narrowed SuperExecs set (they must still exist in the pinned Flower)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from common import superexec
from common.superexec import ensure_secret


def test_the_secret_is_made_once_private(tmp_path: Path) -> None:
    path = ensure_secret(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(first) == 2 * superexec.SECRET_BYTES
    assert ensure_secret(tmp_path).read_bytes() == first


def test_a_secret_others_can_read_is_refused(tmp_path: Path) -> None:
    path = ensure_secret(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        ensure_secret(tmp_path)


def test_a_narrowed_superexec_takes_one_task_type(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from flwr.supercore import constant
    from flwr.supercore.superexec.plugin import base_exec_plugin

    flower_superexec = importlib.import_module("flwr.supercore.cli.flower_superexec")
    started: list[str] = []
    monkeypatch.setattr(flower_superexec, "flower_superexec", lambda: started.append("yes"))
    monkeypatch.setattr(base_exec_plugin.AutoExecPlugin, "supported_task_types", frozenset())
    monkeypatch.setitem(constant.TASK_TYPE_TO_COMMAND, constant.TaskType.SERVER_APP, "x")
    monkeypatch.setattr(sys, "argv", ["fedlora-server-superexec", "--insecure"])

    superexec.server_superexec_main()

    assert started == ["yes"]
    assert base_exec_plugin.AutoExecPlugin.supported_task_types == frozenset(
        {constant.TaskType.SERVER_APP}
    )
    assert constant.TASK_TYPE_TO_COMMAND[constant.TaskType.SERVER_APP] == "x"  # unchanged
    assert sys.argv == ["flower-superexec", "--insecure"]
