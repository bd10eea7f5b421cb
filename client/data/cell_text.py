"""How a table cell's value is matched against the values a site config declares (its
classes, a categorical column's allowed values).

A CSV holds text and Parquet typed values, and a label may be written 1, 1.0, "1" or
" 1 " in either: every form of one value must find the same class, or a site's labels
would depend on how its export tool writes numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd


def as_text(value: object) -> str | None:
    """Canonical text of a cell, so 1, 1.0, '1' and ' 1 ' compare equal; None if missing."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        return None if math.isnan(number) else _number_text(number)
    text = str(value).strip()
    return text or None


def _number_text(number: float) -> str:
    return str(int(number)) if number.is_integer() else repr(number)


def _numeric_alias(text: str) -> str | None:
    """'1.0' -> '1', so a label written as a float still matches class '1'."""
    try:
        number = float(text)
    except ValueError:
        return None
    return _number_text(number) if math.isfinite(number) else None


def column_texts(column: pd.Series) -> list[str | None]:
    """Canonical text per cell, converting each distinct value once."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    texts = [as_text(value) for value in uniques]
    return [texts[code] if code >= 0 else None for code in codes]


def text_lookup(declared: Sequence[str]) -> Callable[[str | None], int | None]:
    """Index of a cell's text in ``declared`` (exact first, then numerically equal)."""
    index: dict[str, int] = {}
    for position, name in enumerate(declared):
        index.setdefault(name.strip(), position)
    for position, name in enumerate(declared):
        alias = _numeric_alias(name.strip())
        if alias is not None:
            index.setdefault(alias, position)

    def lookup(text: str | None) -> int | None:
        if text is None:
            return None
        if text in index:
            return index[text]
        alias = _numeric_alias(text)
        return index.get(alias) if alias is not None else None

    return lookup


MAX_LISTED_COLUMNS = 20
"""Column names an error message lists at most."""


def found_columns(found: Sequence[object]) -> str:
    """The column names a table has, for an error message; but only their count when
    one of them is a number: then the first row is likely data (a file written without
    a header row), and its values must not reach the site's console or log."""
    names = [str(column) for column in found]
    if any(_is_number(name) for name in names):
        return (
            f"the table has {len(names)} columns and its first row holds numbers: it needs "
            "a header row naming its columns"
        )
    listed = ", ".join(names[:MAX_LISTED_COLUMNS])
    if len(names) > MAX_LISTED_COLUMNS:
        listed += f", … ({len(names) - MAX_LISTED_COLUMNS} more)"
    return f"found columns: {listed or '(none)'}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
