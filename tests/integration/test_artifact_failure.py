"""A failed export must not lose a finished run: it is audited and reported, and the
trained adapter is saved (a real simulation with a broken exporter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from common.audit.log import read_entries
from common.cli import cli
from tests.conftest import SMALL_SCENARIO

pytestmark = pytest.mark.slow

TASK = "tabular-classification"


def test_a_failed_export_is_recorded_and_the_run_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_exporter(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the exporter broke")

    # The ServerApp runs in this process on the Simulation Engine, so the patch applies.
    monkeypatch.setattr("server.distribution.export_model", broken_exporter)
    scenario = {
        **SMALL_SCENARIO,
        "tasks": {TASK: SMALL_SCENARIO["tasks"][TASK]},
        "sites": [s for s in SMALL_SCENARIO["sites"] if s["kind"] == "bank"],
    }
    path = tmp_path / "scenario.toml"
    path.write_text(tomli_w.dumps(scenario))
    run_dir = tmp_path / "run"
    arguments = ["simulate", str(path), "--rounds", "1", "--out", str(run_dir)]
    arguments += ["--data-dir", str(tmp_path / "data")]
    result = CliRunner().invoke(cli, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    outcome = json.loads((run_dir / "tasks" / f"{TASK}.json").read_text())
    assert outcome["artifact"] == {"status": "failed", "error": "RuntimeError"}
    assert outcome["rounds_completed"] == 1
    assert (run_dir / "adapters" / TASK / "adapter_model.safetensors").is_file()
    events = [e["event"] for e in read_entries(run_dir / "audit" / f"coordinator-{TASK}.jsonl")]
    assert events[-2:] == ["artifact-failed", "run-finished"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tasks"][TASK]["artifact"]["problem"] == "not released (RuntimeError)"
    assert "not released" in " ".join(result.output.split())
