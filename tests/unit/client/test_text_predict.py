"""Prediction on texts cleans them as training did: the same tokenizer (checked by hash)
and the same length rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.predict import text_preprocessing, text_records
from common.config import TextDataConfig
from common.errors import ConfigError, DataError
from common.tasks import model_outputs
from common.tasks.text import build_word_tokenizer
from tests.unit.common.test_text_task import WORDS, save_tiny


def _preprocessing(base: Path, **overrides: object) -> dict[str, object]:
    config = TextDataConfig.model_validate(
        {
            "format": "csv",
            "path": base / "unused.csv",
            "classes": ["routine", "urgent"],
            "text_column": "report",
            "label_column": "triage",
            "max_tokens": 8,
            **overrides,
        }
    )
    return text_preprocessing(config, base)


def _texts(path: Path) -> Path:
    pd.DataFrame(
        {"id": [1, 2, 3], "report": ["w1 w2", "", " ".join(f"w{i}" for i in range(12))]}
    ).to_csv(path, index=False)
    return path


def test_texts_are_tokenised_with_the_limits_of_training(tmp_path: Path) -> None:
    base = save_tiny(tmp_path / "base", "qwen2")
    records = text_records(_preprocessing(base), _texts(tmp_path / "new.csv"))
    assert records.names == ["row 1", "row 3"]
    assert records.features["input_ids"].shape == (2, 8)
    assert [(r.record, r.reason) for r in records.skipped] == [("row 2", "text is empty")]
    assert np.array_equal(records.features["attention_mask"][0], [1, 1, 0, 0, 0, 0, 0, 0])


def test_texts_training_rejected_as_over_long_are_skipped(tmp_path: Path) -> None:
    base = save_tiny(tmp_path / "base", "qwen2")
    cleaning = _preprocessing(base, overlong="reject")
    assert cleaning["overlong"] == "reject"
    records = text_records(cleaning, _texts(tmp_path / "new.csv"))
    assert records.names == ["row 1"]
    assert "over-long" in records.skipped[1].reason


def test_a_changed_tokenizer_is_refused(tmp_path: Path) -> None:
    base = save_tiny(tmp_path / "base", "qwen2")
    cleaning = _preprocessing(base)
    build_word_tokenizer(list(reversed(WORDS))).save_pretrained(base)
    with pytest.raises(DataError, match="not the one this artifact was trained with"):
        text_records(cleaning, _texts(tmp_path / "new.csv"))


def test_model_outputs_are_read_from_config_json(tmp_path: Path) -> None:
    base = save_tiny(tmp_path / "base", "llama")
    assert model_outputs(base / "config.json") == 2
    settings = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**settings, "num_labels": 3}))
    assert model_outputs(base / "config.json") == 3
    labels = {"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}}
    (base / "config.json").write_text(json.dumps({**settings, **labels}))
    assert model_outputs(base / "config.json") == 4
    (base / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot be read"):
        model_outputs(base / "config.json")
