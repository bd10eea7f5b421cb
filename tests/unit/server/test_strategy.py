"""FedLoraStrategy's hooks on hand-built replies: no network, no SuperLink."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.adapters import AdapterSchema, arrays_to_record, record_to_arrays
from common.config import FederationConfig
from common.protocol import REFUSED_BY_POLICY, SITE_MISCONFIGURED, RoundRequest
from server.aggregation import fedavg
from server.checkpoint import CheckpointStore
from server.reporting import METRIC_COLUMNS, RunRecorder
from server.strategy import FedLoraStrategy
from tests.unit.server.replies import error_reply, eval_metrics, reply, train_metrics

SHAPES = {"l0.q.lora_A": (2, 8), "l0.q.lora_B": (8, 2), "head.weight": (2, 8), "head.bias": (2,)}
FEDERATION = FederationConfig(task="tabular-classification", base_model=Path("/m"), rounds=3)


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _strategy(tmp_path: Path, min_sites: int = 3) -> FedLoraStrategy:
    return FedLoraStrategy(
        request_for_round=lambda r: RoundRequest.for_round(FEDERATION, "f" * 64, r, ("q_proj",)),
        schema=AdapterSchema.of(_adapter(0)),
        aggregator=fedavg,
        min_sites=min_sites,
        recorder=RunRecorder("tabular-classification", tmp_path / "metrics.csv"),
        checkpoints=CheckpointStore(tmp_path / "checkpoints"),
    )


def _rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == METRIC_COLUMNS
        return list(reader)


def _train_round(examples: Iterable[int]) -> tuple[list[dict[str, np.ndarray]], list[Message]]:
    updates, replies = [], []
    for i, count in enumerate(examples, start=1):
        update = _adapter(i)
        updates.append(update)
        metrics = train_metrics(count, loss=0.1 * i, accuracy=0.5 + 0.1 * i, epsilon=0.3 * i)
        replies.append(reply(100 + i, metrics=metrics, arrays=update, site=f"bank-{i}"))
    return updates, replies


def _reference(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict:
    return {
        name: np.average(np.stack([u[name].astype(np.float64) for u in updates]), 0, weights)
        for name in SHAPES
    }


def test_three_good_replies_and_one_malformed(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    updates, replies = _train_round([50, 150, 100])
    malformed = {**_adapter(9), "head.bias": np.zeros((3,), np.float32)}
    replies.insert(1, reply(199, metrics=train_metrics(1000), arrays=malformed, site="bank-x"))

    arrays, metrics = strategy.aggregate_train(2, replies)

    assert isinstance(arrays, ArrayRecord)
    assert isinstance(metrics, MetricRecord)
    aggregate = record_to_arrays(arrays)
    expected = _reference(updates, [50, 150, 100])
    for name in SHAPES:
        assert aggregate[name].dtype == np.float32
        np.testing.assert_allclose(aggregate[name], expected[name], rtol=1e-6, atol=1e-7)
    weights = np.array([50, 150, 100], dtype=float)
    assert metrics["examples"] == weights.sum()
    assert "train-loss" not in metrics  # not privatised, so never aggregated or released
    assert metrics["sites"] == 3.0

    # The aggregate is checkpointed under the round number and kept as the latest.
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.latest_round() == 2
    saved = store.load(2)
    for name in SHAPES:
        np.testing.assert_array_equal(saved[name], aggregate[name])
    assert strategy.last_aggregate is not None
    for name in SHAPES:
        np.testing.assert_array_equal(strategy.last_aggregate[name], aggregate[name])
    assert strategy.rounds_aggregated == 1
    assert strategy.known_sites == {101: "bank-1", 102: "bank-2", 103: "bank-3", 199: "bank-x"}

    rows = _rows(tmp_path)
    accepted = [r for r in rows if r["status"] == "accepted"]
    assert [(r["site"], r["examples"], r["phase"], r["round"]) for r in accepted] == [
        ("bank-1", "50", "train", "2"),
        ("bank-2", "150", "train", "2"),
        ("bank-3", "100", "train", "2"),
    ]
    assert float(accepted[1]["epsilon"]) == pytest.approx(0.6)
    assert float(accepted[1]["epsilon_budget"]) == 8.0
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == 1
    assert rejected[0]["site"] == "bank-x"
    assert rejected[0]["phase"] == "train"
    assert "head.bias: shape (3,), expected (2,)" in rejected[0]["reason"]
    federated = [r for r in rows if r["site"] == "all"]
    assert [(r["phase"], r["status"], r["round"]) for r in federated] == [
        ("train", "aggregated", "2")
    ]
    assert len(rows) == 5

    recorder = strategy.recorder
    assert sorted(recorder.sites) == ["bank-1", "bank-2", "bank-3"]
    assert recorder.sites["bank-2"].examples == 150
    assert recorder.sites["bank-2"].rounds_trained == 1
    assert recorder.refusals == [
        {
            "round": 2,
            "site": "bank-x",
            "phase": "train",
            "status": "rejected",
            "reason": rejected[0]["reason"],
        }
    ]


def test_refused_and_failed_sites_are_recorded_and_round_still_aggregates(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    updates, replies = _train_round([10, 30])
    replies += [
        error_reply(7, REFUSED_BY_POLICY, "budget spent"),
        error_reply(8, SITE_MISCONFIGURED, "no data"),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    expected = _reference(updates, [10, 30])
    got = record_to_arrays(arrays)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
    statuses = {(r["site"], r["status"], r["reason"]) for r in _rows(tmp_path)}
    assert ("node-7", "refused", "budget spent") in statuses
    assert ("node-8", "failed", "no data") in statuses
    assert [r["reason"] for r in strategy.recorder.refusals] == ["budget spent", "no data"]


def test_fewer_good_replies_than_min_sites_keeps_the_global_adapter(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=3)
    _, replies = _train_round([40, 60])
    replies.append(reply(150, metrics=None, arrays=_adapter(5), site="bank-9"))
    replies.append(error_reply(151, REFUSED_BY_POLICY, "cohort too small"))

    assert strategy.aggregate_train(1, replies) == (None, None)

    assert strategy.rounds_aggregated == 0
    assert strategy.last_aggregate is None
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert CheckpointStore(tmp_path / "checkpoints").latest_round() is None
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows if r["site"] == "all"] == ["skipped"]
    assert sorted(r["status"] for r in rows if r["site"] != "all") == [
        "accepted",
        "accepted",
        "refused",
        "rejected",
    ]


def test_failed_round_does_not_undo_an_earlier_aggregate(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    _, replies = _train_round([10, 20])
    first, _ = strategy.aggregate_train(1, replies)
    assert first is not None
    kept = {k: v.copy() for k, v in record_to_arrays(first).items()}

    assert strategy.aggregate_train(2, [error_reply(101, REFUSED_BY_POLICY, "no")]) == (None, None)

    assert strategy.rounds_aggregated == 1
    assert strategy.checkpoints.latest_round() == 1
    assert strategy.last_aggregate is not None
    for name in SHAPES:
        np.testing.assert_array_equal(strategy.last_aggregate[name], kept[name])
    # The node learnt in round 1 is named in round 2's refusal.
    assert strategy.recorder.refusals[-1]["site"] == "bank-1"


def test_aggregate_evaluate_weights_by_examples(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    replies = [
        reply(1, metrics=eval_metrics(20, 0.9, 0.5), site="h1", message_type=MessageType.EVALUATE),
        reply(2, metrics=eval_metrics(60, 0.3, 0.9), site="h2", message_type=MessageType.EVALUATE),
        reply(3, metrics=eval_metrics(20, 0.6, 0.7), site="h3", message_type=MessageType.EVALUATE),
        error_reply(4, REFUSED_BY_POLICY, "k-anonymity", MessageType.EVALUATE),
    ]
    result = strategy.aggregate_evaluate(3, replies)

    assert isinstance(result, MetricRecord)
    expected_loss = (20 * 0.9 + 60 * 0.3 + 20 * 0.6) / 100
    expected_accuracy = (20 * 0.5 + 60 * 0.9 + 20 * 0.7) / 100
    assert result["eval-loss"] == pytest.approx(expected_loss)
    assert result["eval-accuracy"] == pytest.approx(expected_accuracy)
    assert strategy.recorder.federated == {
        3: {"loss": pytest.approx(expected_loss), "accuracy": pytest.approx(expected_accuracy)}
    }
    rows = _rows(tmp_path)
    federated = [r for r in rows if r["site"] == "all"]
    assert len(federated) == 1
    assert federated[0]["phase"] == "evaluate"
    assert federated[0]["examples"] == "100"
    assert float(federated[0]["accuracy"]) == pytest.approx(expected_accuracy)
    assert [(r["site"], r["status"]) for r in rows if r["site"] != "all"] == [
        ("node-4", "refused"),
        ("h1", "ok"),
        ("h2", "ok"),
        ("h3", "ok"),
    ]
    # Evaluation does not touch the adapter.
    assert strategy.rounds_aggregated == 0
    assert strategy.checkpoints.latest_round() is None


def test_aggregate_evaluate_without_good_replies(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    replies = [error_reply(4, REFUSED_BY_POLICY, "no", MessageType.EVALUATE)]
    assert strategy.aggregate_evaluate(1, replies) is None
    assert strategy.recorder.federated == {}
    assert [r["status"] for r in _rows(tmp_path)] == ["refused"]


def test_configure_train_sends_the_round_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a Flower task identity in place, instructions carry the RoundRequest and
    the adapter; replies built from them are aggregated as usual."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

        def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
            return []  # introductions go unanswered: names fall back to node ids

    strategy = _strategy(tmp_path, min_sites=3)
    initial = arrays_to_record(_adapter(0))
    messages = list(
        strategy.configure_train(3, initial, ConfigRecord(), FakeGrid())  # type: ignore[arg-type]
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    request = RoundRequest.from_record(messages[0].content.config_records["config"])
    assert request == RoundRequest.for_round(FEDERATION, "f" * 64, 3, ("q_proj",))
    sent = record_to_arrays(messages[0].content.array_records["arrays"])
    for name, value in _adapter(0).items():
        np.testing.assert_array_equal(sent[name], value)

    updates = [_adapter(20 + i) for i in range(3)]
    replies = [
        Message(
            RecordDict(
                {"metrics": MetricRecord(train_metrics(10)), "arrays": arrays_to_record(update)}
            ),
            reply_to=instruction,
        )
        for instruction, update in zip(messages, updates, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(4, replies)
    assert arrays is not None
    got = record_to_arrays(arrays)
    expected = _reference(updates, [1, 1, 1])
    for name in SHAPES:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
    assert sorted(strategy.recorder.sites) == ["node-11", "node-12", "node-13"]


def test_configure_evaluate_sends_the_round_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    class FakeGrid:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

        def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
            return []  # introductions go unanswered: names fall back to node ids

    strategy = _strategy(tmp_path, min_sites=3)
    messages = list(
        strategy.configure_evaluate(
            2,
            arrays_to_record(_adapter(0)),
            ConfigRecord(),
            FakeGrid(),  # type: ignore[arg-type]
        )
    )
    assert len(messages) == 3
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    request = RoundRequest.from_record(messages[0].content.config_records["config"])
    assert request.server_round == 2


def test_reply_missing_train_metrics_is_rejected_not_fatal(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    _, replies = _train_round([10, 20])
    replies.append(reply(190, metrics={"num-examples": 5}, arrays=_adapter(7), site="bank-q"))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [(f["site"], f["phase"]) for f in strategy.recorder.refusals] == [("bank-q", "train")]


def test_negative_example_count_is_rejected_not_fatal(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    _, replies = _train_round([10, 20])
    replies.append(reply(190, metrics=train_metrics(-50), arrays=_adapter(7), site="bank-q"))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [f["site"] for f in strategy.recorder.refusals] == ["bank-q"]
