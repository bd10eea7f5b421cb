"""FedLoraStrategy's resume: the state it saves after a round, a fresh strategy carrying
on from it bit for bit, the hooks numbering rounds after the resumed one, and the nodes
of other tasks left out of this task's rounds. Fake Grid, hand-built replies, no network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.adapters import AdapterArrays, adapter_sha256, arrays_to_record, record_to_arrays
from common.audit.log import AuditLog
from common.config import FederationConfig, RollbackGuard, UpdateValidation
from common.errors import ConfigError
from common.protocol import AUDIT_KEY, SITE_ID_KEY, RoundRequest
from server.aggregation import fedavg
from server.audit import COORDINATOR, CoordinatorAudit
from server.checkpoint import CheckpointStore, RunState
from server.reporting import RunRecorder
from server.strategy import FedLoraStrategy
from tests.unit.server.replies import eval_metrics, nudged, train_metrics
from tests.unit.server.test_strategy import FakeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")

TASK = "tabular-classification"
OTHER_TASK = "dicom-classification"
A_NAME = "l0.q.lora_A.weight"
B_NAME = "l0.q.lora_B.weight"
SHAPES = {A_NAME: (4, 16), B_NAME: (64, 4), "head.weight": (2, 64), "head.bias": (2,)}
FEDERATION = FederationConfig(
    task=TASK, base_model=Path("/m"), rounds=6, update_precision="float32"
)
SIGNING_KEY = Ed25519PrivateKey.generate()
NODES = (1, 2)
EXAMPLES = {1: 20, 2: 30}


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


INITIAL = _adapter(0)
FROZEN_A = {A_NAME: INITIAL[A_NAME]}


class Requests:
    """request_for_round that remembers the rounds it was asked for."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def __call__(self, server_round: int) -> RoundRequest:
        self.rounds.append(server_round)
        return RoundRequest.for_round(FEDERATION, "f" * 64, server_round, ("q_proj",))


def _strategy(
    run_dir: Path, *, frozen: AdapterArrays | None = None, requests: Requests | None = None
) -> FedLoraStrategy:
    """The strategy of one run directory; a second call builds the resumed process's."""
    return FedLoraStrategy(
        request_for_round=requests or Requests(),
        initial=INITIAL,
        frozen=frozen or {},
        aggregator=fedavg,
        validation=UpdateValidation(),
        min_sites=len(NODES),
        rollback=RollbackGuard(max_accuracy_drop=0.03),
        round_timeout=600.0,
        recorder=RunRecorder(TASK, run_dir / "metrics.csv"),
        checkpoints=CheckpointStore(run_dir / "checkpoints" / TASK),
        audit=CoordinatorAudit(
            AuditLog(run_dir / "audit" / "coordinator.jsonl", COORDINATOR, SIGNING_KEY)
        ),
        run_id="run-7",
        config_sha256="c" * 64,
    )


def _grid(nodes: Iterable[int], sites: Mapping[int, Mapping[str, str]] | None = None) -> FakeGrid:
    """The strategy tests' grid; ``sites``: node -> what its site says of itself."""
    return FakeGrid(nodes, details=sites)


def _site(name: str, task: str | None = TASK) -> dict[str, str]:
    details = {SITE_ID_KEY: name, "kind": "bank", AUDIT_KEY: f"ed25519:{name}"}
    if task is not None:
        details["task"] = task
    return details


def _answer(
    instruction: Message,
    arrays: Mapping[str, np.ndarray] | None,
    metrics: Mapping[str, float | int],
) -> Message:
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays is not None:
        content["arrays"] = arrays_to_record(arrays)
    return Message(content, reply_to=instruction)


def _sent(instruction: Message) -> AdapterArrays:
    return record_to_arrays(instruction.content.array_records["arrays"])


def _honest_replies(instructions: Iterable[Message], seed: int) -> list[Message]:
    """Each node's small honest move from what it was sent, with its usual count."""
    replies = []
    for message in instructions:
        node = message.metadata.dst_node_id
        update = nudged(_sent(message), seed=seed + node, scale=0.05)
        replies.append(_answer(message, update, train_metrics(EXAMPLES[node])))
    return replies


def _round(strategy: FedLoraStrategy, flower_round: int, accuracy: float, seed: int = 0) -> None:
    """One whole round as Flower's loop drives it (numbered as the loop counts)."""
    grid = _grid(NODES)
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    instructions = strategy.configure_train(
        flower_round,
        ArrayRecord(),
        ConfigRecord(),
        grid,  # type: ignore[arg-type]
    )
    arrays, _ = strategy.aggregate_train(flower_round, _honest_replies(instructions, seed))
    assert arrays is not None, strategy.recorder.exclusions
    evaluation = strategy.configure_evaluate(
        flower_round,
        ArrayRecord(),
        ConfigRecord(),
        _grid(NODES),  # type: ignore[arg-type]
    )
    answers = [_answer(m, None, eval_metrics(50, 1 - accuracy, accuracy)) for m in evaluation]
    assert strategy.aggregate_evaluate(flower_round, answers) is not None


def _assert_identical(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


def _three_rounds_with_a_rollback(
    run_dir: Path, frozen: AdapterArrays | None = None
) -> FedLoraStrategy:
    """Rounds 1-3: round 2 is the best, round 3 falls too far and is rolled back, so the
    global adapter (round 2's) is neither the latest checkpoint nor the initial one."""
    strategy = _strategy(run_dir, frozen=frozen)
    strategy.save_state(0)
    _round(strategy, 1, 0.70, seed=10)
    _round(strategy, 2, 0.80, seed=20)
    _round(strategy, 3, 0.60, seed=30)
    assert strategy.adapter_round == 2
    assert strategy.best is not None
    assert strategy.best.server_round == 2
    assert strategy.recorder.rollbacks[-1]["round"] == 3
    return strategy


# --------------------------------------------------------------------- save_state ---


def test_save_state_names_the_global_adapter_by_its_hash(tmp_path: Path) -> None:
    strategy = _three_rounds_with_a_rollback(tmp_path)
    strategy.save_state(3)  # aggregate_evaluate did this already; once more is the same

    state = strategy.checkpoints.load_state()
    assert state.adapter_sha256 == adapter_sha256(strategy.global_adapter)
    assert state.completed_round == 3
    assert state.adapter_round == 2
    assert state.rounds_aggregated == 3
    assert (state.run_id, state.config_sha256) == ("run-7", "c" * 64)
    assert state.best is not None
    assert (state.best.round, state.best.accuracy) == (2, pytest.approx(0.80))
    assert state.best_sha256 == adapter_sha256(strategy.global_adapter)
    assert state.declared_examples == {"node-1": 20.0, "node-2": 30.0}
    # The checkpoint the state names holds exactly that adapter.
    _assert_identical(strategy.checkpoints.load(state.adapter_round), strategy.global_adapter)


def test_each_round_ends_with_its_state_saved(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    _round(strategy, 1, 0.70, seed=10)
    state = strategy.checkpoints.load_state()
    assert state.completed_round == 1
    assert state.adapter_round == 1
    assert state.adapter_sha256 == adapter_sha256(strategy.global_adapter)
    assert state.adapter_evaluation is not None
    assert state.adapter_evaluation.accuracy == pytest.approx(0.70)


def test_save_state_zero_writes_the_initial_checkpoint(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    assert strategy.checkpoints.latest_round() is None

    strategy.save_state(0)

    path = strategy.checkpoints.path(0)
    assert path.name == "round-0000.safetensors"
    assert path.is_file()
    _assert_identical(strategy.checkpoints.load(0), INITIAL)
    state = strategy.checkpoints.load_state()
    assert (state.completed_round, state.adapter_round, state.rounds_aggregated) == (0, 0, 0)
    assert state.adapter_sha256 == adapter_sha256(INITIAL)
    assert state.best is None
    assert state.best_sha256 is None


def test_save_state_after_round_zero_does_not_rewrite_the_initial_checkpoint(
    tmp_path: Path,
) -> None:
    strategy = _strategy(tmp_path)
    strategy.save_state(0)
    _round(strategy, 1, 0.70, seed=10)
    strategy.save_state(1)
    _assert_identical(strategy.checkpoints.load(0), INITIAL)


# ------------------------------------------------------------------------- resume ---


@pytest.mark.parametrize("ffa", [False, True], ids=["fedavg", "frozen-a"])
def test_a_fresh_strategy_resumes_bit_identical(tmp_path: Path, ffa: bool) -> None:
    frozen = FROZEN_A if ffa else None
    before = _three_rounds_with_a_rollback(tmp_path, frozen)
    state = before.checkpoints.load_state()

    after = _strategy(tmp_path, frozen=frozen)
    after.resume(state)

    _assert_identical(after.global_adapter, before.global_adapter)
    _assert_identical(after.trained, before.trained)
    assert after.adapter_round == before.adapter_round == 2
    assert after.rounds_aggregated == before.rounds_aggregated == 3
    assert after.rounds_before == state.completed_round == 3
    assert after.declared_examples == before.declared_examples
    assert after.adapter_evaluation == pytest.approx(before.adapter_evaluation)
    assert before.best is not None
    assert after.best is not None
    assert after.best.server_round == before.best.server_round
    assert after.best.accuracy == before.best.accuracy
    assert after.best.loss == before.best.loss
    _assert_identical(after.best.trained, before.best.trained)
    assert after.recorder.federated == before.recorder.federated
    assert after.recorder.sites == before.recorder.sites
    assert after.recorder.rollbacks == before.recorder.rollbacks


def test_resume_with_a_best_other_than_the_current_adapter(tmp_path: Path) -> None:
    """Round 1 is the best; round 2 falls within the allowance and is kept: the state
    names two checkpoints, and both come back."""
    before = _strategy(tmp_path)
    before.save_state(0)
    _round(before, 1, 0.80, seed=10)
    _round(before, 2, 0.79, seed=20)
    assert before.adapter_round == 2
    assert before.best is not None
    assert before.best.server_round == 1

    after = _strategy(tmp_path)
    after.resume(before.checkpoints.load_state())

    _assert_identical(after.global_adapter, before.global_adapter)
    assert after.best is not None
    assert (after.best.server_round, after.best.accuracy) == (1, before.best.accuracy)
    _assert_identical(after.best.trained, before.best.trained)
    assert not np.array_equal(after.best.trained[B_NAME], after.trained[B_NAME])


def test_resume_from_round_zero_keeps_the_initial_adapter(tmp_path: Path) -> None:
    _strategy(tmp_path).save_state(0)
    after = _strategy(tmp_path)
    after.resume(CheckpointStore(tmp_path / "checkpoints" / TASK).load_state())
    _assert_identical(after.global_adapter, INITIAL)
    assert (after.rounds_before, after.adapter_round, after.rounds_aggregated) == (0, 0, 0)
    assert after.best is None


def test_resumed_hooks_number_rounds_after_the_completed_one(tmp_path: Path) -> None:
    before = _three_rounds_with_a_rollback(tmp_path)
    state = before.checkpoints.load_state()
    requests = Requests()
    after = _strategy(tmp_path, requests=requests)
    after.resume(state)
    run_round = after.rounds_before + 1
    assert run_round == 4

    # Flower's loop counts from 1 again in the resumed process.
    grid = _grid(NODES)
    after.admit(grid)  # type: ignore[arg-type]  # the round loop
    instructions = list(
        after.configure_train(
            1,
            ArrayRecord(),
            ConfigRecord(),
            grid,  # type: ignore[arg-type]
        )
    )
    assert requests.rounds == [run_round]
    for message in instructions:
        request = RoundRequest.from_record(message.content.config_records["config"])
        assert request.server_round == run_round
        # The resumed global adapter is what travels.
        _assert_identical(_sent(message), before.trained)

    arrays, metrics = after.aggregate_train(1, _honest_replies(instructions, seed=40))
    assert arrays is not None
    assert metrics is not None
    assert metrics["rejected"] == 0.0  # same declared counts as before the crash
    assert after.adapter_round == run_round
    assert after.checkpoints.latest_round() == run_round
    assert after.rounds_aggregated == 4

    evaluation = list(
        after.configure_evaluate(
            1,
            ArrayRecord(),
            ConfigRecord(),
            _grid(NODES),  # type: ignore[arg-type]
        )
    )
    assert requests.rounds == [run_round, run_round]
    assert {
        RoundRequest.from_record(m.content.config_records["config"]).server_round
        for m in evaluation
    } == {run_round}
    answers = [_answer(m, None, eval_metrics(50, 0.1, 0.9)) for m in evaluation]
    assert after.aggregate_evaluate(1, answers) is not None
    assert sorted(after.recorder.federated) == [1, 2, 3, run_round]
    assert after.checkpoints.load_state().completed_round == run_round


def test_resume_refuses_a_checkpoint_changed_after_the_state(tmp_path: Path) -> None:
    before = _three_rounds_with_a_rollback(tmp_path)
    state = before.checkpoints.load_state()
    changed = {name: value.copy() for name, value in before.global_adapter.items()}
    changed[B_NAME][0, 0] = np.nextafter(changed[B_NAME][0, 0], np.float32(np.inf))
    before.checkpoints.save(state.adapter_round, changed)

    after = _strategy(tmp_path)
    with pytest.raises(ConfigError, match="does not match"):
        after.resume(state)
    _assert_identical(after.global_adapter, INITIAL)
    assert after.rounds_before == 0


def test_resume_refuses_a_changed_best_checkpoint(tmp_path: Path) -> None:
    before = _strategy(tmp_path)
    before.save_state(0)
    _round(before, 1, 0.80, seed=10)
    _round(before, 2, 0.79, seed=20)
    state = before.checkpoints.load_state()
    assert state.best is not None
    assert state.best.round == 1 != state.adapter_round
    before.checkpoints.save(1, _adapter(5))

    with pytest.raises(ConfigError, match="round 1"):
        _strategy(tmp_path).resume(state)


def test_resume_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    before = _three_rounds_with_a_rollback(tmp_path)
    state = before.checkpoints.load_state()
    before.checkpoints.path(state.adapter_round).unlink()
    with pytest.raises(ConfigError, match="missing"):
        _strategy(tmp_path).resume(state)


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path: Path) -> None:
    """A checkpoint that matches its hash, but whose tensors are not this run's."""
    store = CheckpointStore(tmp_path / "checkpoints" / TASK)
    _strategy(tmp_path).save_state(0)
    state = store.load_state()
    other = {**INITIAL, "extra.weight": np.zeros((2, 2), np.float32)}
    store.save(0, other)
    moved = RunState.model_validate({**state.model_dump(), "adapter_sha256": adapter_sha256(other)})
    with pytest.raises(ConfigError, match="do not fit"):
        _strategy(tmp_path).resume(moved)


# ------------------------------------------------------------- sites of this task ---


def test_nodes_of_another_task_are_left_out(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    strategy.min_sites = 1
    nodes = [1, 2, 3, 4]
    grid = _grid(
        nodes,
        {
            1: _site("bank-1"),
            2: _site("hospital-2", OTHER_TASK),
            4: _site("bank-4", task=None),  # introduced itself without a task
        },
    )  # node 3 does not answer: unknown

    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    instructions = list(
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    )

    assert sorted(grid.introduced) == nodes
    assert sorted(m.metadata.dst_node_id for m in instructions) == [1, 3, 4]
    assert strategy.known_sites == {1: "bank-1", 2: "hospital-2", 4: "bank-4"}
    assert strategy.sites_of_this_task() == {1: "bank-1", 4: "bank-4"}

    evaluation = list(
        strategy.configure_evaluate(
            1,
            ArrayRecord(),
            ConfigRecord(),
            _grid(nodes),  # type: ignore[arg-type]
        )
    )
    assert sorted(m.metadata.dst_node_id for m in evaluation) == [1, 3, 4]


def test_a_node_left_out_is_not_timed_out(tmp_path: Path) -> None:
    """The other task's node was never asked, so its silence is no exclusion."""
    strategy = _strategy(tmp_path)
    grid = _grid([1, 2, 3], {1: _site("bank-1"), 2: _site("bank-2"), 3: _site("h-3", "x")})
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    instructions = list(
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    )
    replies = [
        _answer(m, nudged(_sent(m), seed=m.metadata.dst_node_id), train_metrics(25))
        for m in instructions
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    assert metrics["timed-out"] == 0.0
    assert strategy.recorder.exclusions == []
    assert sorted(strategy.recorder.sites) == ["bank-1", "bank-2"]
