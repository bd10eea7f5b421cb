"""The site's long-lived ClientApp service: Flower's SuperExec loop, with each
ClientApp task run in a thread of the SuperExec's own process.

Flower's SuperExec starts a fresh process for every task (``flwr-clientapp``, or the
site's ``fedlora-clientapp``), so nothing a task loaded survives it: every message
would read the site's data and base model again. The site's ``fedlora-superexec``
instead runs each task here, through the same launcher (client/launcher.py: the
pinned-release check, then the site's installed ``client.app``), so the ClientApp's
one Site per site (client/service.py) lives as long as the daemon. Tasks of one site
take turns on its data and model (``Site.lock``); an introduction does not wait.

It implements Flower's executor interface (``flwr.supercore.superexec.executor.
Executor``); common/superexec.py puts it in place of Flower's subprocess executor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

MAX_TASKS = 4
"""Tasks in flight at once (one site's rounds take turns; introductions need not)."""

TaskRunner = Callable[[str, str, bool, bytes | None], int]
"""(Runtime API address, task token, insecure, root certificates) -> exit code."""


class InProcessExecutor:
    """Runs each task in a thread of this process (see the module docstring)."""

    def __init__(self, run_task: TaskRunner, max_tasks: int = MAX_TASKS) -> None:
        self._run_task = run_task
        self.max_tasks = max_tasks
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self.launched = 0

    def _active(self) -> int:
        with self._lock:
            self._threads = {thread for thread in self._threads if thread.is_alive()}
            return len(self._threads)

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        """Every supported task type while a thread is free; none when all are busy."""
        free = self._active() < self.max_tasks
        return (set(supported_task_types) if free else set()), set()

    def wait_for_capacity(self, task_type: Any = None, **_: Any) -> None:
        while self._active() >= self.max_tasks:
            time.sleep(0.2)

    def launch(self, spec: Any) -> Any:
        """Start the task's thread; Flower's LaunchResult says it was accepted."""
        from flwr.supercore.superexec.executor import LaunchResult
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        if self._active() >= self.max_tasks:
            return LaunchResult.capacity_rejected("every task thread is busy")
        certificates = validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        )
        thread = threading.Thread(
            target=self._run,
            args=(spec.runtime_api_address, spec.token, spec.insecure, certificates),
            name=f"clientapp-task-{spec.task_id}",
            daemon=True,
        )
        with self._lock:
            self._threads.add(thread)
            self.launched += 1
        thread.start()
        return LaunchResult.accepted()

    def _run(self, address: str, token: str, insecure: bool, certificates: bytes | None) -> None:
        try:
            code = self._run_task(address, token, insecure, certificates)
        except Exception:  # the task's own errors are replied; this is a launcher fault
            logger.exception("a ClientApp task failed outside the ClientApp")
            return
        if code != 0:
            logger.info("a ClientApp task ended with an error reply (code %d)", code)

    def reconcile(self) -> None:
        self._active()

    def close(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5.0)
