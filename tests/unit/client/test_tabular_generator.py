"""The synthetic bank generator: deterministic, dirty in known ways, and learnable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from client.data import SiteData
from client.data.tabular import CATEGORICAL_INPUT, NUMERIC_INPUT, load_tabular_dataset
from common.config import TabularDataConfig
from simulations.generators.tabular import bank_schema, write_bank

FEATURE_COLUMNS = [*bank_schema()["numeric_features"], *bank_schema()["categorical_features"]]


def _frame(path: Path, **kwargs: Any) -> pd.DataFrame:
    options: dict[str, Any] = {"customers": 500, "seed": 3, "default_rate": 0.3}
    options.update(kwargs)
    write_bank(path, **options)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def test_schema_matches_the_written_columns(tmp_path: Path) -> None:
    frame = _frame(tmp_path / "bank.csv")
    schema = bank_schema()
    declared = {
        schema["label_column"],
        schema["person_column"],
        *schema["numeric_features"],
        *schema["categorical_features"],
    }
    assert set(frame.columns) == declared | {"customer_name"}
    assert set(frame["default"]) == set(schema["classes"])
    for column, values in schema["categorical_features"].items():
        assert set(frame[column].dropna()) == set(values)
    assert frame["customer_id"].str.fullmatch(r"C\d{7}").all()
    bank_schema()["classes"].append("mutated")
    assert bank_schema()["classes"] == ["repaid", "default"]


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    rows_a = write_bank(tmp_path / "a.csv", customers=300, seed=11, default_rate=0.4)
    rows_b = write_bank(tmp_path / "b.csv", customers=300, seed=11, default_rate=0.4)
    write_bank(tmp_path / "c.csv", customers=300, seed=12, default_rate=0.4)

    assert rows_a == rows_b == len(pd.read_csv(tmp_path / "a.csv"))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_parquet_holds_the_same_table_as_csv(tmp_path: Path) -> None:
    csv = _frame(tmp_path / "bank.csv")
    parquet = _frame(tmp_path / "bank.parquet", file_format="parquet")
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)


def test_missing_values_are_injected_in_features_only(tmp_path: Path) -> None:
    frame = _frame(tmp_path / "bank.csv", customers=2000, missing_fraction=0.1)
    for column in FEATURE_COLUMNS:
        assert 0.07 < frame[column].isna().mean() < 0.13, column
    for column in ("customer_id", "customer_name", "default"):
        assert frame[column].notna().all(), column
    clean = _frame(tmp_path / "clean.csv", missing_fraction=0.0)
    assert not clean[FEATURE_COLUMNS].isna().any().any()


def test_outliers_are_twentyfold_values_in_about_the_requested_share(tmp_path: Path) -> None:
    numeric = bank_schema()["numeric_features"]
    base = _frame(tmp_path / "base.csv", customers=2000, outlier_fraction=0.0)
    dirty = _frame(tmp_path / "dirty.csv", customers=2000, outlier_fraction=0.02)

    # Outliers are drawn last, so everything else is identical between the two tables.
    pd.testing.assert_frame_equal(base.drop(columns=numeric), dirty.drop(columns=numeric))
    before = base[numeric].to_numpy()
    after = dirty[numeric].to_numpy()
    changed = (before != after) & ~np.isnan(before)
    assert np.isnan(before[np.isnan(after)]).all()
    np.testing.assert_allclose(after[changed], before[changed] * 20.0)
    rows = changed.any(axis=1)
    assert (changed.sum(axis=1) <= 1).all()
    assert 0.01 < rows.mean() < 0.03


def test_customers_have_one_to_three_loans_with_shared_attributes(tmp_path: Path) -> None:
    frame = _frame(
        tmp_path / "bank.csv", customers=1000, missing_fraction=0.0, outlier_fraction=0.0
    )
    loans = frame.groupby("customer_id").size()

    assert len(loans) == 1000
    assert set(loans.unique()) == {1, 2, 3}
    assert (loans > 1).mean() > 0.2
    customer_level = ["customer_name", "age", "income", "debt_ratio", "region", "employment"]
    per_customer = frame.groupby("customer_id")[customer_level].nunique()
    assert (per_customer == 1).all().all()
    assert frame.groupby("customer_id")["product"].nunique().max() > 1


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_default_rate_sets_the_label_skew(tmp_path: Path, rate: float) -> None:
    frame = _frame(tmp_path / "bank.csv", customers=3000, default_rate=rate)
    assert (frame["default"] == "default").mean() == pytest.approx(rate, abs=0.03)


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="default_rate"):
        write_bank(tmp_path / "x.csv", customers=10, seed=0, default_rate=1.0)
    with pytest.raises(ValueError, match="customers"):
        write_bank(tmp_path / "x.csv", customers=0, seed=0, default_rate=0.5)


def test_five_thousand_customers_are_written_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    rows = write_bank(tmp_path / "bank.csv", customers=5000, seed=0, default_rate=0.3)
    assert rows > 5000
    assert time.perf_counter() - start < 2.0


def _design(data: SiteData) -> npt.NDArray[np.float64]:
    """Standardised numerics, one-hot categoricals and a bias column."""
    categorical = data.features[CATEGORICAL_INPUT]
    one_hot = [
        np.eye(len(values) + 1)[categorical[:, j]]
        for j, values in enumerate(bank_schema()["categorical_features"].values())
    ]
    bias = np.ones((data.accepted, 1))
    return np.concatenate([data.features[NUMERIC_INPUT], *one_hot, bias], axis=1)


@pytest.mark.parametrize(("rate", "seed"), [(0.3, 5), (0.5, 6)])
def test_the_label_is_learnable_by_logistic_regression(
    tmp_path: Path, rate: float, seed: int
) -> None:
    path = tmp_path / "bank.csv"
    write_bank(path, customers=2000, seed=seed, default_rate=rate)
    data, _ = load_tabular_dataset(
        TabularDataConfig(format="csv", path=path, **bank_schema()), b"salt"
    )
    x, y = _design(data), data.labels.astype(np.float64)
    # Hold out whole customers, as a site's holdout split must.
    keys = np.array(data.person_keys)
    persons = np.unique(keys)
    held = np.isin(keys, np.random.default_rng(0).choice(persons, len(persons) // 4, False))

    weights = np.zeros(x.shape[1])
    for _ in range(1500):
        p = 1.0 / (1.0 + np.exp(-x[~held] @ weights))
        weights -= 0.5 * (x[~held].T @ (p - y[~held]) / len(p) + 1e-4 * weights)
    accuracy = float(((x[held] @ weights > 0) == (y[held] == 1)).mean())
    majority = max(y[held].mean(), 1 - y[held].mean())

    assert accuracy >= 0.85
    assert accuracy > majority + 0.15
