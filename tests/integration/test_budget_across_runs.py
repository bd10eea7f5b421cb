"""The privacy budget spans runs: the same sites, three simulations in a row.

Each run asks every bank for ε = 1. Two banks may spend 10 over their lifetime, one only
2.5: after two runs its ledger holds ε ≈ 2, so it refuses the third run while the others
train on, and ``fedlora site budget`` shows the accumulation per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from common.cli import cli

pytestmark = pytest.mark.slow

SCENARIO = {
    "name": "budget",
    "seed": 5,
    "tasks": {
        "tabular-classification": {
            "rounds": 2,
            "batch_size": 32,
            "learning_rate": 0.1,
            "min_sites": 2,
            "dp": {"epsilon_per_run": 1.0},
        }
    },
    "sites": [
        {"id": "bank-a", "kind": "bank", "customers": 150, "epsilon": 10.0},
        {"id": "bank-b", "kind": "bank", "customers": 150, "epsilon": 10.0},
        {"id": "bank-small", "kind": "bank", "customers": 150, "epsilon": 2.5},
    ],
}


def _simulate(root: Path, scenario: Path, name: str) -> dict:
    run_dir = root / name
    result = CliRunner().invoke(
        cli,
        ["simulate", str(scenario), "--out", str(run_dir), "--data-dir", str(root / "data")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads((run_dir / "summary.json").read_text())


def _budget(run_dir: Path, site: str) -> dict:
    result = CliRunner().invoke(
        cli, ["site", "budget", str(run_dir / "sites" / f"{site}.toml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_epsilon_accumulates_and_a_spent_site_refuses(tmp_path: Path) -> None:
    scenario = tmp_path / "budget.toml"
    scenario.write_text(tomli_w.dumps(SCENARIO))

    first = _simulate(tmp_path, scenario, "run-1")
    second = _simulate(tmp_path, scenario, "run-2")
    for site in ("bank-a", "bank-b", "bank-small"):
        assert first["sites"][site]["epsilon_spent"] == pytest.approx(1.0, abs=0.05)
        assert second["sites"][site]["epsilon_spent"] == pytest.approx(2.0, abs=0.1)

    budget = _budget(tmp_path / "run-2", "bank-small")
    (dataset,) = budget["datasets"]
    assert budget["site"] == "bank-small"
    assert [run["rounds"] for run in dataset["runs"]] == [2, 2]
    first_run, second_run = dataset["runs"]
    assert first_run["epsilon_after"] == pytest.approx(1.0, abs=0.05)
    assert second_run["epsilon_after"] == pytest.approx(2.0, abs=0.1)
    assert dataset["epsilon_spent"] == pytest.approx(second_run["epsilon_after"])
    assert dataset["epsilon_budget"] == 2.5 and dataset["accountant"] == "prv"

    third = _simulate(tmp_path, scenario, "run-3")
    task = third["tasks"]["tabular-classification"]
    assert task["rounds_completed"] == 2  # the others trained on without bank-small
    assert third["sites"]["bank-small"]["rounds_trained"] == 0
    assert third["sites"]["bank-small"]["rounds_refused"] == 2
    assert third["sites"]["bank-small"]["epsilon_spent"] == pytest.approx(2.0, abs=0.1)
    for site in ("bank-a", "bank-b"):
        assert third["sites"][site]["rounds_trained"] == 2
        assert third["sites"][site]["epsilon_spent"] == pytest.approx(3.0, abs=0.15)
    refusal = next(r for r in task["exclusions"] if r["site"] == "bank-small")
    assert refusal["status"] == "refused"
    assert "asks for ε=1.00 but only 0.5" in refusal["reason"]

    # The refusal is in the site's own log too.
    state = tmp_path / "data" / "sites" / "bank-small" / "state"
    entries = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    refusals = [e["data"] for e in entries if e["event"] == "budget-refused"]
    assert [r["round"] for r in refusals] == [1, 2]  # the third run's two rounds
    assert all("asks for ε=1.00 but only 0.5" in r["reason"] for r in refusals)
    # A spent site still evaluates (that spends no ε), and says so in its log; it still
    # receives the run's model, which it checks and installs last.
    events = [e["event"] for e in entries]
    assert "evaluation-done" in events[events.index("budget-refused") :]
    assert events[-3:] == ["evaluation-done", "artifact-checked", "artifact-installed"]
