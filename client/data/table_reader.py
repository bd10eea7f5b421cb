"""Reading a declared table (CSV, Parquet, JSON lines) into a frame of only its declared
columns, with errors that name the file's problem and never quote its contents."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from client.data.cell_text import found_columns
from common.config import TabularDataConfig, TextDataConfig
from common.errors import DataError

__all__ = ["read_columns", "require_columns"]


def require_columns(found: Sequence[object], declared: Sequence[tuple[str, str]]) -> None:
    present = {str(name) for name in found}
    for name, key in declared:
        if name not in present:
            raise DataError(
                f"column {name!r} declared in {key} is missing from the table; "
                + found_columns(found)
            )


def _refuse_nested(schema: Any, declared: Sequence[tuple[str, str]]) -> None:
    """A declared Parquet column must hold one value per cell: a list, struct or map
    column cannot be a feature, a label or a person id."""
    import pyarrow as pa

    keys = dict(declared)
    for field in schema:
        if field.name in keys and pa.types.is_nested(field.type):
            raise DataError(
                f"column {field.name!r} declared in {keys[field.name]} holds nested values "
                f"({field.type}); declare a column of single values"
            )


def _read_jsonl(path: Path, declared: Sequence[tuple[str, str]], textual: set[str]) -> pd.DataFrame:
    """The declared keys of a JSON-lines file, one row per non-blank line. Read with
    :mod:`json` (any integer, however large, is a number; pandas' reader refuses the
    whole file for one); a line that is not a JSON object, or a declared key holding a
    list or an object, is an error naming its line or key, never its contents."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise DataError(f"data.path: line {number} is not valid JSON") from None
            if not isinstance(row, dict):
                raise DataError(f"data.path: line {number} is not a JSON object")
            rows.append(row)
    require_columns(sorted({key for row in rows for key in row}), declared)
    columns: dict[str, list[Any]] = {}
    for name, key in declared:
        values = [row.get(name) for row in rows]
        if any(isinstance(value, list | dict) for value in values):
            raise DataError(
                f"column {name!r} declared in {key} holds nested values (a list or an "
                "object); declare a key of single values"
            )
        if name in textual:  # as text, like the other formats (ids keep their form)
            values = [None if value is None else str(value) for value in values]
        columns[name] = values
    return pd.DataFrame(columns)


def read_columns(
    config: TabularDataConfig | TextDataConfig, declared: Sequence[tuple[str, str]]
) -> pd.DataFrame:
    """Read only the declared columns (of a CSV, Parquet or JSON-lines file); text-like
    ones as text so ids keep leading zeros."""
    wanted = {name for name, _ in declared}
    textual = {name: str for name, key in declared if key != "data.numeric_features"}
    path = config.path
    try:
        if config.format == "csv":
            header = list(pd.read_csv(path, nrows=0).columns)
            require_columns(header, declared)
            return pd.read_csv(path, usecols=lambda column: column in wanted, dtype=textual)
        if config.format == "jsonl":
            return _read_jsonl(path, declared, set(textual))
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        header = [name for name in schema.names if not name.startswith("__index_level_")]
        require_columns(header, declared)
        _refuse_nested(schema, declared)
        return pd.read_parquet(path, columns=[name for name, _ in declared])
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("data.path: the table file does not exist") from None
    except IsADirectoryError:
        raise DataError("data.path: is a directory, expected a file") from None
    except PermissionError:
        raise DataError("data.path: permission denied when reading the table") from None
    except pd.errors.EmptyDataError:
        raise DataError("data.path: the CSV file is empty (no header row)") from None
    except Exception as exc:  # parser and Arrow errors have no common base class
        # The library's message may quote the path or cell contents: name the type only.
        raise DataError(
            f"data.path: cannot be read as {config.format} ({type(exc).__name__}); "
            "check data.format and the file's contents"
        ) from None
