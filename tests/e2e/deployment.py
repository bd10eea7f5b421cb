"""Real Flower Deployment Engine processes on loopback: a SuperLink, SuperNodes that
each serve one site config, and `flwr run` of this project's app against them.

Each process gets its own FLWR_HOME and log file under the test's folder; everything
is stopped (SIGTERM, then SIGKILL) when the context exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def _executable(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


@dataclass
class Deployment:
    root: Path
    superlink_port: int = field(default_factory=free_port)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _environment(self, home: str) -> dict[str, str]:
        flwr_home = self.root / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}:{os.environ['PATH']}"}

    def _start(self, name: str, command: Sequence[str]) -> None:
        log = (self.root / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(f"home-{name}"),
            start_new_session=True,
        )
        self.processes.append((name, process))

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [
                _executable("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--port",
                str(self.superlink_port),
                "--database",
                str(self.root / "superlink.db"),
            ],
        )
        wait_for_port(self.superlink_port)

    def start_supernode(self, name: str, site_config: Path) -> None:
        self._start(
            name,
            [
                _executable("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.superlink_port}",
                "--port",
                str(free_port()),
                "--node-config",
                f'site-config="{site_config}"',
            ],
        )

    def run(
        self, run_config: dict[str, str], timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """`flwr run` of this project against the SuperLink, streaming its logs."""
        environment = self._environment("home-cli")
        (Path(environment["FLWR_HOME"]) / "config.toml").write_text(
            '[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n'
        )
        overrides = " ".join(f'{key}="{value}"' for key, value in run_config.items())
        return subprocess.run(
            [
                _executable("flwr"),
                "run",
                str(PROJECT_ROOT),
                "e2e",
                "--stream",
                "--run-config",
                overrides,
            ],
            capture_output=True,
            text=True,
            env=environment,
            timeout=timeout,
            check=False,
        )

    def logs(self) -> str:
        """The tail of every process's log, for a failing test's message."""
        return "\n".join(
            f"--- {name} ---\n" + (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
            for name, _ in self.processes
        )

    def stop(self) -> None:
        for _, process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def deployment(root: Path) -> Iterator[Deployment]:
    running = Deployment(root)
    try:
        yield running
    finally:
        running.stop()
