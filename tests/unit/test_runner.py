"""simulations.runner.prepare: the federation configs and behaviours a simulation runs."""

from __future__ import annotations

from pathlib import Path

from common.config import load_federation_config
from simulations.runner import prepare
from simulations.scenario import Scenario
from tests.conftest import SMALL_SCENARIO


def test_prepare_applies_overrides_and_lists_behaviours(
    site_workspace: Path, tmp_path: Path
) -> None:
    document = {
        **SMALL_SCENARIO,
        "sites": [
            *SMALL_SCENARIO["sites"][:3],
            {**SMALL_SCENARIO["sites"][3], "behaviour": {"kind": "scaled", "factor": 10.0}},
        ],
    }
    scenario = Scenario.model_validate(document)
    prepared = prepare(scenario, tmp_path / "run", site_workspace, rounds=3, aggregator="median")
    for task, federation in prepared.federations.items():
        assert federation.rounds == 3
        assert federation.aggregator == "median"
        # What was written is what runs: the TOML a deployment would be given.
        written = load_federation_config(tmp_path / "run" / "federation" / f"{task}.toml")
        assert written.aggregator == "median"
        assert written.validation == federation.validation
    tabular = prepared.behaviours["tabular-classification"]
    assert tabular[0] is None
    assert tabular[1] is not None and tabular[1].kind == "scaled" and tabular[1].factor == 10.0
    assert prepared.behaviours["dicom-classification"] == [None, None]
    assert [p.stem for p in prepared.site_configs["tabular-classification"]] == ["bank-a", "bank-b"]


def test_prepare_keeps_the_scenario_settings_without_overrides(
    site_workspace: Path, tmp_path: Path
) -> None:
    prepared = prepare(Scenario.model_validate(SMALL_SCENARIO), tmp_path / "run", site_workspace)
    assert prepared.federations["dicom-classification"].rounds == 2
    assert prepared.federations["tabular-classification"].aggregator == "fedavg"
