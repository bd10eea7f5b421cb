"""The kinds of site data, as a registry: how each is read and cleaned.

Each entry says how its records become model inputs (``load``) and how that cleaning
is described for an installed artifact (``preprocessing``). A kind whose cleaning is
fixed by its config describes it without reading a record; a table's is fitted on the
site's data, so only loading it can tell (``preprocessing`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.data import SiteData
from client.data.dicom import load_dicom_dataset
from client.data.tabular import load_tabular_dataset
from client.data.text import load_text_dataset
from client.predict import dicom_preprocessing, tabular_preprocessing, text_preprocessing
from common.config import (
    DataConfig,
    DicomDataConfig,
    TabularDataConfig,
    TextDataConfig,
    data_kind,
)
from common.registry import Registry
from common.tasks.image_input import image_input
from common.tasks.tabular import public_bounds
from common.tasks.text import load_tokenizer


@dataclass(frozen=True)
class Loaded:
    """A kind's loader output: the records, how they were cleaned, and class weights
    (tables only: fitted on the site's own labels)."""

    data: SiteData
    preprocessing: dict[str, Any]
    class_weights: list[float] | None = None


@dataclass(frozen=True)
class DataKindSpec:
    name: str
    load: Callable[[Any, bytes, Path], Loaded]
    """(data config, person-key salt, base model directory) -> Loaded."""
    preprocessing: Callable[[Any, Path], dict[str, Any] | None]
    """(data config, base model directory) -> the cleaning, when the config fixes it."""
    reads_base_model: bool = False
    """Whether loading uses the base model's files (a text site's tokenizer, an image
    site's input size, channels and normalisation)."""


def _load_dicom(config: DicomDataConfig, salt: bytes, base: Path) -> Loaded:
    """Images are sized and normalised as the base model takes them."""
    image = image_input(base)
    return Loaded(load_dicom_dataset(config, salt, image), dicom_preprocessing(config, image))


def _dicom_cleaning(config: DicomDataConfig, base: Path) -> dict[str, Any]:
    return dicom_preprocessing(config, image_input(base))


def _load_table(config: TabularDataConfig, salt: bytes, base: Path) -> Loaded:
    """Numeric features are scaled by the base model's public bounds, when it has them."""
    data, preprocessor = load_tabular_dataset(config, salt, public_bounds(base))
    return Loaded(data, tabular_preprocessing(preprocessor), list(preprocessor.class_weights))


def _load_text(config: TextDataConfig, salt: bytes, base: Path) -> Loaded:
    data = load_text_dataset(config, salt, load_tokenizer(base))
    return Loaded(data, text_preprocessing(config, base))


DATA_KINDS: Registry[DataKindSpec] = Registry(
    "data kind",
    [
        (
            "dicom",
            DataKindSpec("dicom", _load_dicom, _dicom_cleaning, reads_base_model=True),
        ),
        ("table", DataKindSpec("table", _load_table, lambda _c, _b: None, reads_base_model=True)),
        (
            "text",
            DataKindSpec("text", _load_text, text_preprocessing, reads_base_model=True),
        ),
    ],
)


def kind_of(config: DataConfig) -> DataKindSpec:
    """The registry entry of a site's ``[data]`` (common.config.data_kind decides)."""
    return DATA_KINDS.get(str(data_kind(config)))
