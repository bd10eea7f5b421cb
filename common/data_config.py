"""The ``[data]`` table of a site config: which file or folder the site's data is in,
of which kind (DICOM images, a feature table, texts), and how to read it.

Apart from the rest of the site config because each kind's loader (client/data/) needs
only its own table; the kind is decided by :func:`data_kind`, the one rule both the
config's validation and the loaders' registry follow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from common.strict_model import StrictModel

DataKind = Literal["dicom", "table", "text"]
PersonKey = Literal["patient", "study", "series", "file"]
"""Which DICOM identifier names the person an image belongs to: the privacy unit."""


BOUND_RULE = "must be two finite numbers, low < high, with a finite range high - low"


def is_public_bound(low: float, high: float) -> bool:
    """Whether [low, high] is a usable public bound of a numeric feature: the scaling
    divides by ``high - low``, which must be a positive finite number (bounds of
    ±1e308 are finite, but their range overflows and every value would scale to 0)."""
    return math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low) and low < high


class DicomDataConfig(StrictModel):
    """A directory of DICOM files, labelled by a CSV or by one sub-folder per class.

    Images are resized and normalised as the site's base model expects (its
    config.json / preprocessor_config.json), so the model, not this table, fixes the
    input size; ``image_size`` stays only so that older site files still validate, and
    the site's pre-flight reports it when it disagrees with the model.
    """

    format: Literal["dicom"]
    path: Path = Field(description="Directory holding the DICOM files.")
    classes: list[str] = Field(min_length=2, description="Class names, in label order.")
    labels: Literal["csv", "folders"] = Field(
        default="csv",
        description="'csv': a labels file with columns path,label; "
        "'folders': one sub-folder per class.",
    )
    labels_file: str = Field(default="labels.csv", description="Used when labels = 'csv'.")
    image_size: int | None = Field(
        default=None,
        ge=8,
        le=1024,
        description="Deprecated: the loader follows the base model's input size; a value "
        "that differs from it is reported by the site's pre-flight.",
    )
    person_key: PersonKey = Field(
        default="patient",
        description="Who a record belongs to (the privacy unit): 'patient' (PatientID, "
        "qualified by IssuerOfPatientID), 'study' (StudyInstanceUID), 'series' "
        "(SeriesInstanceUID) or 'file' (one person per image). For de-identified exports "
        "without PatientID use 'study' or 'file'; ε is then per study or per image.",
    )
    window_center: float | None = Field(
        default=None, description="Overrides the file's Window Center (after rescale)."
    )
    window_width: float | None = Field(
        default=None, gt=0, description="Overrides the file's Window Width (after rescale)."
    )
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _window_pair(self) -> DicomDataConfig:
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("window_center and window_width must be given together")
        return self


class TabularDataConfig(StrictModel):
    """A CSV or Parquet table with a declared schema."""

    format: Literal["csv", "parquet"]
    path: Path = Field(description="The CSV or Parquet file.")
    classes: list[str] = Field(min_length=2, description="Label values (as text), in label order.")
    label_column: str
    person_column: str | None = Field(
        default=None, description="Column identifying the customer; stays at the site."
    )
    numeric_features: list[str] = Field(default_factory=list)
    categorical_features: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Column -> allowed values. Unlisted or missing values map to 'other'.",
    )
    numeric_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Column -> [low, high]: the federation's public range of each numeric "
        "feature (every one of them, or none). Values are clipped to it and scaled to "
        "[-1, 1], and missing values take its middle, the same at every site; "
        "`fedlora model init --site` writes the bounds into the base model, which every "
        "site then follows. Without them each site scales with its own statistics.",
    )
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _has_features(self) -> TabularDataConfig:
        if not self.numeric_features and not self.categorical_features:
            raise ValueError(
                "declare at least one numeric or categorical feature "
                "(or a text_column, for a table of texts)"
            )
        return self

    @model_validator(mode="after")
    def _bounds_fit_features(self) -> TabularDataConfig:
        if not self.numeric_bounds:
            return self
        unknown = [name for name in self.numeric_bounds if name not in self.numeric_features]
        if unknown:
            raise ValueError(
                f"numeric_bounds names {unknown[0]!r}, which is not in numeric_features"
            )
        missing = [name for name in self.numeric_features if name not in self.numeric_bounds]
        if missing:
            raise ValueError(
                f"numeric_bounds must cover every numeric feature or none; {missing[0]!r} "
                f"has none ({len(missing)} missing)"
            )
        for name, (low, high) in self.numeric_bounds.items():
            if not is_public_bound(low, high):
                raise ValueError(f"numeric_bounds[{name!r}] {BOUND_RULE}")
        return self

    def bounds_in_order(self) -> list[list[float]]:
        """The numeric bounds in ``numeric_features`` order (empty: none declared)."""
        if not self.numeric_bounds:
            return []
        return [list(self.numeric_bounds[name]) for name in self.numeric_features]


class TextDataConfig(StrictModel):
    """A CSV, Parquet or JSON-lines file of texts (reports, narratives) with labels.

    Texts are tokenised at the site with the base model's own tokenizer. Empty texts are
    rejected; texts over ``max_tokens`` tokens are cut (or rejected, by ``overlong``) and
    texts over ``max_characters`` are rejected before tokenising, so one huge cell cannot
    exhaust the site's memory. Every such record is counted in the site's report.
    """

    format: Literal["csv", "parquet", "jsonl"]
    path: Path = Field(description="The CSV, Parquet or JSONL (one JSON object per line) file.")
    classes: list[str] = Field(min_length=2, description="Label values (as text), in label order.")
    text_column: str = Field(description="Column (JSONL: key) holding the text.")
    label_column: str
    person_column: str | None = Field(
        default=None, description="Column identifying the patient or customer; stays at the site."
    )
    max_tokens: int = Field(
        default=128, ge=8, le=8192, description="Tokens kept per text (the model's input length)."
    )
    overlong: Literal["truncate", "reject"] = Field(
        default="truncate",
        description="Texts longer than max_tokens: 'truncate' keeps their first max_tokens "
        "tokens, 'reject' leaves them out. Either way they are counted and reported.",
    )
    max_characters: int = Field(
        default=100_000, ge=1, description="Texts longer than this are rejected untokenised."
    )
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _distinct_columns(self) -> TextDataConfig:
        roles = {"text_column": self.text_column, "label_column": self.label_column}
        if self.person_column is not None:
            roles["person_column"] = self.person_column
        names = list(roles.values())
        for role, name in roles.items():
            if names.count(name) > 1:
                raise ValueError(f"column {name!r} is given for more than one role ({role}, …)")
        return self


def data_kind(data: object) -> DataKind | None:
    """Which kind of data a ``[data]`` table describes: ``format = "dicom"`` is DICOM,
    a table with a ``text_column`` (or in JSONL) is text, any other CSV/Parquet is a
    feature table. None when it is none of them."""
    if isinstance(data, dict):
        fmt, has_text = data.get("format"), "text_column" in data
    else:
        fmt, has_text = getattr(data, "format", None), isinstance(data, TextDataConfig)
    if fmt == "dicom":
        return "dicom"
    if has_text or fmt == "jsonl":
        return "text"
    if fmt in ("csv", "parquet"):
        return "table"
    return None


DataConfig = Annotated[
    Annotated[DicomDataConfig, Tag("dicom")]
    | Annotated[TabularDataConfig, Tag("table")]
    | Annotated[TextDataConfig, Tag("text")],
    Discriminator(
        data_kind,
        custom_error_type="data_format",
        custom_error_message="data.format must be 'dicom', 'csv', 'parquet' or 'jsonl' "
        "(a CSV/Parquet file with a text_column is text data)",
    ),
]
