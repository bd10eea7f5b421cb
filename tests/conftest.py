"""Shared fixtures: small synthetic sites and tiny base models, built the way a
simulation builds them, so tests exercise the real loading paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import tomli_w
import torch
from transformers.utils import logging as transformers_logging

from client.site import SALT_FILE
from common import model_init
from simulations import runner
from simulations.runner import build_base_model, generate_site_data, site_config_document
from simulations.scenario import Scenario

transformers_logging.disable_progress_bar()

if "OMP_NUM_THREADS" not in os.environ:
    # The test models are tiny: one intra-op thread is faster than torch's default of
    # one per core, and far faster on a busy machine, where the other threads spin
    # waiting for a core (the inner loop's training tests ran 5x slower). Subprocesses
    # (isolated benchmarks, e2e nodes) inherit it; set OMP_NUM_THREADS to override.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

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
    for spec in small_scenario.generated_sites():
        generate_site_data(spec, small_scenario, root / "sites" / spec.id)
    return root


@pytest.fixture(scope="session")
def untrained_workspace(tmp_path_factory: pytest.TempPathFactory, small_scenario: Scenario) -> Path:
    """site_workspace's layout and data, but base models built from their configs alone:
    the backbones are not pretrained (about a second, not a quarter of a minute). For the
    fast tests that need real files, shapes and loading paths, not a model that already
    learned something; a test that needs the pretrained backbone uses site_workspace
    (and is slow)."""
    root = tmp_path_factory.mktemp("untrained-workspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_init, "pretrain_imaging_backbone", lambda *args, **kwargs: 0.0)
        patch.setattr(runner, "pretrain_text_backbone", lambda *args, **kwargs: 0.0)
        for task in small_scenario.tasks:
            build_base_model(task, small_scenario, root / "models")
    for spec in small_scenario.generated_sites():
        generate_site_data(spec, small_scenario, root / "sites" / spec.id)
    return root


SLOW_FIXTURES = frozenset({"site_workspace", "finished_run"})
"""Session fixtures that pretrain a model or run a simulation: any test that needs one is
slow, so that `pytest -m "not slow"` never builds them (use untrained_workspace instead)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m "not slow"` is the inner loop: it leaves out the e2e tests, the browser tests
    and every test that needs a pretrained model or a finished simulation."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "browser" in fixtures and item.get_closest_marker("browser") is None:
            item.add_marker(pytest.mark.browser)
        if item.get_closest_marker("slow") is None and (
            item.get_closest_marker("e2e") is not None
            or item.get_closest_marker("browser") is not None
            or fixtures & SLOW_FIXTURES
        ):
            item.add_marker(pytest.mark.slow)


def write_site_config(
    scenario: Scenario, workspace: Path, site_id: str, directory: Path, **privacy: float
) -> Path:
    """A site TOML for one of the workspace's sites, with its own fresh state folder."""
    spec = next(s for s in scenario.generated_sites() if s.id == site_id)
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
