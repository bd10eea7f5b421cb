"""Shared fixtures: small synthetic sites and tiny base models, built the way a
simulation builds them, so tests exercise the real loading paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tomli_w
from transformers.utils import logging as transformers_logging

from client.site import SALT_FILE
from simulations.runner import build_base_model, generate_site_data, site_config_document
from simulations.scenario import Scenario

transformers_logging.disable_progress_bar()

SMALL_SCENARIO = {
    "name": "test",
    "seed": 3,
    "image_size": 16,
    "imaging_backbone": {"hidden_size": 64, "layers": 2, "patch_size": 4},
    "tasks": {
        "dicom-classification": {"rounds": 2, "batch_size": 16, "learning_rate": 0.3},
        "tabular-classification": {"rounds": 2, "batch_size": 32, "learning_rate": 0.1},
    },
    "sites": [
        {"id": "hospital-a", "kind": "hospital", "patients": 130, "corrupt_files": True},
        {"id": "hospital-b", "kind": "hospital", "patients": 120, "class_weights": [0.3, 0.7]},
        {"id": "bank-a", "kind": "bank", "customers": 200, "format": "csv"},
        {"id": "bank-b", "kind": "bank", "customers": 160, "format": "parquet"},
    ],
}


@pytest.fixture(scope="session")
def small_scenario() -> Scenario:
    return Scenario.model_validate(SMALL_SCENARIO)


@pytest.fixture(scope="session")
def site_workspace(tmp_path_factory: pytest.TempPathFactory, small_scenario: Scenario) -> Path:
    """Generated data and base models for the small scenario (built once per session)."""
    root = tmp_path_factory.mktemp("workspace")
    for task in small_scenario.tasks:
        build_base_model(task, small_scenario, root / "models")
    for spec in small_scenario.sites:
        generate_site_data(spec, small_scenario, root / "sites" / spec.id)
    return root


def write_site_config(
    scenario: Scenario, workspace: Path, site_id: str, directory: Path, **privacy: float
) -> Path:
    """A site TOML for one of the workspace's sites, with its own fresh state folder."""
    spec = next(s for s in scenario.sites if s.id == site_id)
    task = scenario.task_for(spec)
    document = site_config_document(
        spec, task, workspace / "sites" / site_id, workspace / "models" / task, scenario
    )
    state_dir = directory / f"{site_id}-state"
    document["site"]["state_dir"] = str(state_dir)
    document["privacy"].update(privacy)
    # A fixed person-key salt: the held-out split and the sampling do not vary run to run.
    state_dir.mkdir(parents=True, exist_ok=True)
    salt = state_dir / SALT_FILE
    if not salt.exists():
        salt.write_bytes(hashlib.sha256(site_id.encode()).digest())
    path = directory / f"{site_id}.toml"
    path.write_text(tomli_w.dumps(document))
    return path


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the identity of the running task; set one for tests."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
