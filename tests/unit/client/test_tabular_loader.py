"""The tabular loader: schema checks, row rejections and cleaning fitted per site."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from client.data import person_key
from client.data.tabular import (
    CATEGORICAL_INPUT,
    NUMERIC_INPUT,
    TabularPreprocessor,
    load_tabular_dataset,
)
from common.config import TabularDataConfig
from common.errors import DataError
from simulations.generators.tabular import bank_schema, write_bank

SALT = b"site-salt"


def _config(path: Path, **overrides: Any) -> TabularDataConfig:
    fields: dict[str, Any] = {
        "format": "parquet" if path.suffix == ".parquet" else "csv",
        "path": path,
        "classes": ["repaid", "default"],
        "label_column": "default",
        "person_column": "customer_id",
        "numeric_features": ["income"],
        "categorical_features": {"region": ["north", "south", "east", "west"]},
    }
    fields.update(overrides)
    return TabularDataConfig(**fields)


def _write(tmp_path: Path, columns: dict[str, list[Any]], name: str = "table.csv") -> Path:
    path = tmp_path / name
    frame = pd.DataFrame(columns)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _simple_table(incomes: Sequence[float | None]) -> dict[str, list[Any]]:
    n = len(incomes)
    return {
        "customer_id": [f"C{i:07d}" for i in range(n)],
        "income": list(incomes),
        "region": ["north"] * n,
        "default": ["repaid", "default"] * (n // 2) + ["repaid"] * (n % 2),
    }


def _floats(values: np.ndarray) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64)


def _bank(tmp_path: Path, name: str = "bank.csv", **kwargs: Any) -> TabularDataConfig:
    path = tmp_path / name
    options: dict[str, Any] = {"customers": 400, "seed": 7, "default_rate": 0.3}
    options.update(kwargs)
    fmt: Literal["csv", "parquet"] = "parquet" if path.suffix == ".parquet" else "csv"
    write_bank(path, file_format=fmt, **options)
    return TabularDataConfig(format=fmt, path=path, **bank_schema())


# -------------------------------------------------------------------- cleaning ---


def test_median_imputation_fills_missing_values_with_the_site_median(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0, None, 10.0, 4.0]))
    data, pre = load_tabular_dataset(_config(path), SALT)

    assert pre.medians == [3.0]  # median of 1, 2, 4, 10
    imputed = np.array([1.0, 2.0, 3.0, 10.0, 4.0])  # nothing is beyond 3σ with 5 values
    expected = (imputed - imputed.mean()) / imputed.std()
    np.testing.assert_allclose(_floats(data.features[NUMERIC_INPUT][:, 0]), expected, rtol=1e-6)
    assert data.features[NUMERIC_INPUT].dtype == np.float32


def test_an_extreme_value_is_clipped_to_mean_plus_three_sigma(tmp_path: Path) -> None:
    incomes = [float(v) for v in range(60)] + [10_000.0]
    path = _write(tmp_path, _simple_table(incomes))
    data, pre = load_tabular_dataset(_config(path), SALT)

    raw = np.array(incomes)
    high = raw.mean() + 3 * raw.std()
    assert high < 10_000.0
    assert pre.clip_high[0] == pytest.approx(high)
    assert pre.clip_low[0] == pytest.approx(raw.mean() - 3 * raw.std())
    # Undo the standardisation: the extreme row sits exactly at the clipping bound.
    restored = data.features[NUMERIC_INPUT][-1, 0] * pre.stds[0] + pre.means[0]
    assert restored == pytest.approx(high, rel=1e-5)
    clipped = np.clip(raw, None, high)
    assert pre.means[0] == pytest.approx(clipped.mean())
    assert pre.stds[0] == pytest.approx(clipped.std())


def test_numeric_features_are_standardised_on_the_site_data(tmp_path: Path) -> None:
    data, _ = load_tabular_dataset(_bank(tmp_path), SALT)
    values = data.features[NUMERIC_INPUT].astype(np.float64)

    assert values.shape == (data.accepted, len(bank_schema()["numeric_features"]))
    np.testing.assert_allclose(values.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(values.std(axis=0), 1.0, atol=1e-4)
    assert np.isfinite(values).all()


def test_constant_column_is_centred_not_divided_by_zero(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([0.1] * 8))
    data, pre = load_tabular_dataset(_config(path), SALT)
    assert pre.stds == [1.0]
    np.testing.assert_allclose(_floats(data.features[NUMERIC_INPUT]), 0.0, atol=1e-6)


def test_categorical_values_map_to_declared_index_plus_one_and_unknown_to_zero(
    tmp_path: Path,
) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    table["region"] = ["north", "south", None, "mars", " west ", "east"]
    path = _write(tmp_path, table)
    data, pre = load_tabular_dataset(_config(path), SALT)

    np.testing.assert_array_equal(data.features[CATEGORICAL_INPUT][:, 0], [1, 2, 0, 0, 4, 3])
    assert data.features[CATEGORICAL_INPUT].dtype == np.int64
    assert pre.cardinalities == [5]


def test_numbers_in_a_categorical_column_compare_as_text(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 4.0])
    table["grade"] = [1, 2, 3, None]  # parquet stores this as float: 1.0 must match "1"
    path = _write(tmp_path, table, "table.parquet")
    config = _config(path, categorical_features={"grade": ["1", "2"]})
    data, _ = load_tabular_dataset(config, SALT)
    np.testing.assert_array_equal(data.features[CATEGORICAL_INPUT][:, 0], [1, 2, 0, 0])


def test_no_feature_of_a_kind_gives_an_empty_second_axis(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0, 3.0]))
    data, _ = load_tabular_dataset(_config(path, categorical_features={}), SALT)
    assert data.features[CATEGORICAL_INPUT].shape == (3, 0)
    assert data.features[NUMERIC_INPUT].shape == (3, 1)


def test_class_weights_are_inverse_frequency(tmp_path: Path) -> None:
    table = _simple_table([float(v) for v in range(8)])
    table["default"] = ["repaid"] * 6 + ["default"] * 2
    path = _write(tmp_path, table)
    _, pre = load_tabular_dataset(_config(path), SALT)
    assert pre.class_weights == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])


def test_an_absent_class_gets_weight_zero(tmp_path: Path) -> None:
    table = _simple_table([float(v) for v in range(6)])
    table["default"] = ["repaid"] * 4 + ["default"] * 2
    path = _write(tmp_path, table)
    config = _config(path, classes=["repaid", "default", "written-off"])
    _, pre = load_tabular_dataset(config, SALT)
    assert pre.class_weights == pytest.approx([6 / (2 * 4), 6 / (2 * 2), 0.0])


def test_preprocessor_json_round_trip_gives_the_identical_transform(tmp_path: Path) -> None:
    config = _bank(tmp_path)
    _, pre = load_tabular_dataset(config, SALT)
    restored = TabularPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))

    assert restored == pre
    fresh = tmp_path / "new.csv"
    write_bank(fresh, customers=50, seed=99, default_rate=0.5)
    frame = pd.read_csv(fresh)
    before, after = pre.transform(frame), restored.transform(frame)
    assert before.keys() == after.keys() == {NUMERIC_INPUT, CATEGORICAL_INPUT}
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_a_malformed_saved_preprocessor_is_refused(tmp_path: Path) -> None:
    _, pre = load_tabular_dataset(_config(_write(tmp_path, _simple_table([1.0, 2.0]))), SALT)
    broken = pre.to_dict()
    broken["stds"] = []
    with pytest.raises(DataError, match="stds has 0 entries, expected 1"):
        TabularPreprocessor.from_dict(broken)
    with pytest.raises(DataError, match="unsupported version"):
        TabularPreprocessor.from_dict({**pre.to_dict(), "version": 99})


def test_transform_at_prediction_time_needs_no_label_and_imputes(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0, None, 10.0, 4.0]))
    _, pre = load_tabular_dataset(_config(path), SALT)
    inputs = pre.transform(pd.DataFrame({"income": [None, 4.0], "region": ["east", "x"]}))
    np.testing.assert_allclose(
        _floats(inputs[NUMERIC_INPUT][:, 0]),
        np.array([(3.0 - pre.means[0]) / pre.stds[0], 0.0]),
        atol=1e-6,
    )
    np.testing.assert_array_equal(inputs[CATEGORICAL_INPUT][:, 0], [3, 0])


def test_cleaning_is_fitted_on_each_site_own_data(tmp_path: Path) -> None:
    config_a = _bank(tmp_path, "a.csv", seed=1, default_rate=0.2)
    config_b = _bank(tmp_path, "b.csv", seed=2, default_rate=0.6, customers=300)
    _, pre_a = load_tabular_dataset(config_a, SALT)
    _, pre_b = load_tabular_dataset(config_b, SALT)

    assert pre_a.means != pre_b.means
    assert pre_a.medians != pre_b.medians
    assert pre_a.class_weights[1] > 1.0 > pre_b.class_weights[1]  # a: few defaults, b: many
    # A's table is centred by its own cleaning, not by B's.
    frame_a = pd.read_csv(config_a.path)
    own = pre_a.transform(frame_a)[NUMERIC_INPUT]
    other = pre_b.transform(frame_a)[NUMERIC_INPUT]
    np.testing.assert_allclose(own.mean(axis=0), 0.0, atol=1e-5)
    assert np.abs(other.mean(axis=0)).max() > 1e-3


# -------------------------------------------------------------- schema errors ---


@pytest.mark.parametrize(
    ("dropped", "key"),
    [
        ("income", "data.numeric_features"),
        ("region", "data.categorical_features"),
        ("default", "data.label_column"),
        ("customer_id", "data.person_column"),
    ],
)
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_missing_declared_column_is_named(
    tmp_path: Path, dropped: str, key: str, suffix: str
) -> None:
    table = _simple_table([1.0, 2.0, 3.0])
    del table[dropped]
    path = _write(tmp_path, table, "table" + suffix)
    message = f"column '{dropped}' declared in {key} is missing from the table; found columns: "
    with pytest.raises(DataError, match=message) as caught:
        load_tabular_dataset(_config(path), SALT)
    for column in table:
        assert column in str(caught.value)


@pytest.mark.parametrize("huge", [1e200, -1e308])
def test_a_value_too_large_to_standardise_is_treated_as_missing(
    tmp_path: Path, huge: float
) -> None:
    """Its square would overflow float64 and turn the column's statistics into NaN."""
    path = _write(tmp_path, _simple_table([10.0, 20.0, huge, 30.0, 40.0, 50.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning on the console either
        data, preprocessor = load_tabular_dataset(_config(path), SALT)
    assert np.isfinite(data.features[NUMERIC_INPUT]).all()
    assert preprocessor.medians == [30.0] and math.isfinite(preprocessor.stds[0])


def test_a_nested_parquet_column_is_refused_by_name(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 4.0])
    table["region"] = [["north"], ["south"], [], ["east", "west"]]  # a list per cell
    path = _write(tmp_path, table, "table.parquet")
    with pytest.raises(DataError, match=r"column 'region' declared in data\.categorical_features"):
        load_tabular_dataset(_config(path), SALT)


def test_a_table_without_a_header_row_is_named_without_its_first_row(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("PAT-4711,Doe John,3.5,a,1\nPAT-4712,Roe Jane,2.0,b,0\n")
    with pytest.raises(DataError, match="its first row holds numbers: it needs a header") as caught:
        load_tabular_dataset(_config(path), SALT)
    assert "Doe" not in str(caught.value) and "PAT" not in str(caught.value)


def test_a_non_numeric_numeric_column_is_named_without_its_values(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 4.0, 5.0])
    table["income"] = ["1200", "Jane Doe", "", "12k", "3.5"]
    path = _write(tmp_path, table)
    with pytest.raises(DataError) as caught:
        load_tabular_dataset(_config(path), SALT)
    message = str(caught.value)
    assert message == (
        "column 'income' declared in data.numeric_features is not numeric: "
        "2 of 5 rows hold a value that is not a number (first at row 2)"
    )
    assert "Jane" not in message and "12k" not in message


def test_undeclared_columns_are_ignored(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0])
    table["free_text"] = ["not a number", "x", "y"]
    path = _write(tmp_path, table)
    data, pre = load_tabular_dataset(_config(path), SALT)
    assert data.accepted == 3
    assert "free_text" not in json.dumps(pre.to_dict())


def test_the_person_column_may_not_be_a_feature(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0]))
    config = _config(path, categorical_features={"customer_id": ["C0000000"]})
    with pytest.raises(DataError, match="person column 'customer_id' is declared as a feature"):
        load_tabular_dataset(config, SALT)


def test_the_label_may_not_be_a_feature(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0]))
    config = _config(path, categorical_features={"default": ["repaid", "default"]})
    with pytest.raises(DataError, match="label column 'default' is also declared as a feature"):
        load_tabular_dataset(config, SALT)


def test_a_missing_file_is_a_data_error_without_the_path(tmp_path: Path) -> None:
    path = tmp_path / "secret-bank-name" / "nope.csv"
    with pytest.raises(DataError, match=r"data\.path: the table file does not exist") as caught:
        load_tabular_dataset(_config(path), SALT)
    assert "secret-bank-name" not in str(caught.value)


def test_a_csv_declared_as_parquet_is_a_data_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0]))
    config = _config(path, format="parquet")
    with pytest.raises(DataError, match=r"data\.path: cannot be read as parquet"):
        load_tabular_dataset(config, SALT)


def test_an_empty_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"data\.path: the CSV file is empty"):
        load_tabular_dataset(_config(path), SALT)


def test_a_header_only_table_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("customer_id,income,region,default\n")
    with pytest.raises(DataError, match="the data table has no rows"):
        load_tabular_dataset(_config(path), SALT)


# -------------------------------------------------------------- row rejection ---


def test_bad_rows_are_rejected_with_reasons_and_row_numbers(tmp_path: Path) -> None:
    table: dict[str, list[Any]] = {
        "customer_id": ["C1", "C2", None, "C4", "C5", None],
        "income": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "region": ["north"] * 6,
        "default": ["repaid", "maybe", "default", None, "default", "maybe"],
    }
    path = _write(tmp_path, table)
    data, _ = load_tabular_dataset(_config(path), SALT)

    assert data.accepted == 2
    np.testing.assert_array_equal(data.labels, [0, 1])
    bad_label = "label value is not one of data.classes (repaid, default)"
    no_person = "person id is missing (column 'customer_id')"
    assert [(r.record, r.reason) for r in data.rejected] == [
        ("row 2", bad_label),
        ("row 3", no_person),
        ("row 4", "label is missing (column 'default')"),
        ("row 6", f"{bad_label}; {no_person}"),
    ]
    assert data.features[NUMERIC_INPUT].shape == (2, 1)


def test_numeric_labels_match_classes_as_text(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 4.0])
    table["default"] = [0.0, 1.0, 1.0, 2.0]
    path = _write(tmp_path, table, "table.parquet")
    data, _ = load_tabular_dataset(_config(path, classes=["0", "1"]), SALT)
    np.testing.assert_array_equal(data.labels, [0, 1, 1])
    assert [r.record for r in data.rejected] == ["row 4"]


def test_cleaning_uses_only_accepted_rows(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 1000.0])
    table["default"] = ["repaid", "default", "repaid", None]
    path = _write(tmp_path, table)
    _, pre = load_tabular_dataset(_config(path), SALT)
    assert pre.medians == [2.0]
    assert pre.means == [pytest.approx(2.0)]


def test_no_accepted_rows_is_a_data_error(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0])
    table["default"] = ["maybe", None]
    path = _write(tmp_path, table)
    with pytest.raises(DataError, match="no usable rows: all 2 rows were rejected"):
        load_tabular_dataset(_config(path), SALT)


# --------------------------------------------------------- formats and persons ---


def test_csv_and_parquet_give_the_same_site_data(tmp_path: Path) -> None:
    csv_data, csv_pre = load_tabular_dataset(_bank(tmp_path, "bank.csv"), SALT)
    pq_data, pq_pre = load_tabular_dataset(_bank(tmp_path, "bank.parquet"), SALT)

    assert csv_data.accepted == pq_data.accepted > 400
    np.testing.assert_array_equal(csv_data.labels, pq_data.labels)
    assert csv_data.person_keys == pq_data.person_keys
    for name in (NUMERIC_INPUT, CATEGORICAL_INPUT):
        np.testing.assert_allclose(
            _floats(csv_data.features[name]), _floats(pq_data.features[name]), rtol=1e-6
        )
    assert csv_pre.class_weights == pytest.approx(pq_pre.class_weights)


def test_rows_of_one_customer_share_a_person_key(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0, 3.0, 4.0, 5.0])
    table["customer_id"] = ["C7", "C8", "C7", "C9", "C7"]
    path = _write(tmp_path, table)
    data, _ = load_tabular_dataset(_config(path), SALT)

    keys = data.person_keys
    assert keys[0] == keys[2] == keys[4] == person_key("C7", SALT)
    assert len({keys[0], keys[1], keys[3]}) == 3
    assert data.persons == 3
    other_site, _ = load_tabular_dataset(_config(path), b"another-salt")
    assert other_site.person_keys[0] != keys[0]


def test_ids_keep_leading_zeros(tmp_path: Path) -> None:
    table = _simple_table([1.0, 2.0])
    table["customer_id"] = ["007", "7"]
    path = _write(tmp_path, table)
    data, _ = load_tabular_dataset(_config(path), SALT)
    assert data.person_keys == [person_key("007", SALT), person_key("7", SALT)]


def test_without_a_person_column_each_row_is_its_own_person(tmp_path: Path) -> None:
    path = _write(tmp_path, _simple_table([1.0, 2.0, 3.0]))
    data, _ = load_tabular_dataset(_config(path, person_column=None), SALT)
    assert data.person_keys == [person_key(f"row-{i}", SALT) for i in (1, 2, 3)]
    assert data.persons == 3


def test_bank_customers_with_several_loans_share_one_key(tmp_path: Path) -> None:
    config = _bank(tmp_path)
    data, _ = load_tabular_dataset(config, SALT)
    frame = pd.read_csv(config.path)
    assert data.persons == frame["customer_id"].nunique() < data.accepted


def test_no_identifier_leaves_the_loader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _bank(tmp_path, customers=200)
    frame = pd.read_csv(config.path)
    frame.loc[[3, 10], "default"] = "unknown"  # exercise the rejection path too
    frame.loc[[5], "customer_id"] = None
    frame.to_csv(config.path, index=False)

    with caplog.at_level(logging.DEBUG, logger="client.data.tabular"):
        data, pre = load_tabular_dataset(config, SALT)

    assert len(data.rejected) == 3
    assert caplog.records, "the loader should log its counts"
    exposed = "\n".join(
        [
            caplog.text,
            repr(data.rejected),
            " ".join(data.person_keys),
            json.dumps(pre.to_dict()),
            repr(sorted(data.features)),
            repr(data.classes),
        ]
    )
    identifiers = set(frame["customer_id"].dropna()) | set(frame["customer_name"])
    identifiers |= {part for name in frame["customer_name"] for part in name.split()}
    leaked = sorted(value for value in identifiers if value in exposed)
    assert not leaked
    assert str(tmp_path) not in caplog.text
    assert all(np.issubdtype(values.dtype, np.number) for values in data.features.values())
