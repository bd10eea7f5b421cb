"""The text loader: declared columns only, tokenised at the site, empty and over-long
texts rejected or cut and reported, and the same data from CSV, Parquet and JSONL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.data.text import EMPTY_TEXT, load_text_dataset, tokenise
from common.config import TextDataConfig
from common.errors import DataError
from common.tasks.text import build_word_tokenizer

WORDS = [
    "no",
    "acute",
    "findings",
    "large",
    "pneumothorax",
    "the",
    "lungs",
    "are",
    "clear",
    "card",
    "was",
    "stolen",
]
SALT = b"salt"


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_word_tokenizer(WORDS)


def _rows() -> list[dict[str, str]]:
    return [
        {"patient": "p1", "name": "Ann Example", "report": "no acute findings", "label": "routine"},
        {"patient": "p1", "name": "Ann Example", "report": "large pneumothorax", "label": "urgent"},
        {
            "patient": "p2",
            "name": "Bo Example",
            "report": "the lungs are clear",
            "label": "routine",
        },
        {"patient": "p3", "name": "Cy Example", "report": "   ", "label": "routine"},
        {"patient": "p4", "name": "Di Example", "report": "card was stolen", "label": "maybe"},
        {
            "patient": "p5",
            "name": "Ed Example",
            "report": " ".join(["clear"] * 30),
            "label": "urgent",
        },
    ]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(path: Path, **overrides: object) -> TextDataConfig:
    values: dict[str, object] = {
        "format": path.suffix.lstrip("."),
        "path": path,
        "classes": ["routine", "urgent"],
        "text_column": "report",
        "label_column": "label",
        "person_column": "patient",
        "max_tokens": 8,
    }
    values.update(overrides)
    return TextDataConfig.model_validate(values)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_every_format_gives_the_same_tokens_and_reports(tmp_path, tokenizer, suffix) -> None:
    data = load_text_dataset(_config(_write(tmp_path / f"t{suffix}", _rows())), SALT, tokenizer)
    assert data.accepted == 4
    assert data.features["input_ids"].shape == (4, 8)
    assert data.features["input_ids"].dtype == np.int64
    assert list(data.labels) == [0, 1, 0, 1]
    assert data.persons == 3  # p1 owns two reports
    reasons = {r.record: r.reason for r in data.rejected}
    assert reasons["row 4"] == EMPTY_TEXT
    assert "label value is not one of data.classes" in reasons["row 5"]
    assert data.adjusted == {"text cut to data.max_tokens = 8 tokens": 1}


def test_padding_is_on_the_right_with_a_matching_mask(tmp_path, tokenizer) -> None:
    data = load_text_dataset(_config(_write(tmp_path / "t.csv", _rows())), SALT, tokenizer)
    ids, mask = data.features["input_ids"], data.features["attention_mask"]
    first = tokenizer("no acute findings")["input_ids"]
    assert list(ids[0, :3]) == first and list(ids[0, 3:]) == [tokenizer.pad_token_id] * 5
    assert list(mask[0]) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert mask[3].all()  # the cut text fills all 8 positions


def test_overlong_reject_and_the_character_limit_leave_texts_out(tmp_path, tokenizer) -> None:
    path = _write(tmp_path / "t.csv", _rows())
    data = load_text_dataset(_config(path, overlong="reject"), SALT, tokenizer)
    reasons = {r.record: r.reason for r in data.rejected}
    assert reasons["row 6"] == "text is over-long (more than data.max_tokens = 8)"
    assert data.accepted == 3 and data.adjusted == {}

    data = load_text_dataset(_config(path, max_characters=18), SALT, tokenizer)
    reasons = {r.record: r.reason for r in data.rejected}
    assert "data.max_characters = 18" in reasons["row 3"]  # "the lungs are clear" is 19


def test_rejections_never_quote_the_text_or_the_person(tmp_path, tokenizer) -> None:
    data = load_text_dataset(_config(_write(tmp_path / "t.csv", _rows())), SALT, tokenizer)
    reported = " ".join(r.reason + r.record for r in data.rejected)
    assert "stolen" not in reported and "p4" not in reported and "Example" not in reported
    assert all(len(key) == 16 and key != "p1" for key in data.person_keys)


def test_a_missing_declared_column_is_named(tmp_path, tokenizer) -> None:
    path = _write(tmp_path / "t.jsonl", _rows())
    with pytest.raises(DataError, match=r"'narrative' declared in data\.text_column is missing"):
        load_text_dataset(_config(path, text_column="narrative"), SALT, tokenizer)


def test_nothing_usable_is_an_error_with_the_reasons(tmp_path, tokenizer) -> None:
    rows = [{"patient": "p", "name": "n", "report": "", "label": "routine"}]
    with pytest.raises(DataError, match="all 1 were rejected \\(text is empty: 1\\)"):
        load_text_dataset(_config(_write(tmp_path / "t.csv", rows)), SALT, tokenizer)


def test_tokenise_counts_unknown_words_as_tokens(tokenizer) -> None:
    result = tokenise(
        ["zebra quagga", None, "the lungs"], tokenizer, max_tokens=4, max_characters=100
    )
    assert list(result.kept) == [True, False, True]
    assert result.input_ids[0, :2].tolist() == [tokenizer.unk_token_id] * 2
    assert result.reasons[1] == EMPTY_TEXT


def test_a_jsonl_file_is_read_line_by_line(tmp_path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows: list[dict[str, object]] = [dict(row) for row in _rows()]
    rows[0]["patient"] = 10**30  # pandas' reader refused the whole file for one such id
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")  # a blank line
    data = load_text_dataset(_config(path), SALT, tokenizer)
    assert data.accepted == 4 and data.persons == 4
    for broken, message in (
        ('{"patient": "p9", "report": "Jane Doe",\n', "line 7 is not valid JSON"),
        ('["a list", "not an object"]\n', "line 7 is not a JSON object"),
        (
            '{"patient": "p9", "report": ["a", "b"], "label": "urgent"}\n',
            "column 'report' declared in data.text_column holds nested values",
        ),
    ):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows) + broken)
        with pytest.raises(DataError, match=re.escape(message)) as caught:
            load_text_dataset(_config(path), SALT, tokenizer)
        assert "Jane" not in str(caught.value)
