"""Prediction with an installed artifact: records cleaned exactly as in training.

A site's cleaning depends on its own data (the window of its scanners, the medians and
spreads of its tables), so when a site installs an artifact it writes its cleaning next
to it as ``preprocessing.json``. That file is site-private: it is never sent and is not
part of the signed artifact. An imaging artifact without one falls back to the model's
input shape (side and channels, with the demo normalisation) and each file's own window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from client.data import Rejection
from client.data.dicom import UnusableImageError, preprocess_file
from client.data.tabular import TabularPreprocessor
from client.data.text import text_of, tokenise
from common.artifact import MODEL_INT8, Manifest
from common.config import DicomDataConfig, TextDataConfig
from common.errors import DataError
from common.inference import OnnxClassifier, softmax
from common.tasks.image_input import ImageInput
from common.tasks.text import load_tokenizer, tokenizer_fingerprint

PREPROCESSING_FILE = "preprocessing.json"
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ""})


def dicom_preprocessing(config: DicomDataConfig, image: ImageInput) -> dict[str, Any]:
    """The site's window and the base model's input (side, channels, mean, std)."""
    return {
        "format": "dicom",
        "classes": list(config.classes),
        **image.to_dict(),
        "window_center": config.window_center,
        "window_width": config.window_width,
    }


def tabular_preprocessing(preprocessor: TabularPreprocessor) -> dict[str, Any]:
    return {"format": "table", "classes": list(preprocessor.classes), **preprocessor.to_dict()}


def text_preprocessing(config: TextDataConfig, base_model: Path) -> dict[str, Any]:
    """The tokenizer is the base model's (the artifact names that model by its hash);
    its site-local folder is recorded here, with the length limits of training."""
    return {
        "format": "text",
        "classes": list(config.classes),
        "text_column": config.text_column,
        "max_tokens": config.max_tokens,
        "max_characters": config.max_characters,
        "overlong": config.overlong,
        "tokenizer": str(base_model),
        "tokenizer_sha256": tokenizer_fingerprint(base_model),
    }


def load_preprocessing(
    artifact_dir: Path, manifest: Manifest, override: Path | None
) -> dict[str, Any]:
    """The site's cleaning for this artifact: ``override``, else the installed
    ``preprocessing.json``, else (imaging only) the model's own input size."""
    path = override or artifact_dir / PREPROCESSING_FILE
    if path.is_file():
        try:
            loaded: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path.name} cannot be read as JSON: {exc}") from None
        return loaded
    if override is not None:
        raise DataError(f"preprocessing file {override} does not exist")
    pixels = manifest.inputs.get("pixel_values")
    if pixels is not None:  # [n, C, S, S]
        shape = pixels.shape
        channels = int(shape[1]) if len(shape) == 4 else 1
        return {
            "format": "dicom",
            "classes": None,
            "image_size": int(shape[-1]),
            "channels": channels,
        }
    raise DataError(
        "tabular and text prediction need a site's cleaning (its fitted table cleaning, or "
        f"its tokenizer and length limits): install the artifact at a site (it writes "
        f"{PREPROCESSING_FILE}) or pass --preprocessing FILE"
    )


@dataclass
class Records:
    """Model inputs for the records that could be used, and the ones that could not."""

    names: list[str]
    features: dict[str, npt.NDArray[np.generic]]
    skipped: list[Rejection] = field(default_factory=list)


def dicom_records(preprocessing: dict[str, Any], path: Path) -> Records:
    """One file, or every file under a folder; an unusable file is reported and skipped.

    The model's input is the recorded one (an older record with only ``image_size`` is
    a 1-channel input normalised with mean 0.5 and std 0.5, as the demo bases were)."""
    if preprocessing.get("format") != "dicom":
        raise DataError("this artifact was not trained on DICOM images (use --csv)")
    try:
        image = ImageInput.from_dict(preprocessing)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"the preprocessing names no usable image input ({exc})") from None
    config = DicomDataConfig(
        format="dicom",
        path=path,
        classes=preprocessing.get("classes") or ["class-0", "class-1"],
        window_center=preprocessing.get("window_center"),
        window_width=preprocessing.get("window_width"),
    )
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _DICOM_SUFFIXES
        )
        root = path
    else:
        raise DataError(f"{path} does not exist")
    names: list[str] = []
    images: list[npt.NDArray[np.float32]] = []
    skipped: list[Rejection] = []
    for file in files:
        name = file.relative_to(root).as_posix()
        try:
            images.append(preprocess_file(file, config, image))
        except UnusableImageError as exc:
            skipped.append(Rejection(name, exc.reason))
            continue
        names.append(name)
    shape = (0, image.channels, image.size, image.size)
    pixels = np.stack(images) if images else np.zeros(shape, dtype=np.float32)
    return Records(names, {"pixel_values": pixels}, skipped)


def table_records(preprocessing: dict[str, Any], path: Path) -> Records:
    """Every row of a CSV or Parquet file, cleaned with the site's fitted cleaning."""
    if preprocessing.get("format") != "table":
        raise DataError("this artifact was not trained on tables (use --dicom)")
    cleaning = TabularPreprocessor.from_dict(
        {k: v for k, v in preprocessing.items() if k != "format"}
    )
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name} cannot be read as a table: {exc}") from None
    features = cleaning.transform(frame)
    return Records([f"row {i + 1}" for i in range(len(frame))], features)


def text_records(preprocessing: dict[str, Any], path: Path) -> Records:
    """Every text of a CSV, Parquet or JSONL file, tokenised as in training, with the
    same tokenizer (checked by hash) and length limits; texts training would have
    rejected (empty, or over-long under ``overlong = "reject"``) are skipped."""
    if preprocessing.get("format") != "text":
        raise DataError("this artifact was not trained on texts (use --dicom or --csv)")
    column = str(preprocessing["text_column"])
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=True, dtype={column: str})
        else:
            frame = pd.read_csv(path, dtype={column: str})
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name} cannot be read as a table of texts: {exc}") from None
    if column not in frame.columns:
        raise DataError(f"{path.name} has no column {column!r} (the text column of training)")
    tokenizer_dir = Path(preprocessing["tokenizer"])
    if not tokenizer_dir.is_dir():
        raise DataError(f"the tokenizer folder of training ({tokenizer_dir}) does not exist")
    if tokenizer_fingerprint(tokenizer_dir) != preprocessing.get("tokenizer_sha256"):
        raise DataError(
            f"the tokenizer in {tokenizer_dir} is not the one this artifact was trained with "
            "(its files changed since the site installed it)"
        )
    tokenised = tokenise(
        [text_of(value) for value in frame[column]],
        load_tokenizer(tokenizer_dir),
        max_tokens=int(preprocessing["max_tokens"]),
        max_characters=int(preprocessing["max_characters"]),
        overlong=str(preprocessing.get("overlong", "truncate")),
    )
    names = [f"row {i + 1}" for i in range(len(frame))]
    skipped = [
        Rejection(name, reason)
        for name, reason in zip(names, tokenised.reasons, strict=True)
        if reason is not None
    ]
    kept = [name for name, keep in zip(names, tokenised.kept, strict=True) if keep]
    return Records(kept, tokenised.features(), skipped)


@dataclass(frozen=True)
class Predictions:
    names: list[str]
    classes: list[str]
    probabilities: npt.NDArray[np.float64]
    skipped: list[Rejection]

    @property
    def predicted(self) -> list[str]:
        return [self.classes[int(i)] for i in self.probabilities.argmax(axis=1)]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "record": name,
                "prediction": label,
                **{f"p_{c}": round(float(p), 6) for c, p in zip(self.classes, row, strict=True)},
            }
            for name, label, row in zip(self.names, self.predicted, self.probabilities, strict=True)
        ]


def predict(
    artifact_dir: Path, manifest: Manifest, records: Records, classes: list[str] | None
) -> Predictions:
    """Run the int8 model on ``records`` (the artifact must be verified already)."""
    names = classes or [f"class-{i}" for i in range(manifest.num_labels)]
    if len(names) != manifest.num_labels:
        raise DataError(
            f"the preprocessing names {len(names)} classes, the model has {manifest.num_labels}"
        )
    if not records.names:
        probabilities = np.zeros((0, manifest.num_labels))
    else:
        logits = OnnxClassifier(artifact_dir / MODEL_INT8).logits(records.features)
        probabilities = softmax(logits)
    return Predictions(records.names, names, probabilities, records.skipped)
