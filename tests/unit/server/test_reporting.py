"""RunRecorder.snapshot / restore: a resumed run reports the whole run, and metrics.csv
loses exactly the rows of the rounds the crash cut short (they are run again)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest

from server.reporting import FEDERATED, METRIC_COLUMNS, RunRecorder, SiteRecord

TASK = "tabular-classification"
OTHER = "dicom-classification"


def _train(examples: int, epsilon: float) -> dict[str, float]:
    return {
        "num-examples": float(examples),
        "epsilon": epsilon,
        "epsilon-budget": 8.0,
        "delta": 1e-5,
    }


def _evaluation(examples: int, loss: float, accuracy: float) -> dict[str, float]:
    return {"num-examples": float(examples), "eval-loss": loss, "eval-accuracy": accuracy}


def _play_round(recorder: RunRecorder, server_round: int) -> None:
    """Every kind of row and figure a round can leave behind."""
    recorder.site_trained(server_round, "bank-a", _train(120, 0.25 * server_round), 0.5)
    recorder.site_trained(server_round, "bank-b", _train(80, 0.125 * server_round))
    recorder.site_failed(
        server_round, "bank-c", "train", "rejected", f"round {server_round}: bad, very bad\nx"
    )
    if server_round == 2:
        recorder.round_trained(server_round, 0, None, "fewer than the minimum")
    else:
        recorder.round_trained(server_round, 200, 0.001 * server_round)
    recorder.site_evaluated(server_round, "bank-a", _evaluation(30, 0.5, 0.7))
    recorder.round_evaluated(server_round, 0.5 - 0.01 * server_round, 0.7 + 0.01 * server_round, 60)
    if server_round == 3:
        recorder.rolled_back(server_round, 1, "fell too far")


def _figures(recorder: RunRecorder) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "sites": recorder.sites,
            "federated": recorder.federated,
            "exclusions": recorder.exclusions,
            "rollbacks": recorder.rollbacks,
            "failed_rounds": recorder.failed_rounds,
            "lora_errors": recorder.lora_errors,
        }
    )


def _through_state_file(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run reads back: the snapshot went into state.json as JSON."""
    loaded = json.loads(json.dumps(snapshot))
    assert isinstance(loaded, dict)
    return loaded


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == METRIC_COLUMNS
        return list(reader)


def test_snapshot_survives_json_and_restores_every_figure(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    recorder = RunRecorder(TASK, csv_path)
    for server_round in (1, 2, 3):
        _play_round(recorder, server_round)
    expected = _figures(recorder)
    snapshot = _through_state_file(recorder.snapshot())

    resumed = RunRecorder(TASK, csv_path)
    resumed.restore(snapshot, 3)

    assert _figures(resumed) == expected
    assert resumed.sites == {
        "bank-a": SiteRecord(120, 0.75, 8.0, 1e-5, 3),
        "bank-b": SiteRecord(80, 0.375, 8.0, 1e-5, 3),
    }
    assert all(isinstance(record, SiteRecord) for record in resumed.sites.values())
    # Round numbers are numbers again, though JSON keys are text.
    assert sorted(resumed.federated) == [1, 2, 3]
    assert sorted(resumed.lora_errors) == [1, 3]
    assert resumed.failed_rounds == [2]
    assert resumed.rollbacks == [{"round": 3, "kept_round": 1, "reason": "fell too far"}]
    # Nothing after round 3 was written, so the CSV keeps every row.
    assert len(_rows(csv_path)) == 3 * 6 + 1


def test_restore_drops_this_tasks_rows_after_the_completed_round(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    recorder = RunRecorder(TASK, csv_path)
    other = RunRecorder(OTHER, csv_path)  # another task of the same run, same file
    for server_round in (1, 2):
        _play_round(recorder, server_round)
        other.round_trained(server_round, 50, 0.5)
    expected = _figures(recorder)
    snapshot = _through_state_file(recorder.snapshot())  # state.json after round 2
    # Round 3 gets part of the way, and the other task goes on, then the crash.
    _play_round(recorder, 3)
    for server_round in (3, 4):
        other.round_trained(server_round, 50, 0.5)
    before = _rows(csv_path)
    assert {r["round"] for r in before if r["task"] == TASK} == {"1", "2", "3"}

    resumed = RunRecorder(TASK, csv_path)
    resumed.restore(snapshot, 2)

    assert _figures(resumed) == expected
    assert 3 not in resumed.federated
    assert resumed.sites["bank-a"].rounds_trained == 2
    after = _rows(csv_path)
    assert after == [r for r in before if r["task"] != TASK or int(r["round"]) <= 2]
    assert [(r["task"], r["round"]) for r in after if r["task"] == OTHER] == [
        (OTHER, "1"),
        (OTHER, "2"),
        (OTHER, "3"),
        (OTHER, "4"),
    ]
    assert {r["round"] for r in after if r["task"] == TASK} == {"1", "2"}
    lines = csv_path.read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS)
    assert sum(line.startswith("task,") for line in lines) == 1
    # Text with commas and newlines came through the rewrite unchanged.
    assert "round 2: bad, very bad\nx" in [r["reason"] for r in after]

    # The resumed run appends its own round 3 after what was kept.
    resumed.round_trained(3, 190, 0.002)
    last = _rows(csv_path)[-1]
    assert (last["task"], last["round"], last["site"], last["status"]) == (
        TASK,
        "3",
        FEDERATED,
        "aggregated",
    )
    assert len(_rows(csv_path)) == len(after) + 1


def test_restore_to_round_zero_keeps_only_the_other_tasks(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    empty = _through_state_file(RunRecorder(TASK, csv_path).snapshot())
    other = RunRecorder(OTHER, csv_path)
    other.round_trained(1, 50, 0.5)
    recorder = RunRecorder(TASK, csv_path)
    _play_round(recorder, 1)

    resumed = RunRecorder(TASK, csv_path)
    resumed.restore(empty, 0)

    assert _figures(resumed) == _figures(RunRecorder(TASK, csv_path))
    assert [(r["task"], r["round"]) for r in _rows(csv_path)] == [(OTHER, "1")]


def test_restore_without_a_metrics_file_creates_none(tmp_path: Path) -> None:
    source = RunRecorder(TASK, tmp_path / "first" / "metrics.csv")
    _play_round(source, 1)
    expected = _figures(source)

    csv_path = tmp_path / "elsewhere" / "metrics.csv"
    resumed = RunRecorder(TASK, csv_path)
    resumed.restore(_through_state_file(source.snapshot()), 1)

    assert _figures(resumed) == expected
    assert not csv_path.exists()


@pytest.mark.parametrize("completed_round", [1, 2])
def test_restore_replaces_what_the_recorder_held(tmp_path: Path, completed_round: int) -> None:
    """A recorder that had figures of its own ends up with the snapshot's only."""
    snapshot_source = RunRecorder(TASK, tmp_path / "a.csv")
    for server_round in range(1, completed_round + 1):
        _play_round(snapshot_source, server_round)
    expected = _figures(snapshot_source)
    resumed = RunRecorder(TASK, tmp_path / "b.csv")
    _play_round(resumed, 3)

    resumed.restore(_through_state_file(snapshot_source.snapshot()), completed_round)

    assert _figures(resumed) == expected
    assert _rows(tmp_path / "b.csv") == []  # b.csv held round 3 only
