"""``fedlora site check``: exit codes and the JSON report."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from common.cli import main
from tests.conftest import write_site_config


def _run(args: list[str]) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(lambda: main(), args=args)  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow  # the privacy plan calibrates noise with PRV (3 s)
def test_check_reports_counts_labels_and_rejections(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    from common.cli import cli

    path = write_site_config(small_scenario, untrained_workspace, "hospital-a", tmp_path)
    result = CliRunner().invoke(cli, ["site", "check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"site", "kind", "ok", "records", "rejected", "labels"}
    assert report["site"] == "hospital-a" and report["ok"] is True
    assert report["records"]["rejected"] == len(report["rejected"]) == 5
    assert all(item["reason"] for item in report["rejected"])
    assert set(report["labels"]) == {"normal", "lesion"}


@pytest.mark.slow  # the privacy plan calibrates noise with PRV (3 s)
def test_check_fails_when_the_cohort_is_too_small(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    from common.cli import cli

    path = write_site_config(small_scenario, untrained_workspace, "bank-b", tmp_path)
    path.write_text(path.read_text().replace("min_cohort = 20", "min_cohort = 5000"))
    result = CliRunner().invoke(cli, ["site", "check", str(path)])
    assert result.exit_code == 1
    assert "fewer than its minimum cohort of 5000" in " ".join(result.stdout.split())


def test_invalid_config_is_one_clear_message(tmp_path) -> None:
    from common.cli import cli

    path = tmp_path / "broken.toml"
    path.write_text('[site]\nid = "x"\nkind = "clinic"\n')
    result = CliRunner().invoke(cli, ["site", "check", str(path)], standalone_mode=False)
    assert result.exception is not None
    message = str(result.exception)
    assert "site.kind" in message and "privacy: required" in message


def test_check_shows_the_privacy_plan(small_scenario, untrained_workspace, tmp_path) -> None:
    from common.cli import cli

    path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path, epsilon=3.0)
    args = ["site", "check", str(path), "--json", "--rounds", "4", "--batch-size", "16"]
    result = CliRunner().invoke(cli, [*args, "--epsilon-per-run", "2"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["privacy_plan"]
    assert plan["rounds"] == 4 and plan["batch_size"] == 16
    assert plan["steps_per_round"] == -(-plan["people"] // 16)
    assert plan["epsilon_spent"] == 0.0 and plan["epsilon_budget"] == 3.0
    assert plan["noise_multiplier"] > 0
    assert 1.9 <= plan["epsilon_after"] <= 2.0  # σ is chosen to spend what the run asks
    # Asking for more than the budget holds: the site says it would refuse, and exits 1.
    refused = CliRunner().invoke(cli, [*args, "--epsilon-per-run", "5"])
    assert refused.exit_code == 1
    assert "asks for ε=5.00 but only 3.00" in json.loads(refused.stdout)["problems"][0]


def test_budget_lists_the_ledger(small_scenario, untrained_workspace, tmp_path) -> None:
    from client.site import Site
    from common.cli import cli
    from common.config import load_site_config

    path = write_site_config(small_scenario, untrained_workspace, "bank-b", tmp_path, epsilon=9.0)
    empty = CliRunner().invoke(cli, ["site", "budget", str(path), "--json"])
    assert json.loads(empty.stdout) == {"site": "bank-b", "datasets": []}
    site = Site(load_site_config(path))
    ledger = site.open_ledger(site.load_data().dataset)
    ledger.record_round("run-1", 1, (1.0, 0.1, 10))
    ledger.record_round("run-1", 2, (1.0, 0.1, 10))
    ledger.record_round("run-2", 1, (1.0, 0.1, 10))
    report = json.loads(CliRunner().invoke(cli, ["site", "budget", str(path), "--json"]).stdout)
    (dataset,) = report["datasets"]
    assert dataset["dataset"] == site.load_data().dataset
    assert [(r["run"], r["rounds"]) for r in dataset["runs"]] == [("run-1", 2), ("run-2", 1)]
    assert dataset["epsilon_spent"] == pytest.approx(ledger.epsilon())
    assert dataset["epsilon_remaining"] == pytest.approx(9.0 - ledger.epsilon())
    assert dataset["delta"] == 1e-5 and dataset["accountant"] == "prv"
    text = CliRunner().invoke(cli, ["site", "budget", str(path)]).stdout
    assert "run-2" in text and "left" in text
