"""A task's progress, read from the coordinator's audit log as the ServerApp writes it.

``fedlora coordinator run`` follows ``RUN_DIR/audit/coordinator-<task>.jsonl`` (read
only, never locked) instead of the ServerApp's streamed log text: the audit log is the
structured, append-only record of every round. ``AuditLogFollower`` hands back the
entries appended since it last looked, ``advance`` folds them into a ``TaskProgress``
and ``describe`` says it in one line; ``follow_progress`` does this about once a second
in a background thread while a run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
"""Seconds between two looks at the audit log."""


class AuditLogFollower:
    """Reads a JSON-lines log from where it stopped last time. Only complete lines
    count: a line still being written is left for the next poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def poll(self) -> list[dict[str, Any]]:
        """The entries appended since the last poll (none while the file is missing).
        A line that is not a JSON object is skipped with a debug message."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() < self.offset:  # replaced by a shorter file: start over
                    logger.debug("%s shrank; reading it again from its start", self.path)
                    self.offset = 0
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.debug("cannot read %s yet: %s", self.path, exc)
            return []
        complete, newline, _ = chunk.rpartition(b"\n")
        if not newline:
            return []
        self.offset += len(complete) + 1
        entries = []
        for line in complete.split(b"\n"):
            if not line.strip():
                continue
            entry = _entry(line)
            if entry is None:
                logger.debug("%s: skipped a line that is not an entry: %.80r", self.path, line)
            else:
                entries.append(entry)
        return entries


def _entry(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # JSON and Unicode errors are ValueErrors
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class TaskProgress:
    """What the audit log says of one task's run so far."""

    task: str
    planned: int | None = None
    completed: int = 0
    """Rounds over (evaluated, rolled back, or followed by the next round's start)."""
    accuracy: Mapping[int, float] = field(default_factory=dict)
    """Round -> the federated accuracy of its evaluation."""
    failed: tuple[int, ...] = ()
    """Rounds whose training could not aggregate (the previous adapter was kept)."""
    rolled_back: tuple[int, int] | None = None
    """The latest rollback: (round, the round whose adapter was kept)."""
    resumed_from: int | None = None
    outcome: str | None = None
    """``finished`` or ``run failed (<error type>)`` once the run's last entry is written."""
    final_accuracy: float | None = None

    def relaunched(self) -> TaskProgress:
        """The same history, for a run launched now: an outcome the log recorded before
        (the failure that interrupted it) is no longer the run's."""
        return replace(self, outcome=None, final_accuracy=None)


def advance(progress: TaskProgress, entries: Iterable[Mapping[str, Any]]) -> TaskProgress:
    """``progress`` after the audit ``entries`` (in log order); events that say nothing
    of progress, and entries of an unexpected shape, leave it as it is."""
    for entry in entries:
        data = entry.get("data")
        if isinstance(data, Mapping):
            progress = _step(progress, str(entry.get("event")), data)
    return progress


def _step(progress: TaskProgress, event: str, data: Mapping[str, Any]) -> TaskProgress:
    number = _integer(data.get("round"))
    if event == "run-started":
        # Also a run that failed before its first checkpoint and starts over in its log.
        planned = _integer(data.get("planned_rounds"))
        return TaskProgress(progress.task, planned if planned is not None else progress.planned)
    if event == "run-resumed":
        return _resumed(progress, _integer(data.get("from_round")) or 0)
    if event == "round-started" and number is not None and data.get("phase") == "train":
        return _over(progress, number - 1)
    if event == "round-failed" and number is not None:
        return replace(progress, failed=tuple(sorted({*progress.failed, number})))
    if event == "evaluation" and number is not None:
        accuracy = _real(data.get("accuracy"))
        if accuracy is not None:
            progress = replace(progress, accuracy={**progress.accuracy, number: accuracy})
        return _over(progress, number)
    if event == "rolled-back" and number is not None:
        kept = _integer(data.get("to_round"))
        progress = replace(progress, rolled_back=(number, kept if kept is not None else 0))
        return _over(progress, number)
    if event == "run-finished":
        done = max(progress.completed, progress.planned or 0)
        final = _real(data.get("accuracy"))
        return replace(progress, completed=done, outcome="finished", final_accuracy=final)
    if event == "run-failed":
        return replace(progress, outcome=f"run failed ({data.get('error', 'unknown error')})")
    return progress


def _over(progress: TaskProgress, number: int) -> TaskProgress:
    return replace(progress, completed=max(progress.completed, number))


def _resumed(progress: TaskProgress, from_round: int) -> TaskProgress:
    """The rounds after the checkpoint were cut short and are run again: forget them."""
    rollback = progress.rolled_back
    return replace(
        progress,
        completed=from_round,
        accuracy={r: a for r, a in progress.accuracy.items() if r <= from_round},
        failed=tuple(r for r in progress.failed if r <= from_round),
        rolled_back=rollback if rollback is not None and rollback[0] <= from_round else None,
        resumed_from=from_round,
        outcome=None,
        final_accuracy=None,
    )


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _real(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def describe(progress: TaskProgress) -> str:
    """One line for the task's progress bar, e.g. ``dicom-classification round 2/5
    accuracy 0.912``, with failed rounds, a rollback, a resume and the outcome."""
    planned = progress.planned if progress.planned is not None else "?"
    parts = [f"{progress.task} round {progress.completed}/{planned}"]
    evaluated = [r for r in progress.accuracy if r <= progress.completed]
    if progress.outcome == "finished" and progress.final_accuracy is not None:
        parts.append(f"accuracy {progress.final_accuracy:.3f}")
    elif evaluated:
        parts.append(f"accuracy {progress.accuracy[max(evaluated)]:.3f}")
    notes = []
    if progress.failed:
        rounds = ", ".join(str(r) for r in progress.failed)
        notes.append(f"round{'s' if len(progress.failed) > 1 else ''} {rounds} failed")
    if progress.rolled_back is not None:
        notes.append(f"round {progress.rolled_back[0]} rolled back to {progress.rolled_back[1]}")
    if progress.resumed_from is not None:
        notes.append(f"resumed after round {progress.resumed_from}")
    if progress.outcome is not None:
        notes.append(progress.outcome)
    return " ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")


@contextmanager
def follow_progress(
    log: Path,
    start: TaskProgress,
    show: Callable[[TaskProgress], None],
    interval: float = POLL_INTERVAL,
) -> Iterator[None]:
    """While the ``with`` body runs (a ``flwr run``), follow ``log`` every ``interval``
    seconds in a background thread and ``show`` each new state. What the log already
    holds (a resumed run's earlier rounds) is shown before the body starts; a last look
    when it ends, normally or not, shows the final entries; then the thread is joined."""
    follower = AuditLogFollower(log)
    state = advance(start, follower.poll()).relaunched()
    show(state)
    stop = threading.Event()

    def look() -> None:
        nonlocal state
        entries = follower.poll()
        if entries:
            state = advance(state, entries)
            show(state)

    def loop() -> None:
        try:
            while not stop.wait(interval):
                look()
            look()
        except Exception:
            logger.warning("stopped following %s", log, exc_info=True)

    thread = threading.Thread(target=loop, name=f"progress-{start.task}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=max(5.0, 2 * interval))
