"""CheckpointStore (safetensors per round) and RunRecorder (metrics.csv, exclusions)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

from server.checkpoint import CheckpointStore
from server.reporting import FEDERATED, METRIC_COLUMNS, RunRecorder, SiteRecord


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.lora_A": rng.standard_normal((4, 16)).astype(np.float32),
        "layer.0.lora_B": rng.standard_normal((16, 4)).astype(np.float32),
        "head.bias": rng.standard_normal((3,)).astype(np.float64),
        "empty": np.zeros((0, 5), np.float32),
    }


# ------------------------------------------------------------------ checkpoints ---


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt" / "task")
    arrays = _adapter(1)
    arrays["special"] = np.array([np.nan, -0.0, np.inf, 1e-45], np.float32)
    path = store.save(3, arrays)

    assert path == tmp_path / "ckpt" / "task" / "round-0003.safetensors"
    assert path.is_file()
    loaded = store.load(3)
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype, name
        assert loaded[name].shape == value.shape, name
        assert loaded[name].tobytes() == value.tobytes(), name


def test_non_contiguous_arrays_are_saved_by_value(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.save(1, {"t": base.T})
    np.testing.assert_array_equal(store.load(1)["t"], base.T)


def test_file_is_safetensors_not_pickle(tmp_path: Path) -> None:
    path = CheckpointStore(tmp_path).save(1, _adapter(2))
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.read_bytes()[8:9] == b"{"
    assert 0 < header_length < path.stat().st_size


def test_latest_round(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest_round() is None
    for server_round in (2, 10, 7):
        store.save(server_round, _adapter(server_round))
    assert store.latest_round() == 10
    # Round numbers sort as numbers, not as text, past the zero padding.
    store.save(12345, _adapter(0))
    assert store.latest_round() == 12345
    assert store.path(12345).name == "round-12345.safetensors"


def test_latest_round_ignores_other_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(4, _adapter(4))
    (tmp_path / "round-0009.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert store.latest_round() == 4


def test_save_is_atomic_and_overwrites(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _adapter(1))
    store.save(1, _adapter(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001.safetensors"]
    np.testing.assert_array_equal(store.load(1)["layer.0.lora_A"], _adapter(2)["layer.0.lora_A"])


def test_failed_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _adapter(1))
    with pytest.raises(SafetensorError, match="dtype"):
        store.save(1, {"bad": np.array(["text"])})
    np.testing.assert_array_equal(store.load(1)["layer.0.lora_A"], _adapter(1)["layer.0.lora_A"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001.safetensors"]


def test_load_missing_round_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CheckpointStore(tmp_path).load(1)


def test_zero_dimensional_tensor_keeps_its_shape(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"scale": np.array(0.5, np.float32)})
    assert store.load(1)["scale"].shape == ()


# --------------------------------------------------------------------- recorder ---


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _train(examples: int, epsilon: float) -> dict[str, float]:
    return {
        "num-examples": float(examples),
        "epsilon": epsilon,
        "epsilon-budget": 8.0,
        "delta": 1e-5,
    }


def test_header_is_written_once(tmp_path: Path) -> None:
    csv_path = tmp_path / "run" / "metrics.csv"
    recorder = RunRecorder("dicom-classification", csv_path)
    recorder.site_trained(1, "hospital-a", _train(30, 0.5))
    recorder.site_trained(2, "hospital-a", _train(30, 0.9))
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS)
    assert len(lines) == 3
    assert sum(line.startswith("task,") for line in lines) == 1


def test_a_second_recorder_appends_to_the_same_file(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    RunRecorder("a", csv_path).round_trained(1, 2, 0.0)
    RunRecorder("b", csv_path).round_trained(1, 0, None, "no usable update")
    rows = _rows(csv_path)
    assert [(r["task"], r["status"]) for r in rows] == [("a", "aggregated"), ("b", "failed")]


def test_site_trained_row_and_record(tmp_path: Path) -> None:
    recorder = RunRecorder("dicom-classification", tmp_path / "metrics.csv")
    recorder.site_trained(1, "hospital-a", _train(30, 0.5))
    recorder.site_trained(2, "hospital-a", _train(32, 0.9), 0.125)

    assert recorder.sites == {
        "hospital-a": SiteRecord(
            examples=32, epsilon=0.9, epsilon_budget=8.0, delta=1e-5, rounds_trained=2
        )
    }
    row = _rows(tmp_path / "metrics.csv")[1]
    assert row == {
        "task": "dicom-classification",
        "round": "2",
        "site": "hospital-a",
        "phase": "train",
        "status": "accepted",
        "examples": "32",
        "loss": "",  # training loss and accuracy are not released (not covered by ε)
        "accuracy": "",
        "epsilon": "0.9",
        "epsilon_budget": "8.0",
        "delta": "1e-05",
        "update_norm": "0.125",
        "lora_error": "",
        "reason": "",
    }
    # Without a norm (the default) the column stays empty.
    assert _rows(tmp_path / "metrics.csv")[0]["update_norm"] == ""


def test_site_evaluated_row(tmp_path: Path) -> None:
    recorder = RunRecorder("t", tmp_path / "metrics.csv")
    recorder.site_evaluated(
        3, "bank-a", {"num-examples": 40.0, "eval-loss": 0.5, "eval-accuracy": 0.75}
    )
    (row,) = _rows(tmp_path / "metrics.csv")
    assert (row["round"], row["site"], row["phase"], row["status"]) == (
        "3",
        "bank-a",
        "evaluate",
        "ok",
    )
    assert (row["examples"], row["loss"], row["accuracy"]) == ("40", "0.5", "0.75")
    assert row["epsilon"] == ""
    assert recorder.sites == {}


def test_site_failed_appends_to_exclusions_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = RunRecorder("t", tmp_path / "metrics.csv")
    with caplog.at_level(logging.WARNING, logger="fedlora.rounds"):
        recorder.site_failed(2, "bank-b", "train", "refused", "privacy budget spent")
        recorder.site_failed(2, "bank-c", "evaluate", "rejected", "bad update")
    assert recorder.exclusions == [
        {
            "round": 2,
            "site": "bank-b",
            "phase": "train",
            "status": "refused",
            "reason": "privacy budget spent",
        },
        {
            "round": 2,
            "site": "bank-c",
            "phase": "evaluate",
            "status": "rejected",
            "reason": "bad update",
        },
    ]
    rows = _rows(tmp_path / "metrics.csv")
    assert [(r["site"], r["phase"], r["status"], r["reason"]) for r in rows] == [
        ("bank-b", "train", "refused", "privacy budget spent"),
        ("bank-c", "evaluate", "rejected", "bad update"),
    ]
    assert rows[0]["examples"] == ""
    assert "bank-b refused" in caplog.text
    assert "privacy budget spent" in caplog.text


def test_reason_with_commas_and_newlines_survives_csv(tmp_path: Path) -> None:
    recorder = RunRecorder("t", tmp_path / "metrics.csv")
    reason = 'missing tensors: a, b, c\nsecond line "quoted"'
    recorder.site_failed(1, "s", "train", "rejected", reason)
    assert _rows(tmp_path / "metrics.csv")[0]["reason"] == reason


def test_round_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = RunRecorder("t", tmp_path / "metrics.csv")
    recorder.round_trained(1, 3, 0.25)
    recorder.round_trained(2, 1, None, "1 usable update(s), fewer than the minimum of 2 sites")
    with caplog.at_level(logging.INFO, logger="fedlora.rounds"):
        recorder.round_evaluated(2, loss=0.4, accuracy=0.8, examples=120)

    assert recorder.federated == {2: {"loss": 0.4, "accuracy": 0.8}}
    rows = _rows(tmp_path / "metrics.csv")
    assert [(r["round"], r["site"], r["phase"], r["status"]) for r in rows] == [
        ("1", FEDERATED, "train", "aggregated"),
        ("2", FEDERATED, "train", "failed"),
        ("2", FEDERATED, "evaluate", "ok"),
    ]
    assert (rows[0]["examples"], rows[0]["lora_error"], rows[0]["reason"]) == ("3", "0.25", "")
    assert (rows[1]["examples"], rows[1]["lora_error"]) == ("1", "")
    assert rows[1]["reason"] == "1 usable update(s), fewer than the minimum of 2 sites"
    assert recorder.failed_rounds == [2]
    assert (rows[2]["examples"], rows[2]["loss"], rows[2]["accuracy"]) == ("120", "0.4", "0.8")
    (record,) = [r for r in caplog.records if r.name == "fedlora.rounds"]
    assert record.fedlora_task == "t"  # type: ignore[attr-defined]
    assert record.fedlora_round == 2  # type: ignore[attr-defined]
    assert record.accuracy == 0.8  # type: ignore[attr-defined]


def test_round_trained_failure_defaults_to_none(tmp_path: Path) -> None:
    recorder = RunRecorder("t", tmp_path / "metrics.csv")
    recorder.round_trained(4, 80, 0.0)
    (row,) = _rows(tmp_path / "metrics.csv")
    assert (row["status"], row["lora_error"], row["reason"]) == ("aggregated", "0.0", "")
    assert recorder.failed_rounds == []


def test_rolled_back_row_and_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = RunRecorder("t", tmp_path / "metrics.csv")
    reason = "federated accuracy 0.700 is more than 0.030 below the best so far"
    recorder.rolled_back(5, 3, reason)
    assert recorder.rollbacks == [{"round": 5, "kept_round": 3, "reason": reason}]
    (row,) = _rows(tmp_path / "metrics.csv")
    assert row == {
        "task": "t",
        "round": "5",
        "site": FEDERATED,
        "phase": "rollback",
        "status": "rolled-back",
        "examples": "",
        "loss": "",
        "accuracy": "",
        "epsilon": "",
        "epsilon_budget": "",
        "delta": "",
        "update_norm": "",
        "lora_error": "",
        "reason": reason,
    }
    assert recorder.failed_rounds == []
