"""Flower's daemons run under fedlora's commands: prepared arguments, a known log file,
and clean stops. The child gets its own process group, so a SIGTERM to the command (as
systemd sends) reaches the daemon and everything it started (ClientApp and ServerApp
processes, where the daemon did not give them a session of their own), and nothing
is left running."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

from common.errors import ConfigError

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20.0


def executable(name: str) -> str:
    """A Flower command from this environment first (a site may have several Pythons)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed in this environment (pip install flwr)")
    return found


def flower_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: this environment's commands first on PATH
    (the SuperLink starts ``flower-superexec`` by name)."""
    here = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra or {}),
    }


def run_daemon(
    command: Sequence[str],
    log_file: Path,
    environment: Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
    started: Callable[[subprocess.Popen[str]], None] | None = None,
) -> int:
    """Run ``command`` until it exits or this process is asked to stop; every output
    line goes to ``log_file`` (appended) and to ``on_line``. Returns the exit code, 0
    when stopped by SIGTERM or SIGINT. The command's process group goes with it (Flower
    daemons stop the app processes they start in their own sessions themselves)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    stop_requested: list[float] = []
    running: list[subprocess.Popen[str]] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s: stopping %s", signal.Signals(signum).name, Path(command[0]).name)
        stop_requested.append(time.monotonic())
        for child in running:
            _signal_group(child, signal.SIGTERM)

    def pump() -> None:
        process = running[0]
        with log_file.open("a", encoding="utf-8") as log:
            assert process.stdout is not None
            for line in process.stdout:
                try:
                    log.write(line)
                    log.flush()
                except OSError:  # a full disk must not stop draining the pipe
                    logger.exception("could not write to %s", log_file)
                if on_line is not None:
                    try:
                        on_line(line.rstrip("\n"))
                    except Exception:  # a display problem must not stop draining the pipe
                        logger.exception("could not show a line of %s", Path(command[0]).name)

    reader = threading.Thread(target=pump, name="daemon-output", daemon=True)
    # Handlers first: a stop request that comes while the daemon starts still reaches it.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=dict(environment),
            start_new_session=True,
        )
        running.append(process)
        if stop_requested:
            _signal_group(process, signal.SIGTERM)
        reader.start()
        if started is not None:
            started(process)
        while True:
            try:
                code = process.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                if stop_requested and time.monotonic() - stop_requested[0] > STOP_GRACE_SECONDS:
                    _signal_group(process, signal.SIGKILL)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for leftover in running:  # what is left of the daemon's group goes with it
            _signal_group(leftover, signal.SIGTERM)
            reader.join(timeout=STOP_GRACE_SECONDS)
            if reader.is_alive():
                _signal_group(leftover, signal.SIGKILL)
                reader.join(timeout=5)
            if leftover.poll() is None:
                leftover.kill()
                leftover.wait()
    return 0 if stop_requested else code


def _signal_group(process: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
