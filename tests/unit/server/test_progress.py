"""server/progress.py: following the coordinator's audit log as it grows, and what the
progress bar of `fedlora coordinator run` makes of its entries. The entries come from
the real audit writer (server/audit.py), into a log in a temporary run directory."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from common.adapters import AdapterArrays
from common.config import FederationConfig
from server.audit import CoordinatorAudit, coordinator_log_path
from server.progress import (
    AuditLogFollower,
    TaskProgress,
    advance,
    describe,
    follow_progress,
)

TASK = "dicom-classification"
ADAPTER: AdapterArrays = {"lora_B": np.zeros((2, 2), dtype=np.float32)}


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _started(run_dir: Path, key: Ed25519PrivateKey, rounds: int = 5) -> CoordinatorAudit:
    audit = CoordinatorAudit.open(run_dir, TASK, key)
    audit.run_started(
        run="101",
        federation=FederationConfig(task=TASK, base_model=Path("/m"), rounds=rounds),
        base_model_sha256="0" * 64,
        initial=ADAPTER,
        sites=["hospital-a", "hospital-b"],
    )
    return audit


def _round(audit: CoordinatorAudit, number: int, accuracy: float, *, failed: bool = False) -> None:
    """One round as the strategy logs it: train, aggregation (or failure), evaluation."""
    sites = ["hospital-a", "hospital-b"]
    audit.round_started(number, "train", sites)
    if failed:
        audit.round_failed(number, "1 usable update(s), fewer than the minimum of 2 sites")
    else:
        audit.aggregated(number, ADAPTER, sites, 200, None)
    audit.round_started(number, "evaluate", sites)
    audit.evaluated(number, accuracy, 0.5, 100, sites)


# -------------------------------------------------------------- the follower ---


def test_a_line_being_written_waits_for_the_next_poll(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    source = tmp_path / "source"
    audit = _started(source, key)
    _round(audit, 1, 0.75)
    lines = coordinator_log_path(source, TASK).read_bytes().splitlines(keepends=True)
    log = tmp_path / "followed.jsonl"
    follower = AuditLogFollower(log)

    log.write_bytes(lines[0] + lines[1][:40])
    assert [e["event"] for e in follower.poll()] == ["log-opened"]
    assert follower.poll() == []

    with log.open("ab") as handle:
        handle.write(lines[1][40:] + lines[2])
    assert [e["event"] for e in follower.poll()] == ["run-started", "round-started"]

    with log.open("ab") as handle:
        handle.write(b"".join(lines[3:]))
    assert [e["event"] for e in follower.poll()] == [
        "aggregation-done",
        "round-started",
        "evaluation",
    ]
    assert follower.poll() == []


def test_a_missing_log_gives_nothing_until_it_appears(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    follower = AuditLogFollower(coordinator_log_path(tmp_path, TASK))
    assert follower.poll() == []
    assert follower.poll() == []

    _started(tmp_path, key)

    assert [e["event"] for e in follower.poll()] == ["log-opened", "run-started"]


def test_a_malformed_line_is_skipped_with_a_debug_message(
    tmp_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "source"
    _started(source, key)
    opened, started = coordinator_log_path(source, TASK).read_bytes().splitlines(keepends=True)
    log = tmp_path / "followed.jsonl"
    log.write_bytes(opened + b'{"seq": 1, "event": \n' + b"[1, 2]\n\xff\xfe\n\n" + started)

    with caplog.at_level(logging.DEBUG, logger="server.progress"):
        entries = AuditLogFollower(log).poll()

    assert [e["event"] for e in entries] == ["log-opened", "run-started"]
    skipped = [r for r in caplog.records if "skipped a line" in r.getMessage()]
    assert len(skipped) == 3


# --------------------------------------------------------------- the mapping ---


def test_a_run_as_its_audit_log_tells_it(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    audit = _started(tmp_path, key, rounds=4)
    follower = AuditLogFollower(coordinator_log_path(tmp_path, TASK))
    state = advance(TaskProgress(TASK, 4), follower.poll())
    assert (state.completed, describe(state)) == (0, f"{TASK} round 0/4")

    _round(audit, 1, 0.9121)
    state = advance(state, follower.poll())
    assert (state.completed, describe(state)) == (1, f"{TASK} round 1/4 accuracy 0.912")

    audit.round_started(2, "train", ["hospital-a"])
    audit.round_failed(2, "1 usable update(s), fewer than the minimum of 2 sites")
    state = advance(state, follower.poll())
    assert state.completed == 1  # its evaluation of the kept adapter is still to come
    assert describe(state) == f"{TASK} round 1/4 accuracy 0.912 (round 2 failed)"

    audit.round_started(2, "evaluate", ["hospital-a"])
    audit.evaluated(2, 0.905, 0.5, 100, ["hospital-a"])
    _round(audit, 3, 0.5)
    audit.rolled_back(3, 1, ADAPTER, "federated accuracy 0.500 is more than 0.05 below")
    state = advance(state, follower.poll())
    assert state.completed == 3
    assert describe(state) == (
        f"{TASK} round 3/4 accuracy 0.500 (round 2 failed; round 3 rolled back to 1)"
    )

    audit.round_started(4, "train", ["hospital-a", "hospital-b"])
    audit.round_started(4, "evaluate", ["hospital-a", "hospital-b"])  # no site answered
    state = advance(state, follower.poll())
    assert state.completed == 3
    audit.run_finished(
        {"rounds_completed": 2, "final_adapter_round": 1, "final": {"accuracy": 0.912}}, ADAPTER
    )
    state = advance(state, follower.poll())
    assert state.completed == 4
    assert describe(state) == (
        f"{TASK} round 4/4 accuracy 0.912 (round 2 failed; round 3 rolled back to 1; finished)"
    )


def test_a_resumed_log_shows_its_earlier_rounds_as_done(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    audit = _started(tmp_path, key)
    for number, accuracy in ((1, 0.6), (2, 0.7), (3, 0.8)):
        _round(audit, number, accuracy)
    _round(audit, 4, 0.85, failed=True)  # evaluated, but cut off before its checkpoint
    audit.run_failed(KeyboardInterrupt())
    follower = AuditLogFollower(coordinator_log_path(tmp_path, TASK))

    before = advance(TaskProgress(TASK, 5), follower.poll())
    assert before.completed == 4
    assert describe(before).endswith("(round 4 failed; run failed (KeyboardInterrupt))")
    relaunched = before.relaunched()  # a resume launched now is not that failure
    assert describe(relaunched) == f"{TASK} round 4/5 accuracy 0.850 (round 4 failed)"

    resumed = CoordinatorAudit.reopen(tmp_path, TASK, key)
    resumed.run_resumed(run="102", run_id="101", from_round=3, adapter=ADAPTER, sites=["h"])
    state = advance(relaunched, follower.poll())
    assert state.completed == 3
    assert describe(state) == f"{TASK} round 3/5 accuracy 0.800 (resumed after round 3)"

    _round(resumed, 4, 0.88)
    state = advance(state, follower.poll())
    assert describe(state) == f"{TASK} round 4/5 accuracy 0.880 (resumed after round 3)"


def test_a_run_that_starts_over_in_its_log_starts_from_zero(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    audit = _started(tmp_path, key)
    audit.round_started(1, "train", ["hospital-a"])
    audit.round_started(1, "evaluate", ["hospital-a"])  # no site answered
    audit.round_started(2, "train", ["hospital-a"])
    follower = AuditLogFollower(audit.log.path)
    assert advance(TaskProgress(TASK, 5), follower.poll()).completed == 1  # round 2 began
    audit.run_failed(RuntimeError())
    restarted = CoordinatorAudit.reopen(tmp_path, TASK, key)
    restarted.run_started(
        run="102",
        federation=FederationConfig(task=TASK, base_model=Path("/m"), rounds=3),
        base_model_sha256="0" * 64,
        initial=ADAPTER,
        sites=["hospital-a"],
    )

    state = advance(TaskProgress(TASK, 5, completed=1), follower.poll())

    assert state == TaskProgress(TASK, planned=3)


def test_entries_of_an_unexpected_shape_change_nothing() -> None:
    start = TaskProgress(TASK, 5, completed=2)
    entries: list[dict[str, Any]] = [
        {"event": "evaluation", "data": "round 3"},
        {"event": "evaluation", "data": {"round": "3", "accuracy": 0.9}},
        {"event": "rolled-back", "data": {"round": True}},
        {"event": "round-started", "data": {"round": 4, "phase": "evaluate"}},
        {"event": "site-joined", "data": {"site": "hospital-a"}},
        {"data": {"round": 9}},
    ]

    assert advance(start, entries) == start


# ---------------------------------------------------------- following a run ---


def test_following_shows_what_the_run_writes_and_stops_with_it(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = coordinator_log_path(tmp_path, TASK)
    shown: list[TaskProgress] = []
    first_round = threading.Event()

    def show(state: TaskProgress) -> None:
        shown.append(state)
        if state.completed == 1:
            first_round.set()

    with follow_progress(log, TaskProgress(TASK, 2), show, interval=0.01):
        assert shown == [TaskProgress(TASK, 2)]  # no log yet
        audit = _started(tmp_path, key, rounds=2)
        _round(audit, 1, 0.7)
        assert first_round.wait(timeout=10)
        _round(audit, 2, 0.8)
        audit.run_finished(
            {"rounds_completed": 2, "final_adapter_round": 2, "final": {"accuracy": 0.8}},
            ADAPTER,
        )

    assert shown[-1].outcome == "finished"  # the last look, as the run ends
    assert describe(shown[-1]) == f"{TASK} round 2/2 accuracy 0.800 (finished)"
    assert not [t for t in threading.enumerate() if t.name == f"progress-{TASK}"]


def test_following_stops_when_the_run_raises(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    audit = _started(tmp_path, key)
    _round(audit, 1, 0.7)
    shown: list[TaskProgress] = []

    with (
        pytest.raises(RuntimeError, match="SuperLink gone"),
        follow_progress(audit.log.path, TaskProgress(TASK, 5), shown.append, interval=60),
    ):
        assert shown[-1].completed == 1  # the rounds already logged, at once
        _round(audit, 2, 0.75)
        raise RuntimeError("SuperLink gone")

    assert shown[-1].completed == 2
    assert not [t for t in threading.enumerate() if t.name == f"progress-{TASK}"]


def test_the_coordinator_bar_takes_the_progress(tmp_path: Path) -> None:
    from server.cli import _bar_updater
    from server.run_report import round_progress

    progress = round_progress(Console(file=io.StringIO()))
    bar = progress.add_task(TASK, total=5)

    _bar_updater(progress, bar)(TaskProgress(TASK, 5, completed=2, accuracy={2: 0.912}))

    (task,) = progress.tasks
    assert (task.completed, task.total) == (2, 5)
    assert task.description == f"{TASK} round 2/5 accuracy 0.912"


def test_without_a_terminal_each_change_is_a_line(tmp_path: Path) -> None:
    """Under a service or a pipe a rich bar shows nothing until the end: each new state
    is printed as a line instead, once."""
    from server.cli import _bar_updater
    from server.run_report import round_progress

    output = io.StringIO()
    progress = round_progress(Console(file=output, force_terminal=False))
    show = _bar_updater(progress, progress.add_task(TASK, total=5))
    show(TaskProgress(TASK, 5, completed=1, accuracy={1: 0.8}))
    show(TaskProgress(TASK, 5, completed=1, accuracy={1: 0.8}))
    show(TaskProgress(TASK, 5, completed=2, accuracy={1: 0.8, 2: 0.9}))
    lines = [line for line in output.getvalue().splitlines() if line.strip()]
    assert lines == [f"{TASK} round 1/5 accuracy 0.800", f"{TASK} round 2/5 accuracy 0.900"]
