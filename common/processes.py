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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType

from common.errors import ConfigError
from common.offline import OFFLINE_ENVIRONMENT

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20.0


def executable(name: str) -> str:
    """A Flower command from this environment first (a site may have several Pythons)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed in this environment (pip install flwr)")
    return found


PERIMETER_ENVIRONMENT = MappingProxyType(
    {
        # flwr/superlink/cli/flower_superlink.py: "1" also starts Flower's legacy gRPC
        # Control and Fleet APIs, on 0.0.0.0 (every interface, past nginx).
        "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
        "FLWR_INTERNAL_GRPC_FLEET_API": "0",
    }
)
"""Switches of Flower's that would open a port beside the perimeter: forced off."""


def flower_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: this environment's commands first on PATH
    (the SuperLink starts ``flower-superexec`` by name), and telemetry, update checks and
    Flower's extra listeners off, explicitly: Flower's commands import flwr (which reads
    its switches at import) before any fedlora code, and the switches win over ``extra``
    and over whatever ``os.environ`` was changed to since fedlora set them."""
    here = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra or {}),
        **OFFLINE_ENVIRONMENT,
        **PERIMETER_ENVIRONMENT,
    }


@dataclass(frozen=True)
class Daemon:
    """One long-lived process of a group: its command, its log (appended) and what sees
    each of its output lines."""

    command: Sequence[str]
    log_file: Path
    on_line: Callable[[str], None] | None = None

    @property
    def name(self) -> str:
        return Path(self.command[0]).name


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
    return run_daemons(
        [Daemon(command, log_file, on_line)],
        environment,
        started=None if started is None else (lambda running: started(running[0])),
    )


def run_daemons(
    daemons: Sequence[Daemon],
    environment: Mapping[str, str],
    started: Callable[[list[subprocess.Popen[str]]], None] | None = None,
) -> int:
    """Run the ``daemons`` together, as one service: until one of them exits or this
    process is asked to stop, then stop them all. Returns the exit code of the first
    to exit (a daemon of the group that ends takes the service down with it), 0 when
    stopped by SIGTERM or SIGINT. ``started`` gets the processes, in order, once all
    are started (a failure it raises stops them all)."""
    stop_requested: list[float] = []
    running: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        names = ", ".join(daemon.name for daemon in daemons)
        logger.info("received %s: stopping %s", signal.Signals(signum).name, names)
        stop_requested.append(time.monotonic())
        for child in running:
            _signal_group(child, signal.SIGTERM)

    # Handlers first: a stop request that comes while the daemons start still reaches them.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for daemon in daemons:
            daemon.log_file.parent.mkdir(parents=True, exist_ok=True)
            process = subprocess.Popen(
                list(daemon.command),
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
            reader = threading.Thread(
                target=_pump, args=(process, daemon), name="daemon-output", daemon=True
            )
            reader.start()
            readers.append(reader)
        if started is not None and not stop_requested:
            started(list(running))
        code = _wait_for_first(running, stop_requested)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop_group(running, readers)
    return 0 if stop_requested else code


def _wait_for_first(running: list[subprocess.Popen[str]], stop_requested: list[float]) -> int:
    """The exit code of the first process to exit; past the grace period after a stop
    request, what still runs is killed."""
    while True:
        for process in running:
            code = process.poll()
            if code is not None:
                return code
        if stop_requested and time.monotonic() - stop_requested[0] > STOP_GRACE_SECONDS:
            for process in running:
                _signal_group(process, signal.SIGKILL)
        time.sleep(0.2)


def _pump(process: subprocess.Popen[str], daemon: Daemon) -> None:
    with daemon.log_file.open("a", encoding="utf-8") as log:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                log.write(line)
                log.flush()
            except OSError:  # a full disk must not stop draining the pipe
                logger.exception("could not write to %s", daemon.log_file)
            if daemon.on_line is not None:
                try:
                    daemon.on_line(line.rstrip("\n"))
                except Exception:  # a display problem must not stop draining the pipe
                    logger.exception("could not show a line of %s", daemon.name)


def _stop_group(running: list[subprocess.Popen[str]], readers: list[threading.Thread]) -> None:
    """What is left of each daemon's process group goes with it: SIGTERM, then SIGKILL
    for what has not let go of its output pipe within the grace period."""
    for leftover in running:
        _signal_group(leftover, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for leftover, reader in zip(running, readers, strict=False):
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
        if reader.is_alive():
            _signal_group(leftover, signal.SIGKILL)
            reader.join(timeout=5)
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def _signal_group(process: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
