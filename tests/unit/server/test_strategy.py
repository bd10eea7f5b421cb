"""FedLoraStrategy's hooks on hand-built replies: no network, no SuperLink.

Each train round starts with ``configure_train`` on a fake Grid (the strategy validates
every reply against the adapter it sent there and times out the nodes it sent to that
did not answer), so these tests need a Flower task identity (``flower_task_identity``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo

from common.adapters import (
    AdapterArrays,
    adapter_sha256,
    arrays_to_record,
    is_lora_a,
    record_to_arrays,
)
from common.audit.log import AuditLog, read_entries, verify_log
from common.config import FederationConfig, RollbackGuard, UpdateValidation
from common.protocol import (
    AUDIT_KEY,
    REFUSED_BY_POLICY,
    SITE_ID_KEY,
    SITE_MISCONFIGURED,
    RoundRequest,
)
from server.aggregation import fedavg
from server.audit import COORDINATOR, CoordinatorAudit
from server.checkpoint import CheckpointStore
from server.reporting import METRIC_COLUMNS, RunRecorder
from server.strategy import FedLoraStrategy
from server.validation import derived_norm_bound, update_norm
from tests.unit.server.replies import error_reply, eval_metrics, nudged, reply, train_metrics

pytestmark = pytest.mark.usefixtures("flower_task_identity")

A_NAME = "l0.q.lora_A.weight"
B_NAME = "l0.q.lora_B.weight"
SHAPES = {A_NAME: (4, 16), B_NAME: (64, 4), "head.weight": (2, 64), "head.bias": (2,)}
"""Real peft-style LoRA names (``.lora_A.``/``.lora_B.``, so the pair is recognised), and
big enough that honest replies fit the default payload limit with room to spare."""
# The fake sites reply in float32; update precision has its own tests.
FEDERATION = FederationConfig(
    task="tabular-classification", base_model=Path("/m"), rounds=8, update_precision="float32"
)
TIMEOUT = 600.0
SIGNING_KEY = Ed25519PrivateKey.generate()


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


INITIAL = _adapter(0)
LORA_A = {name: value for name, value in INITIAL.items() if is_lora_a(name)}


def _request(server_round: int, freeze_lora_a: bool = False) -> RoundRequest:
    return RoundRequest.for_round(
        FEDERATION, "f" * 64, server_round, ("q_proj",), freeze_lora_a=freeze_lora_a
    )


def _strategy(
    tmp_path: Path,
    min_sites: int = 3,
    *,
    frozen: AdapterArrays | None = None,
    rollback: RollbackGuard | None = None,
    audit_keys: Mapping[str, str] | None = None,
) -> FedLoraStrategy:
    frozen = frozen or {}
    return FedLoraStrategy(
        request_for_round=lambda r: _request(r, freeze_lora_a=bool(frozen)),
        initial=INITIAL,
        frozen=frozen,
        aggregator=fedavg,
        validation=UpdateValidation(),
        min_sites=min_sites,
        rollback=rollback or RollbackGuard(),
        round_timeout=TIMEOUT,
        recorder=RunRecorder("tabular-classification", tmp_path / "metrics.csv"),
        checkpoints=CheckpointStore(tmp_path / "checkpoints"),
        audit=CoordinatorAudit(
            AuditLog(tmp_path / "audit" / "coordinator.jsonl", COORDINATOR, SIGNING_KEY)
        ),
        audit_keys=audit_keys,
    )


class FakeGrid:
    """The part of a Grid the strategy uses: the connected nodes, and introductions
    (answered with the site name for the nodes in ``names``, unanswered otherwise;
    ``details`` replaces what a node says of itself: site id, kind, task…). ``registered``
    are the names Flower has the nodes' keys registered under (none in a simulation)."""

    def __init__(
        self,
        nodes: Iterable[int],
        names: Mapping[int, str] | None = None,
        details: Mapping[int, Mapping[str, str]] | None = None,
        registered: Mapping[int, str] | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.names = dict(names or {})
        self.details = {node: dict(told) for node, told in (details or {}).items()}
        self.registered = dict(registered or {})
        self.introduced: list[int] = []
        self.listings = 0
        self._polls = 0
        self._outbox: dict[str, Message] = {}
        self._delivered: list[Message] = []
        self._pushed = 0

    def get_node_ids(self) -> list[int]:
        # Flower's sampling waits (forever) for min_available_nodes: fail instead of hanging.
        self._polls += 1
        assert self._polls < 20, "FakeGrid has fewer nodes than the strategy waits for"
        return list(self.nodes)

    def get_nodes(self) -> list[NodeInfo]:
        self.listings += 1
        return [NodeInfo(node_id=node, name=self.registered.get(node)) for node in self.nodes]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Introductions are pushed, and answered at once by the nodes that answer."""
        ids = []
        for message in messages:
            self._pushed += 1
            message_id = f"query-{id(self)}-{self._pushed}"
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do
            ids.append(message_id)
            for answer in self.send_and_receive([message], timeout=0):
                self._outbox[message_id] = answer
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = [self._outbox.pop(m) for m in list(message_ids) if m in self._outbox]
        self._delivered.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        answers = []
        for message in messages:
            assert message.metadata.message_type == MessageType.QUERY
            node = message.metadata.dst_node_id
            self.introduced.append(node)
            if node in self.details:
                site = ConfigRecord(dict(self.details[node]))
                answers.append(Message(RecordDict({"site": site}), reply_to=message))
            elif node in self.names:
                site = ConfigRecord(
                    {SITE_ID_KEY: self.names[node], "kind": "bank", AUDIT_KEY: f"ed25519:{node}"}
                )
                answers.append(Message(RecordDict({"site": site}), reply_to=message))
        return answers


def _configure(
    strategy: FedLoraStrategy,
    server_round: int,
    nodes: Iterable[int],
    names: Mapping[int, str] | None = None,
    flower_arrays: ArrayRecord | None = None,
) -> dict[int, Message]:
    """The round loop's introductions, then configure_train, on a fake grid: the
    instructions by node. ``flower_arrays`` is what a loop would hand over (the strategy
    must send its own adapter)."""
    grid = FakeGrid(nodes, names)
    strategy.admit(grid)  # type: ignore[arg-type]
    messages = strategy.configure_train(
        server_round,
        flower_arrays or arrays_to_record(_adapter(99)),
        ConfigRecord(),
        grid,  # type: ignore[arg-type]
    )
    return {m.metadata.dst_node_id: m for m in messages}


def _sent(instruction: Message) -> AdapterArrays:
    return record_to_arrays(instruction.content.array_records["arrays"])


def _answer(
    instruction: Message,
    arrays: Mapping[str, np.ndarray] | None,
    metrics: Mapping[str, float | int] | None,
    site: str | None = None,
) -> Message:
    """A site's reply to an instruction, as client.app builds it."""
    content = RecordDict()
    if metrics is not None:
        content["metrics"] = MetricRecord(dict(metrics))
    if arrays is not None:
        content["arrays"] = arrays_to_record(arrays)
    if site is not None:
        content["site"] = ConfigRecord({SITE_ID_KEY: site})
    return Message(content, reply_to=instruction)


def _honest_round(
    instructions: Mapping[int, Message],
    examples: Mapping[int, int],
    sites: Mapping[int, str] | None = None,
    scale: float = 0.01,
) -> tuple[dict[int, AdapterArrays], list[Message]]:
    """One honest update per node in ``examples``, a small move from what it was sent."""
    updates, replies = {}, []
    for node, count in examples.items():
        updates[node] = nudged(_sent(instructions[node]), seed=node, scale=scale)
        metrics = train_metrics(count, epsilon=0.01 * node)
        site = sites[node] if sites else None
        replies.append(_answer(instructions[node], updates[node], metrics, site))
    return updates, replies


def _rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == METRIC_COLUMNS
        return list(reader)


def _reference(updates: list[AdapterArrays], weights: list[float]) -> dict[str, np.ndarray]:
    return {
        name: np.average(np.stack([u[name].astype(np.float64) for u in updates]), 0, weights)
        for name in updates[0]
    }


def _assert_close(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)


def _assert_equal(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


# ------------------------------------------------------------------- training ---


def test_three_good_replies_and_one_malformed(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    names = {101: "bank-1", 102: "bank-2", 103: "bank-3"}
    instructions = _configure(strategy, 2, [101, 102, 103, 199])
    updates, replies = _honest_round(instructions, {101: 50, 102: 150, 103: 100}, names)
    malformed = {**nudged(INITIAL, 9), "head.bias": np.zeros((3,), np.float32)}
    replies.insert(1, _answer(instructions[199], malformed, train_metrics(1000), "bank-x"))

    arrays, metrics = strategy.aggregate_train(2, replies)

    assert isinstance(arrays, ArrayRecord)
    assert isinstance(metrics, MetricRecord)
    aggregate = record_to_arrays(arrays)
    expected = _reference(list(updates.values()), [50, 150, 100])
    for name in SHAPES:
        assert aggregate[name].dtype == np.float32
    _assert_close(aggregate, expected)
    assert metrics["examples"] == 300.0
    assert "train-loss" not in metrics  # not privatised, so never aggregated or released
    assert metrics["sites"] == 3.0
    assert (metrics["rejected"], metrics["failed"], metrics["refused"]) == (1.0, 0.0, 0.0)
    assert metrics["timed-out"] == 0.0
    error = float(metrics["lora-product-error"])  # type: ignore[arg-type]
    assert 0 < error < 1e-2  # A and B averaged apart: not exact

    # The aggregate is the strategy's global adapter, checkpointed under the round number.
    _assert_equal(strategy.trained, aggregate)
    _assert_equal(strategy.global_adapter, aggregate)
    assert strategy.adapter_round == 2
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.latest_round() == 2
    _assert_equal(store.load(2), aggregate)
    assert strategy.rounds_aggregated == 1
    assert strategy.known_sites == {101: "bank-1", 102: "bank-2", 103: "bank-3", 199: "bank-x"}

    rows = _rows(tmp_path)
    accepted = [r for r in rows if r["status"] == "accepted"]
    assert [(r["site"], r["examples"], r["phase"], r["round"]) for r in accepted] == [
        ("bank-1", "50", "train", "2"),
        ("bank-2", "150", "train", "2"),
        ("bank-3", "100", "train", "2"),
    ]
    assert float(accepted[1]["epsilon"]) == pytest.approx(1.02)
    assert float(accepted[1]["epsilon_budget"]) == 8.0
    # Each accepted row carries the norm of its update, measured from what was sent (in
    # float32 when the bound is far: within a float32 rounding, not bit for bit).
    for row, node in zip(accepted, (101, 102, 103), strict=True):
        norm = update_norm(updates[node], _sent(instructions[node]))
        assert float(row["update_norm"]) == pytest.approx(norm, rel=1e-6)
        assert 0 < norm < 1
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == 1
    assert rejected[0]["site"] == "bank-x"
    assert rejected[0]["phase"] == "train"
    assert "head.bias: shape (3,), expected (2,)" in rejected[0]["reason"]
    federated = [r for r in rows if r["site"] == "all"]
    assert [(r["phase"], r["status"], r["round"]) for r in federated] == [
        ("train", "aggregated", "2")
    ]
    assert float(federated[0]["lora_error"]) == pytest.approx(error)
    assert federated[0]["examples"] == "300"
    assert len(rows) == 5

    recorder = strategy.recorder
    assert sorted(recorder.sites) == ["bank-1", "bank-2", "bank-3"]
    assert recorder.sites["bank-2"].examples == 150
    assert recorder.sites["bank-2"].rounds_trained == 1
    assert recorder.exclusions == [
        {
            "round": 2,
            "site": "bank-x",
            "phase": "train",
            "status": "rejected",
            "reason": rejected[0]["reason"],
        }
    ]


def test_aggregate_train_needs_configure_train_first(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=1)
    with pytest.raises(RuntimeError, match="before configure_train"):
        strategy.aggregate_train(1, [])


def test_refused_and_failed_sites_are_recorded_and_round_still_aggregates(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [1, 2, 7, 8, 9])
    updates, replies = _honest_round(instructions, {1: 20, 2: 60})
    crashed = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
        'ClientAppActor.run()\x1b[39m (pid=7, ip=10.0.0.1)\n  File "ray_actor.py", line 65,'
        " in run\n\x1b[31mClientAppException\x1b[0m: \nException ClientAppException occurred."
        " Message: the site's process died during training (exit code 137)'>"
    )
    replies += [
        error_reply(7, REFUSED_BY_POLICY, "budget spent"),
        error_reply(8, SITE_MISCONFIGURED, "no data"),
        error_reply(9, 0, crashed),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    _assert_close(record_to_arrays(arrays), _reference([updates[1], updates[2]], [20, 60]))
    assert (metrics["refused"], metrics["failed"], metrics["rejected"]) == (1.0, 2.0, 0.0)
    statuses = {(r["site"], r["status"], r["reason"]) for r in _rows(tmp_path)}
    assert ("node-7", "refused", "budget spent") in statuses
    assert ("node-8", "failed", "no data") in statuses
    # Flower's remote traceback becomes the one sentence it carried.
    assert (
        "node-9",
        "failed",
        "the site's process died during training (exit code 137)",
    ) in statuses
    assert [r["reason"] for r in strategy.recorder.exclusions] == [
        "budget spent",
        "no data",
        "the site's process died during training (exit code 137)",
    ]


def test_a_silent_node_is_timed_out_and_the_round_aggregates_from_the_others(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    names = {11: "bank-1", 12: "bank-2", 13: "bank-3"}
    instructions = _configure(strategy, 1, [11, 12, 13], names=names)
    assert strategy.known_sites == names  # learnt from the introductions
    updates, replies = _honest_round(instructions, {11: 40, 12: 80})

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert metrics is not None
    _assert_close(record_to_arrays(arrays), _reference([updates[11], updates[12]], [40, 80]))
    assert metrics["timed-out"] == 1.0
    assert metrics["sites"] == 2.0
    assert strategy.adapter_round == 1
    rows = _rows(tmp_path)
    timed_out = [r for r in rows if r["status"] == "timed-out"]
    assert [(r["round"], r["site"], r["phase"], r["reason"]) for r in timed_out] == [
        ("1", "bank-3", "train", "no reply within 600 s")
    ]
    assert [r["status"] for r in rows if r["site"] == "all"] == ["aggregated"]
    assert strategy.recorder.exclusions[-1]["status"] == "timed-out"

    # Evaluation times out the silent nodes of its own round in the same way.
    evaluation = list(
        strategy.configure_evaluate(
            1,
            ArrayRecord(),
            ConfigRecord(),
            FakeGrid([11, 12, 13]),  # type: ignore[arg-type]
        )
    )
    answers = [
        _answer(m, None, eval_metrics(30, 0.4, 0.7))
        for m in evaluation
        if m.metadata.dst_node_id != 12
    ]
    result = strategy.aggregate_evaluate(1, answers)
    assert result is not None
    assert result["eval-accuracy"] == pytest.approx(0.7)
    timed_out = [r for r in _rows(tmp_path) if r["status"] == "timed-out"]
    assert [(r["site"], r["phase"]) for r in timed_out] == [
        ("bank-3", "train"),
        ("bank-2", "evaluate"),
    ]


def test_evaluation_times_out_the_nodes_its_own_round_asked(tmp_path: Path) -> None:
    """Not the nodes the training round asked: node 13 left after training, node 14
    joined for evaluation and stayed silent."""
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [11, 12, 13])
    _, replies = _honest_round(instructions, {11: 20, 12: 20, 13: 20})
    assert strategy.aggregate_train(1, replies)[0] is not None
    evaluation = list(
        strategy.configure_evaluate(
            1,
            ArrayRecord(),
            ConfigRecord(),
            FakeGrid([11, 12, 14]),  # type: ignore[arg-type]
        )
    )
    assert sorted(m.metadata.dst_node_id for m in evaluation) == [11, 12, 14]
    answers = [
        _answer(m, None, eval_metrics(30, 0.4, 0.7))
        for m in evaluation
        if m.metadata.dst_node_id != 14
    ]
    assert strategy.aggregate_evaluate(1, answers) is not None
    timed_out = [(r["site"], r["phase"]) for r in _rows(tmp_path) if r["status"] == "timed-out"]
    assert timed_out == [("node-14", "evaluate")]


def test_only_nodes_that_were_sent_a_message_can_time_out(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [1, 2])
    _, replies = _honest_round(instructions, {1: 20, 2: 20})
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["timed-out"] == 0.0
    assert all(r["status"] != "timed-out" for r in _rows(tmp_path))


def test_every_kind_of_bad_update_is_rejected_with_its_reason(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    nodes = list(range(1, 12))
    instructions = _configure(strategy, 1, nodes)
    sent = _sent(instructions[1])
    honest = {node: nudged(sent, seed=node) for node in nodes}

    nan = {**honest[3], "head.weight": honest[3]["head.weight"].copy()}
    nan["head.weight"][0, 5] = np.nan
    infinite = {**honest[4], B_NAME: np.full(SHAPES[B_NAME], np.inf, np.float32)}
    scaled = {name: sent[name] + 1000 * (honest[5][name] - sent[name]) for name in sent}
    bad: dict[int, tuple[Mapping[str, np.ndarray], Mapping[str, float | int], str]] = {
        3: (nan, train_metrics(40), "non-finite values in head.weight"),
        4: (infinite, train_metrics(40), f"non-finite values in {B_NAME}"),
        5: (scaled, train_metrics(40), "exceeds the bound"),
        6: (
            {**honest[6], "head.bias": np.zeros((3,), np.float32)},
            train_metrics(40),
            "head.bias: shape (3,), expected (2,)",
        ),
        7: (
            {k: v for k, v in honest[7].items() if k != "head.weight"},
            train_metrics(40),
            "missing tensors: head.weight",
        ),
        8: (
            {**honest[8], "extra": np.zeros(4096, np.float32)},
            train_metrics(40),
            "payload of ",
        ),
        9: (honest[9], train_metrics(5), "num-examples 5 outside the accepted range [20, "),
        10: (honest[10], train_metrics(10**8), "num-examples 1e+08 outside the accepted range"),
        11: (honest[11], train_metrics(40, steps=50), "reports 50 steps; 40 records allow"),
    }
    replies = [_answer(instructions[node], honest[node], train_metrics(30)) for node in (1, 2)]
    replies += [
        _answer(instructions[node], arrays, metrics) for node, (arrays, metrics, _) in bad.items()
    ]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert metrics is not None
    _assert_close(record_to_arrays(arrays), _reference([honest[1], honest[2]], [30, 30]))
    assert metrics["rejected"] == float(len(bad))
    assert metrics["sites"] == 2.0
    assert metrics["examples"] == 60.0
    rows = _rows(tmp_path)
    rejected = {r["site"]: r for r in rows if r["status"] == "rejected"}
    assert sorted(rejected) == sorted(f"node-{node}" for node in bad)
    for node, (_, _, fragment) in bad.items():
        row = rejected[f"node-{node}"]
        assert row["reason"].startswith("malformed update: "), row
        assert fragment in row["reason"], (node, row["reason"])
        assert row["phase"] == "train"
    assert "exceeds the limit of" in rejected["node-8"]["reason"]
    assert "update norm" in rejected["node-5"]["reason"]
    assert sorted(r["site"] for r in rows if r["status"] == "accepted") == ["node-1", "node-2"]
    assert sorted(strategy.recorder.sites) == ["node-1", "node-2"]


def test_the_scaled_updates_honest_twin_is_accepted(tmp_path: Path) -> None:
    """The norm bound separates the two: the same direction, 1000 times smaller, passes."""
    strategy = _strategy(tmp_path, min_sites=1)
    instructions = _configure(strategy, 1, [1])
    sent = _sent(instructions[1])
    twin = nudged(sent, seed=5)
    arrays, _ = strategy.aggregate_train(1, [_answer(instructions[1], twin, train_metrics(40))])
    assert arrays is not None
    _assert_close(record_to_arrays(arrays), twin)


def test_updates_are_validated_against_the_adapter_that_was_sent(tmp_path: Path) -> None:
    """Each round's updates are measured from what that round sent: two rounds that
    each move most of the way to the bound in one direction are both accepted, though
    round 2's updates are beyond the bound from the initial adapter."""
    strategy = _strategy(tmp_path, min_sites=2)
    bound = derived_norm_bound(_request(1), 1, 1.1, strategy.schema.elements)
    rng = np.random.default_rng(7)
    direction = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    length = math.sqrt(sum(float(np.sum(v**2)) for v in direction.values()))
    step = {name: 0.6 * bound * value / length for name, value in direction.items()}

    def moved(instruction: Message) -> dict[str, np.ndarray]:
        return {k: (v + step[k]).astype(np.float32) for k, v in _sent(instruction).items()}

    for server_round in (1, 2):
        instructions = _configure(strategy, server_round, [1, 2, 3])
        replies = [
            _answer(instructions[n], moved(instructions[n]), train_metrics(20)) for n in (1, 2)
        ]
        # A reply far from what was sent is still rejected.
        far = {k: v + 10.0 for k, v in _sent(instructions[3]).items()}
        replies.append(_answer(instructions[3], far, train_metrics(20)))
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert arrays is not None, strategy.recorder.exclusions
        assert metrics is not None
        assert metrics["sites"] == 2.0
        assert metrics["rejected"] == 1.0
        assert "exceeds the bound" in str(strategy.recorder.exclusions[-1]["reason"])
    assert update_norm(strategy.trained, INITIAL) > bound
    accepted = [float(r["update_norm"]) for r in _rows(tmp_path) if r["status"] == "accepted"]
    assert accepted == pytest.approx([0.6 * bound] * 4, rel=1e-4)


def test_fewer_good_replies_than_min_sites_keeps_the_global_adapter(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=3)
    instructions = _configure(strategy, 1, [1, 2, 150, 151])
    _, replies = _honest_round(instructions, {1: 40, 2: 60}, {1: "bank-1", 2: "bank-2"})
    replies.append(_answer(instructions[150], nudged(INITIAL, 5), None, "bank-9"))
    replies.append(error_reply(151, REFUSED_BY_POLICY, "cohort too small"))

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is None
    assert isinstance(metrics, MetricRecord)
    assert dict(metrics) == {
        "sites": 2.0,
        "rejected": 1.0,
        "failed": 0.0,
        "refused": 1.0,
        "timed-out": 0.0,
    }
    assert strategy.rounds_aggregated == 0
    assert strategy.adapter_round == 0
    _assert_equal(strategy.trained, INITIAL)
    _assert_equal(strategy.global_adapter, INITIAL)
    assert CheckpointStore(tmp_path / "checkpoints").latest_round() is None
    rows = _rows(tmp_path)
    federated = [r for r in rows if r["site"] == "all"]
    assert [(r["round"], r["phase"], r["status"]) for r in federated] == [("1", "train", "failed")]
    assert federated[0]["reason"] == (
        "2 usable update(s), fewer than the minimum of 3 sites; the previous global adapter is kept"
    )
    assert federated[0]["examples"] == "100"
    assert federated[0]["lora_error"] == ""
    assert strategy.recorder.failed_rounds == [1]
    assert sorted(r["status"] for r in rows if r["site"] != "all") == [
        "accepted",
        "accepted",
        "refused",
        "rejected",
    ]
    # The next round sends the adapter that was kept.
    again = _configure(strategy, 2, [1, 2, 150, 151])
    _assert_equal(_sent(again[1]), INITIAL)


def test_failed_round_does_not_undo_an_earlier_aggregate(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [101, 102])
    _, replies = _honest_round(instructions, {101: 20, 102: 30}, {101: "bank-1", 102: "bank-2"})
    first, _ = strategy.aggregate_train(1, replies)
    assert first is not None
    kept = {k: v.copy() for k, v in record_to_arrays(first).items()}

    _configure(strategy, 2, [101, 102])
    refused = [
        error_reply(101, REFUSED_BY_POLICY, "no"),
        error_reply(102, REFUSED_BY_POLICY, "no"),
    ]
    arrays, metrics = strategy.aggregate_train(2, refused)
    assert arrays is None
    assert metrics is not None
    assert (metrics["sites"], metrics["refused"]) == (0.0, 2.0)

    assert strategy.rounds_aggregated == 1
    assert strategy.adapter_round == 1
    assert strategy.checkpoints.latest_round() == 1
    _assert_equal(strategy.trained, kept)
    # The node learnt in round 1 is named in round 2's refusal.
    assert strategy.recorder.exclusions[-1]["site"] == "bank-2"
    assert [r["site"] for r in strategy.recorder.exclusions] == ["bank-1", "bank-2"]
    # Round 3 starts from round 1's aggregate.
    _assert_equal(_sent(_configure(strategy, 3, [101, 102])[101]), kept)


def test_reply_missing_train_metrics_is_rejected_not_fatal(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [1, 2, 190])
    _, replies = _honest_round(instructions, {1: 20, 2: 20})
    replies.append(reply(190, metrics={"num-examples": 25}, arrays=INITIAL, site="bank-q"))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    assert metrics["rejected"] == 1.0
    assert [(f["site"], f["phase"]) for f in strategy.recorder.exclusions] == [("bank-q", "train")]
    assert "reply lacks metric(s) epsilon" in str(strategy.recorder.exclusions[0]["reason"])


def test_negative_example_count_is_rejected_not_fatal(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [1, 2, 190])
    _, replies = _honest_round(instructions, {1: 20, 2: 20})
    replies.append(reply(190, metrics=train_metrics(-50), arrays=INITIAL, site="bank-q"))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [f["site"] for f in strategy.recorder.exclusions] == ["bank-q"]
    reason = strategy.recorder.exclusions[0]["reason"]
    assert reason == "num-examples must be a positive whole number"


# ------------------------------------------------------------- configure hooks ---


def test_configure_train_sends_the_round_request(tmp_path: Path) -> None:
    """Instructions carry the RoundRequest and the strategy's own adapter (not the arrays
    Flower's loop hands over); replies built from them are aggregated as usual."""
    strategy = _strategy(tmp_path, min_sites=3)
    grid = FakeGrid([11, 12, 13])
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop, before the hook
    messages = list(
        strategy.configure_train(
            3,
            arrays_to_record(_adapter(42)),
            ConfigRecord(),
            grid,  # type: ignore[arg-type]
        )
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert sorted(grid.introduced) == [11, 12, 13]  # unknown nodes are asked who they are
    request = RoundRequest.from_record(messages[0].content.config_records["config"])
    assert request == _request(3)
    assert request.freeze_lora_a is False
    _assert_equal(_sent(messages[0]), INITIAL)

    updates = [nudged(INITIAL, 20 + i) for i in range(3)]
    replies = [
        _answer(instruction, update, train_metrics(25))
        for instruction, update in zip(messages, updates, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(3, replies)
    assert arrays is not None
    _assert_close(record_to_arrays(arrays), _reference(updates, [1, 1, 1]))
    assert sorted(strategy.recorder.sites) == ["node-11", "node-12", "node-13"]

    # A node is not asked again while its question is in flight (no round waits for an
    # answer; server/introductions.py asks again after the introduction timeout). Its
    # name can still come with its replies.
    grid = FakeGrid([11, 12, 13])
    strategy.admit(grid)  # type: ignore[arg-type]
    strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    assert grid.introduced == []
    newcomer = FakeGrid([11, 12, 13, 14], {14: "bank-d"})
    strategy.admit(newcomer)  # type: ignore[arg-type]
    strategy.configure_train(5, ArrayRecord(), ConfigRecord(), newcomer)  # type: ignore[arg-type]
    assert newcomer.introduced == [14]
    assert strategy.known_sites[14] == "bank-d"


def test_configure_evaluate_sends_the_round_request(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=3)
    messages = list(
        strategy.configure_evaluate(
            2,
            arrays_to_record(_adapter(42)),
            ConfigRecord(),
            FakeGrid([11, 12, 13]),  # type: ignore[arg-type]
        )
    )
    assert len(messages) == 3
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    request = RoundRequest.from_record(messages[0].content.config_records["config"])
    assert request.server_round == 2
    _assert_equal(_sent(messages[0]), INITIAL)


# ------------------------------------------------------------------ evaluation ---


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
    # Evaluation does not touch the adapter; the first evaluation is the best so far,
    # credited to the round that made the adapter (0: nothing aggregated yet, the initial).
    assert strategy.rounds_aggregated == 0
    assert strategy.checkpoints.latest_round() is None
    assert strategy.best is not None
    assert (strategy.best.server_round, strategy.best.accuracy) == (
        0,
        pytest.approx(expected_accuracy),
    )
    _assert_equal(strategy.best.trained, INITIAL)


def test_aggregate_evaluate_without_good_replies(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    replies = [error_reply(4, REFUSED_BY_POLICY, "no", MessageType.EVALUATE)]
    assert strategy.aggregate_evaluate(1, replies) is None
    assert strategy.recorder.federated == {}
    assert strategy.best is None
    assert [r["status"] for r in _rows(tmp_path)] == ["refused"]


# -------------------------------------------------------------- rollback guard ---

NODES = (1, 2)


def _train(strategy: FedLoraStrategy, server_round: int) -> AdapterArrays:
    """One aggregated round from honest replies: a copy of the new global adapter."""
    instructions = _configure(strategy, server_round, NODES)
    _, replies = _honest_round({n: instructions[n] for n in NODES}, {1: 20, 2: 30}, scale=0.05)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return {k: v.copy() for k, v in record_to_arrays(arrays).items()}


def _evaluate(strategy: FedLoraStrategy, server_round: int, accuracy: float) -> None:
    messages = strategy.configure_evaluate(
        server_round,
        ArrayRecord(),
        ConfigRecord(),
        FakeGrid(NODES),  # type: ignore[arg-type]
    )
    answers = [_answer(m, None, eval_metrics(50, 1 - accuracy, accuracy)) for m in messages]
    result = strategy.aggregate_evaluate(server_round, answers)
    assert result is not None
    assert result["eval-accuracy"] == pytest.approx(accuracy)


def _rollback_rows(tmp_path: Path) -> list[dict[str, str]]:
    return [r for r in _rows(tmp_path) if r["phase"] == "rollback"]


def test_a_round_far_below_the_best_is_rolled_back(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    first = _train(strategy, 1)
    _evaluate(strategy, 1, 0.80)
    second = _train(strategy, 2)
    assert not np.array_equal(first[B_NAME], second[B_NAME])
    assert strategy.adapter_round == 2

    _evaluate(strategy, 2, 0.70)

    _assert_equal(strategy.trained, first)
    _assert_equal(strategy.global_adapter, first)
    assert strategy.adapter_round == 1
    assert strategy.best is not None
    assert (strategy.best.server_round, strategy.best.accuracy) == (1, pytest.approx(0.80))
    (row,) = _rollback_rows(tmp_path)
    assert (row["round"], row["site"], row["status"]) == ("2", "all", "rolled-back")
    assert "0.700" in row["reason"]
    assert "round 1" in row["reason"]
    assert strategy.recorder.rollbacks == [{"round": 2, "kept_round": 1, "reason": row["reason"]}]
    # Both checkpoints stay; the federated record keeps what was measured.
    assert strategy.checkpoints.latest_round() == 2
    assert strategy.recorder.federated[2]["accuracy"] == pytest.approx(0.70)

    # Round 3 starts from round 1's adapter, whatever Flower's loop hands over, and its
    # updates are checked against that adapter.
    instructions = _configure(strategy, 3, NODES, flower_arrays=arrays_to_record(second))
    for node in NODES:
        _assert_equal(_sent(instructions[node]), first)
    evaluation = strategy.configure_evaluate(
        3,
        arrays_to_record(second),
        ConfigRecord(),
        FakeGrid(NODES),  # type: ignore[arg-type]
    )
    for message in evaluation:
        _assert_equal(_sent(message), first)
    _, replies = _honest_round(instructions, {1: 20, 2: 30})
    _, metrics = strategy.aggregate_train(3, replies)
    assert metrics is not None
    assert metrics["rejected"] == 0.0
    assert strategy.adapter_round == 3


def test_a_rollback_after_a_failed_round_names_the_round_that_made_the_adapter(
    tmp_path: Path,
) -> None:
    """Round 2 fails to aggregate, so its evaluation scores round 1's adapter: the best
    is still round 1's, and a later rollback restores it under round 1's name."""
    strategy = _strategy(tmp_path, min_sites=2)
    first = _train(strategy, 1)
    _evaluate(strategy, 1, 0.80)

    _configure(strategy, 2, NODES)
    refused = [error_reply(node, REFUSED_BY_POLICY, "no") for node in NODES]
    arrays, _ = strategy.aggregate_train(2, refused)
    assert arrays is None
    assert strategy.adapter_round == 1
    _evaluate(strategy, 2, 0.85)  # round 1's adapter, measured again
    assert strategy.best is not None
    assert (strategy.best.server_round, strategy.best.accuracy) == (1, pytest.approx(0.85))
    _assert_equal(strategy.best.trained, first)

    _train(strategy, 3)
    assert strategy.adapter_round == 3
    _evaluate(strategy, 3, 0.70)

    _assert_equal(strategy.trained, first)
    assert strategy.adapter_round == 1
    assert strategy.best.server_round == 1
    (row,) = _rollback_rows(tmp_path)
    assert (row["round"], row["status"]) == ("3", "rolled-back")
    assert "round 1" in row["reason"]
    assert "round 2" not in row["reason"]
    assert strategy.recorder.rollbacks[-1]["kept_round"] == 1
    assert strategy.recorder.rollbacks[-1]["reason"] == row["reason"]
    # Round 4 starts from round 1's adapter.
    _assert_equal(_sent(_configure(strategy, 4, NODES)[1]), first)


def test_no_rollback_when_the_guard_is_disabled(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2, rollback=RollbackGuard(enabled=False))
    _train(strategy, 1)
    _evaluate(strategy, 1, 0.80)
    second = _train(strategy, 2)
    _evaluate(strategy, 2, 0.10)

    _assert_equal(strategy.trained, second)
    assert strategy.adapter_round == 2
    assert _rollback_rows(tmp_path) == []
    assert strategy.recorder.rollbacks == []


def test_a_drop_within_the_allowance_is_kept_and_the_best_stays_the_reference(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path, min_sites=2, rollback=RollbackGuard(max_accuracy_drop=0.03))
    first = _train(strategy, 1)
    _evaluate(strategy, 1, 0.80)
    second = _train(strategy, 2)
    _evaluate(strategy, 2, 0.78)  # 2 points down: within the allowance

    _assert_equal(strategy.trained, second)
    assert strategy.adapter_round == 2
    assert _rollback_rows(tmp_path) == []
    assert strategy.best is not None
    assert strategy.best.server_round == 1  # a lower round does not become the best

    # 0.76 is within 3 points of round 2's 0.78 but not of the best, round 1's 0.80.
    _train(strategy, 3)
    _evaluate(strategy, 3, 0.76)
    _assert_equal(strategy.trained, first)
    assert strategy.adapter_round == 1
    assert [r["round"] for r in _rollback_rows(tmp_path)] == ["3"]


def test_a_better_round_becomes_the_best(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    _train(strategy, 1)
    _evaluate(strategy, 1, 0.70)
    second = _train(strategy, 2)
    _evaluate(strategy, 2, 0.85)
    assert strategy.best is not None
    assert strategy.best.server_round == 2
    _assert_equal(strategy.best.trained, second)
    _train(strategy, 3)
    _evaluate(strategy, 3, 0.80)  # below 0.85 - 0.03
    _assert_equal(strategy.trained, second)
    assert strategy.adapter_round == 2


# ------------------------------------------------------------------ FFA-LoRA ---


def test_ffa_sends_b_only_rejects_a_and_keeps_the_frozen_a(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2, frozen=LORA_A)
    assert A_NAME not in strategy.trained
    assert A_NAME not in {name for name, _, _ in strategy.schema.entries}
    instructions = _configure(strategy, 1, [1, 2, 3])
    for message in instructions.values():
        sent = _sent(message)
        assert not any(is_lora_a(name) for name in sent)
        assert set(sent) == set(SHAPES) - {A_NAME}
        request = RoundRequest.from_record(message.content.config_records["config"])
        assert request.freeze_lora_a is True

    updates, replies = _honest_round(instructions, {1: 20, 2: 60}, scale=0.05)
    with_a = {**nudged(_sent(instructions[3]), seed=3), A_NAME: LORA_A[A_NAME] + 0.01}
    replies.append(_answer(instructions[3], with_a, train_metrics(40), "bank-3"))

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert metrics is not None
    assert A_NAME not in record_to_arrays(arrays)
    assert metrics["rejected"] == 1.0
    (refusal,) = strategy.recorder.exclusions
    assert refusal["site"] == "bank-3"
    assert refusal["reason"] == f"malformed update: unexpected tensors: {A_NAME}"

    adapter = strategy.global_adapter
    assert set(adapter) == set(SHAPES)
    np.testing.assert_array_equal(adapter[A_NAME], LORA_A[A_NAME])
    _assert_close(strategy.trained, _reference([updates[1], updates[2]], [20, 60]))
    # B·A is linear in B when A is shared: the aggregate is exactly the mean update.
    assert float(metrics["lora-product-error"]) <= 1e-6  # type: ignore[arg-type]
    (federated,) = [r for r in _rows(tmp_path) if r["site"] == "all"]
    assert float(federated["lora_error"]) <= 1e-6
    # The checkpoint is the whole adapter, frozen A included.
    saved = strategy.checkpoints.load(1)
    _assert_equal(saved, adapter)

    # Round 2 again sends B only, from the new aggregate.
    again = _configure(strategy, 2, [1, 2, 3])
    _assert_equal(_sent(again[1]), strategy.trained)


def test_plain_fedavg_with_a_per_site_has_a_product_error(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    instructions = _configure(strategy, 1, [1, 2])
    updates, replies = _honest_round(instructions, {1: 20, 2: 60}, scale=0.05)
    assert not np.array_equal(updates[1][A_NAME], updates[2][A_NAME])

    _, metrics = strategy.aggregate_train(1, replies)

    assert metrics is not None
    weights = np.array([20.0, 60.0]) / 80.0
    products = [updates[n][B_NAME].astype(np.float64) @ updates[n][A_NAME] for n in (1, 2)]
    target = weights[0] * products[0] + weights[1] * products[1]
    aggregate = strategy.trained
    combined = aggregate[B_NAME].astype(np.float64) @ aggregate[A_NAME].astype(np.float64)
    expected = float(np.linalg.norm(combined - target) / np.linalg.norm(target))
    error = float(metrics["lora-product-error"])  # type: ignore[arg-type]
    assert math.isfinite(error)
    assert error > 1e-4
    assert error == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------------- audit ---


def _audit_entries(tmp_path: Path) -> list[dict]:
    log = tmp_path / "audit" / "coordinator.jsonl"
    verification = verify_log(log, SIGNING_KEY.public_key())
    assert verification.ok, verification.findings
    return read_entries(log)[1:]  # without log-opened


def test_the_audit_log_records_every_reply_and_the_aggregate(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    names = {21: "bank-1", 22: "bank-2", 23: "bank-3", 24: "bank-4", 25: "bank-5"}
    instructions = _configure(strategy, 1, list(names), names=names)
    updates, replies = _honest_round(instructions, {21: 40, 22: 80}, names)
    malformed = {**nudged(INITIAL, 9), "head.bias": np.zeros((3,), np.float32)}
    replies += [
        _answer(instructions[23], malformed, train_metrics(60, epsilon=0.5), "bank-3"),
        error_reply(24, REFUSED_BY_POLICY, "site bank-4 refuses round 1: over budget"),
    ]  # bank-5 stays silent

    strategy.aggregate_train(1, replies)

    entries = _audit_entries(tmp_path)
    assert [e["event"] for e in entries] == [
        *["site-joined"] * 5,
        "round-started",
        "update-received",  # bank-3 rejected (failures are recorded first)
        "site-refused",
        "site-excluded",
        "update-received",
        "update-received",
        "aggregation-done",
    ]
    joined = entries[0]["data"]
    assert joined == {"site": "bank-1", "kind": "bank", "audit-key": "ed25519:21"}
    assert entries[5]["data"] == {"round": 1, "phase": "train", "sites": sorted(names.values())}
    rejected, refused, silent, *accepted = (e["data"] for e in entries[6:11])
    assert rejected["status"] == "rejected" and rejected["site"] == "bank-3"
    assert rejected["update_sha256"] == adapter_sha256(malformed)
    assert rejected["epsilon"] == 0.5 and rejected["examples"] == 60.0
    assert "head.bias: shape (3,), expected (2,)" in rejected["reason"]
    assert refused == {
        "round": 1,
        "site": "bank-4",
        "phase": "train",
        "status": "refused",
        "reason": "site bank-4 refuses round 1: over budget",
    }
    assert silent["site"] == "bank-5" and silent["status"] == "timed-out"
    for data, node in zip(accepted, (21, 22), strict=True):
        assert data["status"] == "accepted" and data["site"] == names[node]
        assert data["update_sha256"] == adapter_sha256(updates[node])
        assert data["epsilon"] == pytest.approx(0.01 * node)
        assert data["norm"] == pytest.approx(update_norm(updates[node], _sent(instructions[node])))
    aggregated = entries[-1]["data"]
    assert aggregated["adapter_sha256"] == adapter_sha256(strategy.global_adapter)
    assert aggregated["sites"] == ["bank-1", "bank-2"] and aggregated["examples"] == 120


def test_the_audit_log_records_failed_rounds_evaluations_and_rollbacks(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2, rollback=RollbackGuard(max_accuracy_drop=0.05))
    names = {31: "bank-1", 32: "bank-2"}
    for server_round, accuracy in ((1, 0.8), (2, 0.5)):
        instructions = _configure(strategy, server_round, list(names), names=names)
        _, replies = _honest_round(instructions, {31: 40, 32: 80}, names)
        strategy.aggregate_train(server_round, replies)
        evaluation = list(
            strategy.configure_evaluate(
                server_round,
                ArrayRecord(),
                ConfigRecord(),
                FakeGrid(list(names)),  # type: ignore[arg-type]
            )
        )
        answers = [
            _answer(m, None, eval_metrics(30, 0.4, accuracy), names[m.metadata.dst_node_id])
            for m in evaluation
        ]
        strategy.aggregate_evaluate(server_round, answers)
    instructions = _configure(strategy, 3, list(names), names=names)
    _, replies = _honest_round(instructions, {31: 40}, names)
    strategy.aggregate_train(3, replies)  # one of two: below min_sites

    entries = _audit_entries(tmp_path)
    evaluations = [e["data"] for e in entries if e["event"] == "evaluation"]
    assert [(d["round"], d["accuracy"], d["examples"]) for d in evaluations] == [
        (1, pytest.approx(0.8), 60),
        (2, pytest.approx(0.5), 60),
    ]
    rollback = next(e["data"] for e in entries if e["event"] == "rolled-back")
    assert rollback["round"] == 2 and rollback["to_round"] == 1
    assert rollback["adapter_sha256"] == adapter_sha256(strategy.global_adapter)
    round_one = next(
        e["data"] for e in entries if e["event"] == "aggregation-done" and e["data"]["round"] == 1
    )
    assert rollback["adapter_sha256"] == round_one["adapter_sha256"]
    failed = [e["data"] for e in entries if e["event"] == "round-failed"]
    assert len(failed) == 1 and failed[0]["round"] == 3
    assert "fewer than the minimum of 2" in failed[0]["reason"]
    assert [e["data"]["phase"] for e in entries if e["event"] == "round-started"] == [
        "train",
        "evaluate",
        "train",
        "evaluate",
        "train",
    ]


def test_float16_updates_aggregate_into_a_float32_global_and_are_hashed_as_sent(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path)
    half = _request(2).model_copy(update={"update_dtype": "float16"})
    strategy.request_for_round = lambda _round: half  # type: ignore[method-assign]
    names = {101: "bank-1", 102: "bank-2", 103: "bank-3"}
    instructions = _configure(strategy, 2, names)
    assert RoundRequest.from_record(instructions[101].content.config_records["config"]) == half
    updates, replies = {}, []
    for node, count in {101: 50, 102: 150, 103: 100}.items():
        moved = nudged(_sent(instructions[node]), seed=node, scale=0.01)
        updates[node] = {name: value.astype(np.float16) for name, value in moved.items()}
        replies.append(
            _answer(instructions[node], updates[node], train_metrics(count), names[node])
        )
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and metrics is not None and metrics["sites"] == 3.0
    got = record_to_arrays(arrays)
    assert all(value.dtype == np.float32 for value in got.values())
    expected = _reference(list(updates.values()), [50.0, 150.0, 100.0])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6)
    received = [e for e in _audit_entries(tmp_path) if e["event"] == "update-received"]
    assert sorted(e["data"]["update_sha256"] for e in received) == sorted(
        adapter_sha256(update) for update in updates.values()
    )
