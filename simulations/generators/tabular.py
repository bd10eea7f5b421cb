"""Synthetic bank loan tables for simulations and tests.

Every bank shares the same ground truth (how risk drives default), so a federation has
something common to learn; banks differ in size, seed and label skew (``default_rate``),
which makes them non-IID. The tables are deliberately dirty the way real extracts are:
missing cells, a few absurd values, several loans per customer and an identifying name
column that a loader must never use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

_FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Luca", "Mila", "Noah", "Olga", "Pavel", "Rosa", "Sami", "Tara", "Yusuf",
)  # fmt: skip
_LAST_NAMES = (
    "Berg", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hansen", "Ivanova", "Jensen",
    "Kowalski", "Larsen", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Schmidt",
    "Tanaka", "Weber", "Yilmaz",
)  # fmt: skip
_EMPLOYMENT = ("employed", "self-employed", "unemployed", "retired")
_REGIONS = ("north", "south", "east", "west")
_PRODUCTS = ("mortgage", "personal", "auto", "card")
_PRODUCT_LOG_AMOUNT = (12.3, 9.3, 9.9, 8.0)  # typical log(loan_amount) per product
_NUMERIC = (
    "age",
    "income",
    "debt_ratio",
    "credit_utilisation",
    "num_late_payments",
    "account_tenure_months",
    "loan_amount",
)
_CATEGORICAL = ("employment", "region", "product")
_LOANS_PER_CUSTOMER_P = (0.6, 0.3, 0.1)  # 1, 2 or 3 loans
_RISK_STEEPNESS = 8.0  # logit per unit of risk score: steep, so the label is learnable


def bank_schema() -> dict[str, Any]:
    """The declared schema of :func:`write_bank` tables, ready for ``TabularDataConfig``.

    A function rather than a constant so that no caller can mutate a shared dict.
    """
    return {
        "classes": ["repaid", "default"],
        "label_column": "default",
        "person_column": "customer_id",
        "numeric_features": list(_NUMERIC),
        "categorical_features": {
            "employment": list(_EMPLOYMENT),
            "region": list(_REGIONS),
            "product": list(_PRODUCTS),
        },
    }


def write_bank(
    path: Path,
    *,
    customers: int,
    seed: int,
    default_rate: float,
    missing_fraction: float = 0.05,
    outlier_fraction: float = 0.01,
    file_format: Literal["csv", "parquet"] = "csv",
) -> int:
    """Write one bank's loan table to ``path`` and return the number of rows written.

    ``default_rate`` sets the share of defaulted loans (the bank's label skew) by moving
    the intercept of the shared risk model; the risk model itself is the same for every
    bank. Output is fully determined by the arguments.
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    if not 0.0 < default_rate < 1.0:
        raise ValueError("default_rate must lie strictly between 0 and 1")
    if not 0.0 <= missing_fraction < 1.0:
        raise ValueError("missing_fraction must lie in [0, 1)")
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError("outlier_fraction must lie in [0, 1)")
    if file_format not in ("csv", "parquet"):
        raise ValueError("file_format must be 'csv' or 'parquet'")

    rng = np.random.default_rng(seed)
    frame = _clean_table(rng, customers, default_rate)
    _inject_missing(rng, frame, missing_fraction)
    _inject_outliers(rng, frame, outlier_fraction)

    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return len(frame)


def _clean_table(rng: np.random.Generator, customers: int, default_rate: float) -> pd.DataFrame:
    """Customers, their loans and the labels, before any dirt is added."""
    n = customers
    ids = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    customer_id = np.array([f"C{value:07d}" for value in ids])
    names = np.array(
        [
            f"{_FIRST_NAMES[first]} {_LAST_NAMES[last]}"
            for first, last in zip(
                rng.integers(len(_FIRST_NAMES), size=n),
                rng.integers(len(_LAST_NAMES), size=n),
                strict=True,
            )
        ]
    )
    age = np.clip(np.round(rng.normal(45.0, 14.0, n)), 18, 90)
    retired_p = np.where(age >= 65, 0.85, 0.0)
    is_retired = rng.random(n) < retired_p
    working = rng.choice(3, size=n, p=(0.72, 0.14, 0.14))  # employed / self / unemployed
    employment_idx = np.where(is_retired, 3, working)
    unemployed = (employment_idx == 2).astype(np.float64)
    income = np.round(
        np.exp(rng.normal(10.7, 0.45, n)) * np.where(unemployed == 1.0, 0.35, 1.0), -2
    )
    region_idx = rng.integers(len(_REGIONS), size=n)
    debt_ratio = np.round(rng.beta(2.0, 5.0, n), 3)
    credit_utilisation = np.round(rng.beta(2.0, 3.0, n), 3)
    num_late_payments = rng.poisson(0.3 + 2.5 * debt_ratio, n).astype(np.float64)
    account_tenure_months = np.round(np.clip(rng.gamma(2.0, 30.0, n), 1, (age - 17) * 12)).astype(
        np.float64
    )

    # Shared ground truth: a linear risk score in the observable features.
    customer_risk = (
        (debt_ratio - 0.29) / 0.16 * 0.9
        + (credit_utilisation - 0.40) / 0.20 * 0.8
        + (num_late_payments - 1.0) / 1.0 * 0.5
        + unemployed * 1.2
        - (account_tenure_months - 60.0) / 42.0 * 0.25
    )

    loans = rng.choice(len(_LOANS_PER_CUSTOMER_P), size=n, p=_LOANS_PER_CUSTOMER_P) + 1
    owner = np.repeat(np.arange(n), loans)
    rows = len(owner)
    product_idx = rng.integers(len(_PRODUCTS), size=rows)
    log_amount = np.asarray(_PRODUCT_LOG_AMOUNT)[product_idx] + rng.normal(0.0, 0.4, rows)
    loan_amount = np.round(np.exp(log_amount), -1)
    loan_risk = (
        customer_risk[owner]
        + 0.15 * (log_amount - np.asarray(_PRODUCT_LOG_AMOUNT)[product_idx]) / 0.4
        + rng.normal(0.0, 0.1, rows)
    )
    intercept = _intercept_for_rate(loan_risk, default_rate)
    p_default = _sigmoid(_RISK_STEEPNESS * loan_risk + intercept)
    defaulted = rng.random(rows) < p_default

    frame = pd.DataFrame(
        {
            "customer_id": customer_id[owner],
            "customer_name": names[owner],
            "age": age[owner],
            "income": income[owner],
            "debt_ratio": debt_ratio[owner],
            "credit_utilisation": credit_utilisation[owner],
            "num_late_payments": num_late_payments[owner],
            "account_tenure_months": account_tenure_months[owner],
            "loan_amount": loan_amount,
            "employment": np.asarray(_EMPLOYMENT, dtype=object)[employment_idx[owner]],
            "region": np.asarray(_REGIONS, dtype=object)[region_idx[owner]],
            "product": np.asarray(_PRODUCTS, dtype=object)[product_idx],
            "default": np.where(defaulted, "default", "repaid").astype(object),
        }
    )
    # Interleave customers, as in a real extract sorted by something else.
    return frame.iloc[rng.permutation(rows)].reset_index(drop=True)


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float64)


def _intercept_for_rate(risk: npt.NDArray[np.float64], rate: float) -> float:
    """The intercept whose expected default share over these loans equals ``rate``.

    Bisection on a monotone function: exact skew without depending on the score's shape.
    """
    low, high = -60.0, 60.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        if float(np.mean(_sigmoid(_RISK_STEEPNESS * risk + middle))) < rate:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def _inject_missing(rng: np.random.Generator, frame: pd.DataFrame, fraction: float) -> None:
    """Blank cells of the feature columns; ids and labels stay intact."""
    if fraction <= 0.0:
        return
    for column in (*_NUMERIC, *_CATEGORICAL):
        mask = rng.random(len(frame)) < fraction
        frame.loc[mask, column] = np.nan if column in _NUMERIC else None


def _inject_outliers(rng: np.random.Generator, frame: pd.DataFrame, fraction: float) -> None:
    """Multiply one numeric cell by 20 in a few rows: typos and unit mix-ups.

    Only present, non-zero cells are scaled, so every chosen row really gets an outlier.
    """
    rows = np.flatnonzero(rng.random(len(frame)) < fraction)
    numeric = frame.loc[:, list(_NUMERIC)].to_numpy(dtype=np.float64)
    for row in rows:
        candidates = np.flatnonzero(np.isfinite(numeric[row]) & (numeric[row] != 0.0))
        if len(candidates) == 0:
            continue
        column = _NUMERIC[int(rng.choice(candidates))]
        frame.at[row, column] = numeric[row, _NUMERIC.index(column)] * 20.0
