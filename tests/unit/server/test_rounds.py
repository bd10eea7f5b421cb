"""The round loop, introductions that never block a round, the rollback decision and
the round events' two consumers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from common.audit.log import AuditLog, read_entries
from common.config import RollbackGuard
from server.audit import COORDINATOR, CoordinatorAudit
from server.events import Aggregated, RoundEvents, RoundFailed, SiteFailed, SiteTrained
from server.introductions import Introductions
from server.reporting import RunRecorder
from server.rollback import BestAdapter, decide
from server.rounds import INTRODUCTION_POLL, run_rounds
from server.strategy_utils import FailedReply, UpdateReceipt

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class SlowGrid:
    """Pushed queries are answered after ``delay`` pulls (0: at the first pull)."""

    def __init__(self, answering: set[int], delay: int = 0) -> None:
        self.answering = answering
        self.delay = delay
        self.pushed: list[int] = []
        self._queued: dict[str, tuple[Message, int]] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"q{len(self.pushed)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.pushed.append(message.metadata.dst_node_id)
            ids.append(message_id)
            if message.metadata.dst_node_id in self.answering:
                self._queued[message_id] = (message, self.delay)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in list(message_ids):
            if message_id not in self._queued:
                continue
            message, wait = self._queued[message_id]
            if wait > 0:
                self._queued[message_id] = (message, wait - 1)
                continue
            del self._queued[message_id]
            replies.append(Message(RecordDict(), reply_to=message))
        return replies


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_answer_is_taken_later_and_nobody_is_asked_twice_meanwhile() -> None:
    clock = Clock()
    grid = SlowGrid({1, 2}, delay=2)
    asking = Introductions(retry_after=60.0, clock=clock)
    assert asking.ask(grid, [1, 2, 3]) == [1, 2, 3]  # type: ignore[arg-type]
    assert asking.collect(grid) == []  # type: ignore[arg-type]
    assert asking.ask(grid, [1, 2, 3]) == []  # type: ignore[arg-type]  # all in flight
    asking.collect(grid)  # type: ignore[arg-type]
    replies = asking.collect(grid)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["q0", "q1"]
    assert asking.answered == {1, 2}
    clock.now = 61.0  # node 3's question is old: it is asked again
    assert asking.ask(grid, [3]) == [3]  # type: ignore[arg-type]
    assert grid.pushed == [1, 2, 3, 3]


def test_a_retried_node_answers_once_whichever_question_it_answers() -> None:
    clock = Clock()
    grid = SlowGrid({5}, delay=5)
    asking = Introductions(retry_after=1.0, clock=clock)
    asking.ask(grid, [5])  # type: ignore[arg-type]
    clock.now = 2.0
    asking.ask(grid, [5])  # type: ignore[arg-type]
    replies = [r for _ in range(8) for r in asking.collect(grid)]  # type: ignore[arg-type]
    assert len(replies) == 1 and asking.answered == {5}


def test_collect_waits_for_the_answers_it_is_told_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.introductions.POLL_SECONDS", 0.0)
    grid = SlowGrid({1}, delay=3)
    asking = Introductions(retry_after=60.0)
    asking.ask(grid, [1])  # type: ignore[arg-type]
    assert len(asking.collect(grid, wait=5.0)) == 1  # type: ignore[arg-type]


class RecordingStrategy:
    introduction_timeout = 7.0
    rounds_before = 2

    def __init__(self, awaiting: int = 0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.awaiting = awaiting
        """How many more looks the sites take to introduce themselves."""

    def admit(self, grid: object, wait: float = 0.0) -> None:
        self.calls.append(("admit", wait))

    def awaiting_introductions(self, grid: object) -> bool:
        self.awaiting -= 1
        return self.awaiting >= 0

    def current_arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def configure_train(self, r: int, *_: object) -> list[Message]:
        self.calls.append(("configure_train", r))
        return []

    def aggregate_train(self, r: int, replies: object) -> tuple[None, None]:
        self.calls.append(("aggregate_train", r))
        return None, None

    def configure_evaluate(self, r: int, *_: object) -> list[Message]:
        self.calls.append(("configure_evaluate", r))
        return []

    def aggregate_evaluate(self, r: int, replies: object) -> None:
        self.calls.append(("aggregate_evaluate", r))


class EmptyGrid:
    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        assert all(m.metadata.message_type != MessageType.QUERY for m in messages)
        return []


def test_the_loop_introduces_between_the_hooks_and_once_more_at_the_end() -> None:
    strategy = RecordingStrategy()
    run_rounds(strategy, EmptyGrid(), num_rounds=2, timeout=5)  # type: ignore[arg-type]
    per_round = [
        ("admit", 0.0),
        ("configure_train", 1),
        ("admit", 0.0),
        ("aggregate_train", 1),
        ("configure_evaluate", 1),
        ("aggregate_evaluate", 1),
    ]
    second = [(c[0], 2) if isinstance(c[1], int) else c for c in per_round]
    assert strategy.calls == [*per_round, *second, ("admit", 7.0)]


def _best(server_round: int, accuracy: float) -> BestAdapter:
    return BestAdapter(server_round, accuracy, 1 - accuracy, {"b": np.full(2, server_round)})


def test_the_guard_keeps_a_better_round_and_restores_the_best_after_a_fall() -> None:
    guard = RollbackGuard(max_accuracy_drop=0.03)
    round_one = _best(1, 0.80)
    first = decide(guard, None, round_one)
    assert first.best is round_one and first.restore is None
    worse_but_close = decide(guard, first.best, _best(2, 0.78))
    assert worse_but_close.best is first.best and worse_but_close.restore is None
    fall = decide(guard, first.best, _best(3, 0.70))
    assert fall.restore is first.best and "0.700" in (fall.reason or "")
    better = decide(guard, first.best, _best(4, 0.85))
    assert better.best is not None and better.best.server_round == 4


def test_a_disabled_guard_decides_nothing() -> None:
    best = _best(1, 0.9)
    decision = decide(RollbackGuard(enabled=False), best, _best(2, 0.1))
    assert decision.restore is None and decision.best is best


def test_each_round_event_reaches_the_metrics_and_the_audit_log(tmp_path: Path) -> None:
    recorder = RunRecorder("tabular-classification", tmp_path / "metrics.csv")
    log = AuditLog(tmp_path / "log.jsonl", COORDINATOR, Ed25519PrivateKey.generate())
    publish = RoundEvents(recorder, CoordinatorAudit(log))
    receipt = UpdateReceipt("ab" * 32, 40.0, 1.5)
    metrics = {"num-examples": 40.0, "epsilon": 1.5, "epsilon-budget": 8.0, "delta": 1e-5}
    publish(SiteTrained(1, "bank-a", metrics, 0.4, receipt))
    publish(SiteFailed(1, "train", FailedReply(2, "bank-b", "rejected", "bad"), receipt))
    publish(SiteFailed(1, "train", FailedReply(3, "bank-c", "timed-out", "late")))
    publish(Aggregated(1, {"b": np.zeros(2, np.float32)}, ["bank-a"], 40, None))
    publish(RoundFailed(2, 0, "too few"))
    events = [e["event"] for e in read_entries(tmp_path / "log.jsonl")][1:]
    assert events == [
        "update-received",
        "update-received",
        "site-excluded",
        "aggregation-done",
        "round-failed",
    ]
    assert [e["status"] for e in recorder.exclusions] == ["rejected", "timed-out"]
    assert recorder.sites["bank-a"].rounds_trained == 1 and recorder.failed_rounds == [2]


def test_a_round_no_site_may_take_yet_waits_for_the_introductions_first() -> None:
    """A resumed run's sites may answer late; the round then waits for them instead of
    failing at once with every site held back."""
    strategy = RecordingStrategy(awaiting=2)
    run_rounds(strategy, EmptyGrid(), num_rounds=1, timeout=5)  # type: ignore[arg-type]
    assert strategy.calls[:4] == [
        ("admit", 0.0),
        ("admit", INTRODUCTION_POLL),
        ("admit", INTRODUCTION_POLL),
        ("configure_train", 1),
    ]
