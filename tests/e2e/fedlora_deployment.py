"""A deployment stood up with fedlora's own commands on loopback: `fedlora pki`,
`fedlora coordinator start|run` and one `fedlora site run` per site, each a real
process (with its real flower-superlink / flower-supernode child) and its own log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.deployment import BIN, free_port

FEDLORA = str(BIN / "fedlora")


def fedlora(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDLORA, *arguments], capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout:g} s for {what}")


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in found.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


@dataclass
class FedloraDeployment:
    root: Path
    certs: Path
    port: int = field(default_factory=free_port)
    superlink_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "coordinator"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, arguments: Sequence[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [FEDLORA, *arguments],
            stdout=self.log(name).open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_coordinator(self) -> None:
        self.start(
            "coordinator",
            [
                "coordinator",
                "start",
                "--certs",
                str(self.certs),
                "--state-dir",
                str(self.state_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--superlink-port",
                str(self.superlink_port),
            ],
        )
        wait_until(
            lambda: "site(s) registered" in self.log("coordinator").read_text(errors="replace"),
            90,
            "the SuperLink to start and register the sites:\n" + self.tail("coordinator"),
        )

    def start_site(self, name: str, config: Path, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(
            name, ["site", "run", str(config), "--local-port", str(free_port()), *extra]
        )

    def online_nodes(self) -> int:
        """SuperNodes the SuperLink counts as online (`flwr supernode list`)."""
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "fedlora", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "FLWR_HOME": str(self.state_dir / "flwr-home")},
        )
        try:
            nodes = json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def superlink_log(self) -> str:
        path = self.state_dir / "superlink.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        parts = [f"--- {name} ---\n{self.tail(name)}" for name in self.processes]
        return "\n".join([*parts, "--- superlink.log ---\n" + self.superlink_log()[-4000:]])

    def kill_children(self, name: str) -> list[int]:
        """SIGKILL the Flower daemons a fedlora command runs (the SuperNode and its
        SuperExec; the SuperLink, its SuperExec and nginx), with all they started, as
        a crash of the machine's Flower side would."""
        daemons = children(self.processes[name].pid)
        for daemon in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon, signal.SIGKILL)
        return daemons

    def stop(self, name: str, timeout: float = 60) -> int:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(process)
            raise

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        for child in children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill(process)
