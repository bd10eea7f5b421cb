"""A DICOM site's images follow its base model: a stale data.image_size is a problem the
pre-flight names, and ``site check`` states what the person key means for ε."""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w
from rich.console import Console

from client.cli import _print_report, check_report
from client.preflight import image_size_problem
from common.config import SiteConfig, load_site_config
from simulations.scenario import Scenario
from tests.conftest import write_site_config


def _hospital_config(tmp_path: Path, base: Path, **data: object) -> SiteConfig:
    document = {
        "site": {
            "id": "hospital-x",
            "kind": "hospital",
            "task": "dicom-classification",
            "base_model": str(base),
        },
        "data": {"format": "dicom", "path": str(tmp_path / "dicom"), "classes": ["a", "b"]} | data,
        "privacy": {"epsilon": 8.0},
        "policy": {"allowed_tasks": ["dicom-classification"]},
    }
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(document))
    return load_site_config(path)


def _base(tmp_path: Path, **config: object) -> Path:
    base = tmp_path / "model"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({"num_channels": 1, **config}))
    return base


def test_image_size_that_differs_from_the_base_model_is_a_problem(tmp_path: Path) -> None:
    base = _base(tmp_path, image_size=224)
    problem = image_size_problem(_hospital_config(tmp_path, base, image_size=32))
    assert problem is not None
    assert str(problem) == (
        "site hospital-x: data.image_size = 32 but the base model takes 224 x 224 images: "
        "remove data.image_size, the loader follows the base model"
    )
    assert image_size_problem(_hospital_config(tmp_path, base, image_size=224)) is None
    assert image_size_problem(_hospital_config(tmp_path, base)) is None  # the default


def test_an_unreadable_base_model_is_left_to_the_loader(tmp_path: Path) -> None:
    base = _base(tmp_path)  # says no input size: loading the data reports that
    assert image_size_problem(_hospital_config(tmp_path, base, image_size=32)) is None


def test_site_check_lists_the_problem_and_the_privacy_unit(
    small_scenario: Scenario, untrained_workspace: Path, tmp_path: Path
) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "hospital-a", tmp_path)
    report = check_report(path)
    assert report["ok"], report["problems"]
    assert report["privacy_unit"].startswith("one person per patient (PatientID")

    side = small_scenario.image_size  # the base model's input side
    document = path.read_text()
    assert 'labels = "csv"' in document
    extra = f'labels = "csv"\nimage_size = {side * 2}\nperson_key = "study"'
    path.write_text(document.replace('labels = "csv"', extra))
    report = check_report(path)
    assert not report["ok"]
    assert any(
        f"data.image_size = {side * 2} but the base model takes {side} x {side}" in problem
        for problem in report["problems"]
    )
    assert report["privacy_unit"] == (
        "one person per study (StudyInstanceUID): a patient with several studies counts as "
        "several people, so ε is per study, not per patient"
    )
    console = Console(record=True, width=400)
    _print_report(report, console)
    assert f"privacy unit: {report['privacy_unit']}" in console.export_text()
