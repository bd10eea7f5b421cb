"""A run as its coordinator's audit log tells it: the run's start and end, the sites that
joined, what became of each update, the accuracy, loss and ε per round, the rollbacks.

Read from the entries alone, never from summary files an operator could edit; an entry
without the expected shape (a tampered log, which verification flags) is left out, so
the report still shows what can be read.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.audit.log import read_entries
from common.audit.review import real_number

MAX_ROUNDS_SHOWN = 10_000


@dataclass
class TaskRun:
    """What one coordinator log says about its run."""

    log: Path
    started: dict[str, Any] = field(default_factory=dict)
    finished: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    epsilon: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    participation: dict[str, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task(self) -> str:
        return str(self.started.get("task", self.log.stem))

    @property
    def rounds(self) -> list[int]:
        planned = self.started.get("planned_rounds")
        planned = planned if isinstance(planned, int) and 0 < planned <= MAX_ROUNDS_SHOWN else 0
        seen = {r for marks in self.participation.values() for r in marks}
        return sorted(set(range(1, planned + 1)) | seen | set(self.accuracy))


def _round(data: dict[str, Any]) -> int | None:
    value = data.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_task_run(log: Path) -> TaskRun:
    return task_run(log, read_entries(log))


def task_run(log: Path, entries: list[dict[str, Any]]) -> TaskRun:
    """The run as its coordinator log's entries tell it. Entries that do not have the
    expected shape (a tampered log, which verification flags) are left out, never fatal."""
    run = TaskRun(log)
    for entry in entries:
        event, data = entry.get("event"), entry.get("data")
        if not isinstance(data, dict):
            continue
        server_round, site = _round(data), data.get("site")
        if event == "run-started":
            run.started = data
        elif event == "site-joined" and isinstance(site, str):
            run.sites[site] = data
        elif event == "update-received" and isinstance(site, str) and server_round is not None:
            run.participation[site][server_round] = str(data.get("status"))
            # The site's lifetime ε as it reported it: spent even when the update was
            # rejected, since the site trained.
            epsilon = real_number(data.get("epsilon"))
            if epsilon is not None:
                run.epsilon[site][server_round] = epsilon
        elif (
            event in ("site-refused", "site-excluded")
            and data.get("phase") == "train"
            and isinstance(site, str)
            and server_round is not None
        ):
            run.participation[site][server_round] = str(data.get("status"))
        elif event == "evaluation" and server_round is not None:
            accuracy, loss = real_number(data.get("accuracy")), real_number(data.get("loss"))
            if accuracy is not None and loss is not None:
                run.accuracy[server_round], run.loss[server_round] = accuracy, loss
        elif event == "rolled-back":
            run.rollbacks.append(data)
        elif event == "run-finished":
            run.finished = data
        elif event == "run-failed":
            run.failed = data
    return run
