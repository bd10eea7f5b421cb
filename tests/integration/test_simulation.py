"""A 2-round simulation with 2 hospitals and 2 banks, through the real CLI and Flower's
Simulation Engine, and what it leaves behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from peft import PeftModel, get_peft_model_state_dict
from safetensors.numpy import load_file

from common.cli import cli
from common.tasks import TASKS
from tests.conftest import SMALL_SCENARIO

pytestmark = pytest.mark.slow


def test_summary_reports_every_task_and_site(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["scenario"] == "test"
    assert set(summary["tasks"]) == {"dicom-classification", "tabular-classification"}
    for task in summary["tasks"].values():
        assert task["rounds_completed"] == 2
        assert 0.0 <= task["final"]["accuracy"] <= 1.0
        # A confident model's float32 cross-entropy can round to exactly 0.
        assert task["final"]["loss"] >= 0
        assert len(task["sites"]) == 2
    assert set(summary["sites"]) == {"hospital-a", "hospital-b", "bank-a", "bank-b"}
    for site in summary["sites"].values():
        assert site["kind"] in ("hospital", "bank")
        assert site["examples"] > 0
        assert 0 < site["epsilon_spent"] <= site["epsilon_budget"]
        assert site["delta"] == pytest.approx(1e-5)


def test_metrics_csv_has_each_round_task_and_site(finished_run: Path) -> None:
    with (finished_run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    seen = {(r["task"], r["round"], r["site"], r["phase"]) for r in rows}
    for task, sites in (
        ("dicom-classification", ("hospital-a", "hospital-b")),
        ("tabular-classification", ("bank-a", "bank-b")),
    ):
        for server_round in ("1", "2"):
            for site in (*sites, "all"):
                assert (task, server_round, site, "train") in seen
                assert (task, server_round, site, "evaluate") in seen


def test_plots_and_site_configs_are_written(finished_run: Path) -> None:
    for task in ("dicom-classification", "tabular-classification"):
        assert (finished_run / "plots" / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.stem for p in (finished_run / "sites").glob("*.toml")) == [
        "bank-a",
        "bank-b",
        "hospital-a",
        "hospital-b",
    ]


def test_only_the_lora_state_crossed_the_wire(finished_run: Path) -> None:
    """What the server aggregated is the LoRA state plus the modules trained in full (the
    head; a table's linear path), a fraction of the model."""
    for task in ("dicom-classification", "tabular-classification"):
        arrays = load_file(str(finished_run / "checkpoints" / task / "round-0002.safetensors"))
        heads = TASKS.get(task).head_modules
        assert arrays and all(("lora_" in k) or any(h in k for h in heads) for k in arrays)
        summary = json.loads((finished_run / "tasks" / f"{task}.json").read_text())
        # What a site sends: the same tensors in the run's update precision (float16).
        payload = sum(a.size * 2 for a in arrays.values())
        assert payload == summary["adapter_bytes"]
        assert payload < 0.25 * summary["model_parameters_bytes"]


def test_adapters_load_with_peft_onto_the_base_model(finished_run: Path) -> None:
    """The saved adapter is the final global adapter, loadable by peft on the base."""
    for task in ("dicom-classification", "tabular-classification"):
        adapter_dir = finished_run / "adapters" / task
        assert (adapter_dir / "adapter_config.json").is_file()
        base = TASKS.get(task).load_base_model(finished_run.parent / "data" / "models" / task)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        loaded = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
        summary = json.loads((finished_run / "tasks" / f"{task}.json").read_text())
        final_round = f"round-{summary['final_adapter_round']:04d}.safetensors"
        final = load_file(str(finished_run / "checkpoints" / task / final_round))
        assert set(loaded) == set(final)
        for name, value in final.items():
            np.testing.assert_array_equal(loaded[name], value)


def test_site_check_runs_on_the_generated_configs(finished_run: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli, ["site", "check", str(finished_run / "sites" / "hospital-a.toml"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["kind"] == "hospital"
    assert report["records"]["rejected"] == 5
    reasons = {r["reason"] for r in report["rejected"]}
    assert "not a DICOM file" in reasons
    assert any(reason.startswith("no Pixel Data") for reason in reasons), reasons
    assert sum(report["labels"].values()) == report["records"]["accepted"]


def test_a_stale_demo_base_model_is_rebuilt(tmp_path: Path) -> None:
    """A base model left by another version is replaced, not half-loaded."""
    from simulations.runner import build_base_model
    from simulations.scenario import Scenario

    scenario = Scenario.model_validate(SMALL_SCENARIO)
    task = "tabular-classification"
    directory = build_base_model(task, scenario, tmp_path)
    (directory / "fedlora-demo-base.json").write_text('{"builder": 0}')
    (directory / "stale-file").write_text("left by an older version")
    rebuilt = build_base_model(task, scenario, tmp_path)
    assert rebuilt == directory and not (directory / "stale-file").exists()
    TASKS.get(task).load_base_model(rebuilt)


def test_the_plots_have_a_series_per_site(finished_run: Path) -> None:
    from server.run_report import plot_series

    with (finished_run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    accuracy, epsilon = plot_series(rows, "dicom-classification")
    assert set(epsilon) == {"hospital-a", "hospital-b"}
    assert [r for r, _ in epsilon["hospital-a"]] == [1, 2]
    assert epsilon["hospital-a"][0][1] < epsilon["hospital-a"][1][1]
    assert set(accuracy) == {"hospital-a", "hospital-b", "all"}
