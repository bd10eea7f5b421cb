"""utility_real's parts: the real datasets as sites hold them, and its linear baselines."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from benchmarks.linear_baseline import design_matrix, linear_baseline
from benchmarks.real_data import write_digits, write_table
from benchmarks.utility_real import merged, rows
from client.data import SiteData
from common.config import load_site_config


def test_a_real_table_is_written_with_public_bounds_that_hold_every_value(
    tmp_path: Path,
) -> None:
    dataset = write_table("breast-cancer", tmp_path)
    config = load_site_config(dataset.whole_config)
    assert dataset.records == 569 and dataset.classes == ["malignant", "benign"]
    data = tomllib.loads(dataset.whole_config.read_text())["data"]
    assert sorted(data["numeric_bounds"]) == sorted(data["numeric_features"])
    table = pd.read_csv(tmp_path / "table.csv")
    for name, (low, high) in data["numeric_bounds"].items():
        assert low <= table[name].min() and table[name].max() <= high
    assert config.data.person_column == "person"


def test_the_multiclass_table_names_its_seven_parties(tmp_path: Path) -> None:
    dataset = write_table("anes96", tmp_path)
    assert len(dataset.classes) == 7 and dataset.records == 944


def test_digits_are_real_dicom_files_one_patient_each(tmp_path: Path) -> None:
    dataset = write_digits(tmp_path)
    assert dataset.records == 1797 and len(dataset.classes) == 10
    first = pydicom.dcmread(tmp_path / "scans" / "00" / "00000.dcm")
    assert first.Rows == first.Columns == 8 and first.PhotometricInterpretation == "MONOCHROME2"
    assert int(first.pixel_array.max()) <= 16
    second = pydicom.dcmread(tmp_path / "scans" / "00" / "00001.dcm")
    assert first.PatientID != second.PatientID


def _separable(rows: int, seed: int) -> SiteData:
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(rows, 3)).astype(np.float32)
    labels = (numeric[:, 0] > 0).astype(np.int64)
    categorical = rng.integers(0, 3, size=(rows, 1))
    return SiteData(
        features={"numeric_values": numeric, "categorical_ids": categorical},
        labels=labels,
        person_keys=[str(i) for i in range(rows)],
        classes=["no", "yes"],
    )


def test_the_design_matrix_flattens_floats_and_one_hots_ids() -> None:
    matrix = design_matrix(_separable(10, 0))
    assert matrix.shape == (10, 3 + 3)
    assert np.all(matrix[:, :3].sum(axis=1) == 1.0)  # one category per record


def test_the_dp_baseline_learns_a_separable_rule_and_noise_costs_it() -> None:
    train, holdout = _separable(600, 1), _separable(200, 2)
    plain = linear_baseline(train, holdout, None)
    private = linear_baseline(train, holdout, (0.05, 1e-5))  # ε = 0.05: mostly noise
    assert plain.accuracy > 0.95
    assert private.accuracy < plain.accuracy


def test_a_partial_run_keeps_the_other_datasets_figures() -> None:
    figure = {
        "federated_dp": {"accuracy": 0.9, "auc": 0.95},
        "centralised_dp_linear": {"accuracy": 0.92, "auc": 0.96},
        "centralised_linear": {"accuracy": 0.95, "auc": 0.99},
        "federated_over_centralised_dp": 0.978,
        "target": 0.95,
        "alone_dp": {"site-1": 0.8},
        "best_single_site": "site-1",
        "per_site": {"site-1": {"accuracy": 0.9, "auc": None}},
        "meets_targets": True,
    }
    earlier = {"quick": False, "datasets": {"digits": {**figure, "meets_targets": False}}}
    result = merged(earlier, {"quick": False, "datasets": {"wine": figure}})
    assert list(result["datasets"]) == ["digits", "wine"]
    assert result["meets_targets"] is False
    assert any("site-1 0.90/—" in row[1] for row in rows(result))
