"""CheckpointStore's resume side: the run's state file (RunState as JSON) and checkpoints
that are only handed back when they hash to what the state recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.adapters import adapter_sha256
from common.errors import ConfigError
from server.checkpoint import STATE_FILE, CheckpointStore, EvaluatedAdapter, RunState


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "l0.q.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "l0.q.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "head.bias": rng.standard_normal((3,)).astype(np.float64),
    }


def _state(**changes: object) -> RunState:
    values: dict[str, object] = {
        "run_id": "run-42",
        "config_sha256": "c" * 64,
        "completed_round": 3,
        "adapter_round": 2,
        "adapter_sha256": "a" * 64,
        "rounds_aggregated": 2,
        "best": EvaluatedAdapter(round=2, accuracy=0.8125, loss=0.4375),
        "best_sha256": "b" * 64,
        "adapter_evaluation": EvaluatedAdapter(round=3, accuracy=0.75, loss=0.5),
        "declared_examples": {"bank-1": 120.0, "bank-2": 64.0},
        "recorder": {
            "sites": {"bank-1": {"examples": 120, "epsilon": 0.5}},
            "federated": {"2": {"loss": 0.4375, "accuracy": 0.8125}},
            "failed_rounds": [1],
        },
    }
    values.update(changes)
    return RunState.model_validate(values)


# ------------------------------------------------------------------------ state ---


def test_state_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints" / "task")
    state = _state()
    store.save_state(state)

    assert store.state_path == tmp_path / "checkpoints" / "task" / STATE_FILE
    assert store.state_path.is_file()
    loaded = CheckpointStore(tmp_path / "checkpoints" / "task").load_state()
    assert loaded == state
    assert loaded.best == EvaluatedAdapter(round=2, accuracy=0.8125, loss=0.4375)
    assert loaded.recorder["federated"] == {"2": {"loss": 0.4375, "accuracy": 0.8125}}
    # Plain JSON on disk (no pickle), readable by anyone who inspects the run.
    assert json.loads(store.state_path.read_text())["completed_round"] == 3


def test_state_round_trip_without_a_best_adapter(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = _state(
        completed_round=0,
        adapter_round=0,
        rounds_aggregated=0,
        best=None,
        best_sha256=None,
        adapter_evaluation=None,
        declared_examples={},
        recorder={},
    )
    store.save_state(state)
    assert store.load_state() == state


def test_a_later_state_replaces_the_earlier_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save_state(_state(completed_round=1))
    store.save_state(_state(completed_round=2))
    assert store.load_state().completed_round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_load_state_without_a_file_says_nothing_to_resume(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "never-started")
    with pytest.raises(ConfigError, match="nothing to resume") as info:
        store.load_state()
    assert str(store.state_path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param('{"run_id": "run-42", "completed_round": ', id="truncated"),
        pytest.param("[1, 2, 3]", id="not-an-object"),
        pytest.param("{}", id="fields-missing"),
    ],
)
def test_damaged_state_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    store = CheckpointStore(tmp_path)
    store.save_state(_state())
    store.state_path.write_text(text)
    with pytest.raises(ConfigError, match="damaged") as info:
        store.load_state()
    assert str(store.state_path) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("completed_round", -1), ("adapter_sha256", None), ("surprise", 1)],
)
def test_state_with_a_bad_field_is_a_config_error(tmp_path: Path, key: str, value: object) -> None:
    store = CheckpointStore(tmp_path)
    store.save_state(_state())
    document = json.loads(store.state_path.read_text())
    document[key] = value
    store.state_path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="damaged"):
        store.load_state()


def test_state_file_damaged_into_non_utf8_bytes_is_a_config_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save_state(_state())
    data = bytearray(store.state_path.read_bytes())
    data[10] = 0xFF  # one byte flipped on disk
    store.state_path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged"):
        store.load_state()


# ----------------------------------------------------------- verified checkpoints ---


def test_load_verified_returns_the_arrays_when_the_hash_matches(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    arrays = _adapter(1)
    store.save(2, arrays)

    loaded = store.load_verified(2, adapter_sha256(arrays))

    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype, name
        assert np.array_equal(loaded[name], value), name
    assert adapter_sha256(loaded) == adapter_sha256(arrays)


def test_load_verified_refuses_another_rounds_hash(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _adapter(1))
    store.save(2, _adapter(2))
    with pytest.raises(ConfigError, match="does not match"):
        store.load_verified(2, adapter_sha256(_adapter(1)))


def test_load_verified_refuses_a_tensor_with_one_byte_changed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    arrays = _adapter(3)
    path = store.save(4, arrays)
    recorded = adapter_sha256(arrays)

    # Flip one byte of the tensor data (the end of the file), leaving the header intact.
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.load(4).keys() == arrays.keys()  # still a readable safetensors file

    with pytest.raises(ConfigError, match="round 4") as info:
        store.load_verified(4, recorded)
    assert "changed or damaged" in str(info.value)
    assert str(path) in str(info.value)


def test_load_verified_refuses_a_changed_dtype(tmp_path: Path) -> None:
    """Same values, another dtype: not the adapter the state names."""
    store = CheckpointStore(tmp_path)
    arrays = _adapter(5)
    recorded = adapter_sha256(arrays)
    store.save(1, {name: value.astype(np.float64) for name, value in arrays.items()})
    with pytest.raises(ConfigError, match="does not match"):
        store.load_verified(1, recorded)


def test_load_verified_of_a_missing_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(1, _adapter(1))
    with pytest.raises(ConfigError, match="missing") as info:
        store.load_verified(2, adapter_sha256(_adapter(1)))
    assert "round 2" in str(info.value)
    assert str(store.path(2)) in str(info.value)


def test_load_verified_of_a_truncated_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    arrays = _adapter(6)
    path = store.save(1, arrays)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ConfigError):
        store.load_verified(1, adapter_sha256(arrays))


def test_only_one_process_at_a_time_runs_a_task_in_a_directory(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run" / "checkpoints" / "task")
    store.directory.mkdir(parents=True)
    held = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
            str(store.directory / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert held.stdout is not None
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another process"), store.exclusive():
            pass
    finally:
        held.kill()
        held.wait()
    with store.exclusive():  # free again once the other process is gone
        pass
