"""common/processes.run_daemon with small Python children: output to the log and to
``on_line``, the exit code, nothing left running after the daemon, and a clean stop on
SIGTERM / SIGINT with the previous signal handlers back in place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from common import processes
from common.processes import run_daemon

PYTHON = [sys.executable, "-S", "-c"]


def _python(source: str) -> list[str]:
    return [*PYTHON, source]


def _gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` no longer runs (exited, or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def guarded_signals() -> Iterator[list[int]]:
    """Handlers of our own for SIGTERM and SIGINT during the test: run_daemon must put
    them back, and a signal it failed to catch is recorded instead of ending pytest."""
    caught: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------- output ---


def test_output_reaches_the_log_and_on_line(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "daemon.log"
    log.parent.mkdir()
    log.write_text("earlier run\n")
    lines: list[str] = []
    source = (
        "import os, sys\n"
        "print('first', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "print('mark=' + os.environ['FEDLORA_TEST_MARK'], flush=True)\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    environment = {**os.environ, "FEDLORA_TEST_MARK": "42"}

    code = run_daemon(_python(source), log, environment, on_line=lines.append)

    assert code == 0
    assert lines == ["first", "to stderr", "mark=42", "no newline at the end"]
    assert log.read_text() == "earlier run\nfirst\nto stderr\nmark=42\nno newline at the end"


def test_the_log_folder_is_created(tmp_path: Path) -> None:
    log = tmp_path / "a" / "b" / "daemon.log"
    assert run_daemon(_python("print('hello')"), log, dict(os.environ)) == 0
    assert log.read_text() == "hello\n"


@pytest.mark.parametrize("code", [0, 1, 3, 77])
def test_the_exit_code_is_returned(tmp_path: Path, code: int) -> None:
    source = f"import sys; print('bye'); sys.exit({code})"
    assert run_daemon(_python(source), tmp_path / "log", dict(os.environ)) == code


def test_a_child_killed_by_a_signal_is_not_a_clean_exit(tmp_path: Path) -> None:
    source = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run_daemon(_python(source), tmp_path / "log", dict(os.environ)) == -signal.SIGKILL


def test_started_gets_the_running_process(tmp_path: Path) -> None:
    seen: list[subprocess.Popen[str]] = []
    code = run_daemon(
        _python("print('x')"), tmp_path / "log", dict(os.environ), started=seen.append
    )
    assert code == 0
    assert len(seen) == 1
    assert seen[0].returncode == 0  # reaped by the time run_daemon returns


# -------------------------------------------------------------- what it started ---


def test_a_grandchild_holding_stdout_does_not_hang_the_daemon(tmp_path: Path) -> None:
    """The daemon starts a process that inherits its stdout and exits: the pipe stays
    open, but run_daemon returns, and takes the grandchild with it."""
    source = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-S', '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', child.pid, flush=True)\n"
    )
    lines: list[str] = []
    began = time.monotonic()

    code = run_daemon(_python(source), tmp_path / "log", dict(os.environ), on_line=lines.append)

    elapsed = time.monotonic() - began
    assert code == 0
    assert elapsed < processes.STOP_GRACE_SECONDS / 2, elapsed
    (line,) = lines
    pid = int(line.split()[1])
    assert _gone(pid), f"grandchild {pid} still runs"


# ----------------------------------------------------------------------- stops ---


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_child_and_returns_zero(
    tmp_path: Path, guarded_signals: list[int], signum: signal.Signals
) -> None:
    ours = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    children: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("ready"):
            children.append(int(line.split()[1]))
            threading.Timer(0.2, os.kill, (os.getpid(), signum)).start()

    source = (
        "import os, subprocess, sys, time\n"
        "helper = subprocess.Popen([sys.executable, '-S', '-c', 'import time; time.sleep(60)'])\n"
        "print('ready', os.getpid(), helper.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    began = time.monotonic()

    code = run_daemon(_python(source), tmp_path / "log", dict(os.environ), on_line=on_line)

    elapsed = time.monotonic() - began
    assert code == 0
    assert elapsed < 10, elapsed
    assert guarded_signals == []  # run_daemon caught the signal itself
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == ours
    (child,) = children
    assert _gone(child)
    helper = int((tmp_path / "log").read_text().split()[2])
    assert _gone(helper), "what the daemon started must stop with it"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, guarded_signals: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "STOP_GRACE_SECONDS", 1.0)
    source = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    def on_line(line: str) -> None:
        if line == "ready":
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()

    began = time.monotonic()
    code = run_daemon(_python(source), tmp_path / "log", dict(os.environ), on_line=on_line)
    assert code == 0
    assert time.monotonic() - began < 10
    assert guarded_signals == []


def test_handlers_are_restored_after_a_normal_exit(
    tmp_path: Path, guarded_signals: list[int]
) -> None:
    ours = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert run_daemon(_python("pass"), tmp_path / "log", dict(os.environ)) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == ours
