"""simulations.runner.prepare: the federation configs and behaviours a simulation runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.config import load_federation_config, load_site_config
from simulations.runner import prepare
from simulations.scenario import Scenario
from tests.conftest import SMALL_SCENARIO


def test_prepare_applies_overrides_and_lists_behaviours(
    untrained_workspace: Path, tmp_path: Path
) -> None:
    document = {
        **SMALL_SCENARIO,
        "sites": [
            *SMALL_SCENARIO["sites"][:3],
            {**SMALL_SCENARIO["sites"][3], "behaviour": {"kind": "scaled", "factor": 10.0}},
        ],
    }
    scenario = Scenario.model_validate(document)
    prepared = prepare(
        scenario, tmp_path / "run", untrained_workspace, rounds=3, aggregator="median"
    )
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
    untrained_workspace: Path, tmp_path: Path
) -> None:
    prepared = prepare(
        Scenario.model_validate(SMALL_SCENARIO), tmp_path / "run", untrained_workspace
    )
    assert prepared.federations["dicom-classification"].rounds == 2
    assert prepared.federations["tabular-classification"].aggregator == "fedavg"


def test_prepare_pins_the_run_coordinator_key_in_every_site(
    untrained_workspace: Path, tmp_path: Path
) -> None:
    prepared = prepare(
        Scenario.model_validate(SMALL_SCENARIO), tmp_path / "run", untrained_workspace
    )
    key = tmp_path / "run" / "keys" / "coordinator.pub"
    assert key.is_file()
    for paths in prepared.site_configs.values():
        for path in paths:
            assert load_site_config(path).site.coordinator_key == key.resolve()


def test_the_imaging_backbone_must_fit_the_images_and_the_heads() -> None:
    for backbone, problem in (
        ({"patch_size": 5}, "not a multiple of imaging_backbone.patch_size"),
        ({"hidden_size": 30}, "multiple of 4"),
    ):
        with pytest.raises(ValidationError) as info:
            Scenario.model_validate({**SMALL_SCENARIO, "imaging_backbone": backbone})
        assert problem in str(info.value)
