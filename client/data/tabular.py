"""Tabular site data: a declared CSV or Parquet table in, cleaned model inputs out.

Only the declared columns are read, so identifying columns the schema does not name (a
customer's name, an address) never enter memory. Rows the site cannot use are rejected
with a reason; the table as a whole is refused with :class:`DataError` only when it
cannot serve (unreadable, a declared column missing or malformed, nothing usable).

The cleaning is kept in a :class:`TabularPreprocessor`, so prediction later applies
exactly the same transform. With the federation's public bounds (in the base model,
from the schema's ``numeric_bounds``) it is fixed before any row is read: every value
is clipped to its feature's bounds and scaled to [-1, 1], a missing value takes the
middle, and no class is weighted, so nothing about this site's people shapes the
update except through DP-SGD. Without bounds (a base saved before them) it is fitted
on this site's own accepted rows (medians, means, class frequencies): those statistics
stay at the site, but they are computed outside DP and differ from site to site.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from client.data import Rejection, SiteData, person_key
from client.data.cell_text import as_text, column_texts, text_lookup
from client.data.table_reader import read_columns, require_columns
from common.config import TabularDataConfig, TextDataConfig
from common.errors import DataError

logger = logging.getLogger(__name__)

NUMERIC_INPUT = "numeric_values"
"""Model input name of the standardised numeric features, float32 [N, F_num]."""
CATEGORICAL_INPUT = "categorical_ids"
"""Model input name of the categorical indices, int64 [N, F_cat]; 0 means 'other'."""
OTHER_CATEGORY = 0

_CLIP_SIGMAS = 3.0
MAX_NUMERIC_MAGNITUDE = 1e100
"""A numeric value beyond ±1e100 is treated like an infinity (as missing): no
measurement is that large, and the squares of the cleaning's standard deviation would
overflow float64 (1e308) a few orders above it, turning the whole column into NaN."""
_PREPROCESSOR_VERSION = 1


# ------------------------------------------------------------------ preprocessing ---


@dataclass(frozen=True)
class TabularPreprocessor:
    """The cleaning fitted on one site's data, replayable at prediction time.

    Numeric columns: impute the median, clip to mean ± 3σ, standardise. Categorical
    columns: 1-based index into the declared values, 0 for missing or unknown values.
    """

    numeric_features: list[str]
    medians: list[float]
    clip_low: list[float]
    clip_high: list[float]
    means: list[float]
    stds: list[float]
    categorical_features: dict[str, list[str]]
    classes: list[str]
    class_weights: list[float]
    """Inverse class frequency n / (k · n_c) over the k classes present; 0 if absent."""

    @classmethod
    def fit(cls, frame: pd.DataFrame, config: TabularDataConfig) -> TabularPreprocessor:
        """Fit on ``frame`` (this site's accepted rows, label column included)."""
        if len(frame) == 0:
            raise DataError("cannot fit the tabular cleaning on zero rows")
        needed = _declared_columns(config, with_label=False)
        require_columns(list(frame.columns), [*needed, (config.label_column, "data.label_column")])

        medians: list[float] = []
        clip_low: list[float] = []
        clip_high: list[float] = []
        means: list[float] = []
        stds: list[float] = []
        for name in config.numeric_features:
            values = _numeric_column(frame, name)
            present = ~np.isnan(values)
            if not present.any():
                logger.warning("numeric column %r has no values at this site; imputing 0", name)
            median = float(np.median(values[present])) if present.any() else 0.0
            imputed = np.where(present, values, median)
            centre, spread = float(imputed.mean()), float(imputed.std())
            low, high = centre - _CLIP_SIGMAS * spread, centre + _CLIP_SIGMAS * spread
            clipped = np.clip(imputed, low, high)
            mean, std = float(clipped.mean()), float(clipped.std())
            if std <= 1e-12 * max(1.0, abs(mean)):
                std = 1.0  # constant column: centre it, do not blow it up
            logger.debug(
                "numeric column %r: %d missing imputed, %d clipped",
                name,
                int((~present).sum()),
                int(((imputed < low) | (imputed > high)).sum()),
            )
            medians.append(median)
            clip_low.append(low)
            clip_high.append(high)
            means.append(mean)
            stds.append(std)

        lookup = text_lookup(config.classes)
        labels = [lookup(as_text(value)) for value in frame[config.label_column]]
        counts = Counter(label for label in labels if label is not None)
        total, present_classes = sum(counts.values()), len(counts)
        weights = [
            total / (present_classes * counts[index]) if counts[index] else 0.0
            for index in range(len(config.classes))
        ]
        return cls(
            numeric_features=list(config.numeric_features),
            medians=medians,
            clip_low=clip_low,
            clip_high=clip_high,
            means=means,
            stds=stds,
            categorical_features=_declared_categories(config),
            classes=list(config.classes),
            class_weights=weights,
        )

    @classmethod
    def public(
        cls, config: TabularDataConfig, bounds: Sequence[Sequence[float]]
    ) -> TabularPreprocessor:
        """The cleaning fixed by the federation's public ``bounds`` (one [low, high] per
        numeric feature, in order): clip, then map [low, high] onto [-1, 1]; a missing
        value is the middle (0). Classes are not weighted."""
        if len(bounds) != len(config.numeric_features):
            raise DataError(
                f"the base model declares bounds for {len(bounds)} numeric features but "
                f"data.numeric_features names {len(config.numeric_features)}: the base was "
                "made for another schema (fedlora model init --site)"
            )
        declared = config.bounds_in_order()
        if declared and [list(map(float, pair)) for pair in bounds] != declared:
            raise DataError(
                "data.numeric_bounds differ from the bounds in the base model (the "
                "federation's schema): drop them from the site config, or rebuild the base "
                "with fedlora model init --site"
            )
        lows = [float(low) for low, _ in bounds]
        highs = [float(high) for _, high in bounds]
        middles = [(low + high) / 2 for low, high in zip(lows, highs, strict=True)]
        return cls(
            numeric_features=list(config.numeric_features),
            medians=middles,
            clip_low=lows,
            clip_high=highs,
            means=middles,
            stds=[(high - low) / 2 for low, high in zip(lows, highs, strict=True)],
            categorical_features=_declared_categories(config),
            classes=list(config.classes),
            class_weights=[1.0] * len(config.classes),
        )

    @property
    def cardinalities(self) -> list[int]:
        """Embedding sizes per categorical feature: the declared values plus 'other'."""
        return [len(values) + 1 for values in self.categorical_features.values()]

    def transform(self, frame: pd.DataFrame) -> dict[str, npt.NDArray[np.generic]]:
        """Model inputs for ``frame``; the label column is not needed."""
        declared = [
            *((name, "data.numeric_features") for name in self.numeric_features),
            *((name, "data.categorical_features") for name in self.categorical_features),
        ]
        require_columns(list(frame.columns), declared)
        rows = len(frame)

        numeric = np.zeros((rows, len(self.numeric_features)), dtype=np.float32)
        for j, name in enumerate(self.numeric_features):
            values = _numeric_column(frame, name)
            values = np.where(np.isnan(values), self.medians[j], values)
            values = np.clip(values, self.clip_low[j], self.clip_high[j])
            numeric[:, j] = (values - self.means[j]) / self.stds[j]

        categorical = np.zeros((rows, len(self.categorical_features)), dtype=np.int64)
        for j, (name, allowed) in enumerate(self.categorical_features.items()):
            lookup = text_lookup(allowed)
            codes, uniques = pd.factorize(frame[name], use_na_sentinel=True)
            ids = np.array(
                [_category_id(lookup(as_text(value))) for value in uniques], dtype=np.int64
            )
            categorical[:, j] = np.where(codes < 0, OTHER_CATEGORY, ids[np.maximum(codes, 0)])

        return {NUMERIC_INPUT: numeric, CATEGORICAL_INPUT: categorical}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (kept in the site's private state, never sent)."""
        return {
            "version": _PREPROCESSOR_VERSION,
            "numeric_features": list(self.numeric_features),
            "medians": list(self.medians),
            "clip_low": list(self.clip_low),
            "clip_high": list(self.clip_high),
            "means": list(self.means),
            "stds": list(self.stds),
            "categorical_features": {
                name: list(values) for name, values in self.categorical_features.items()
            },
            "classes": list(self.classes),
            "class_weights": list(self.class_weights),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TabularPreprocessor:
        """Rebuild from :meth:`to_dict` output, refusing anything malformed."""
        try:
            if data["version"] != _PREPROCESSOR_VERSION:
                raise ValueError(f"unsupported version {data['version']!r}")
            numeric = [str(name) for name in data["numeric_features"]]
            stats = {
                key: [float(value) for value in data[key]]
                for key in ("medians", "clip_low", "clip_high", "means", "stds")
            }
            for key, values in stats.items():
                if len(values) != len(numeric):
                    raise ValueError(f"{key} has {len(values)} entries, expected {len(numeric)}")
                if not all(math.isfinite(value) for value in values):
                    raise ValueError(f"{key} holds a non-finite number")
            if any(value <= 0 for value in stats["stds"]):
                raise ValueError("stds must be positive")
            categorical = {
                str(name): [str(value) for value in values]
                for name, values in dict(data["categorical_features"]).items()
            }
            classes = [str(name) for name in data["classes"]]
            weights = [float(value) for value in data["class_weights"]]
            if len(weights) != len(classes):
                raise ValueError("class_weights must have one entry per class")
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"saved tabular preprocessor is invalid: {exc}") from None
        return cls(
            numeric_features=numeric,
            categorical_features=categorical,
            classes=classes,
            class_weights=weights,
            **stats,
        )


# ------------------------------------------------------------------------ loading ---


def load_tabular_dataset(
    config: TabularDataConfig, salt: bytes, bounds: Sequence[Sequence[float]] = ()
) -> tuple[SiteData, TabularPreprocessor]:
    """Read, validate and clean the site's table; return model inputs and the cleaning.

    ``config.path`` must already be resolved. Person ids are salted and hashed here and
    the raw values are dropped; without a person column every row is its own person.
    ``bounds``: the base model's public bounds (:meth:`TabularPreprocessor.public`);
    none fits the cleaning on this site's rows.
    """
    if not bounds and config.numeric_bounds:
        raise DataError(
            "data.numeric_bounds are declared but the base model holds none: every site "
            "must scale alike, so rebuild the base with fedlora model init --site"
        )
    _check_roles(config)
    declared = _declared_columns(config, with_label=True)
    frame = read_columns(config, declared)
    rows = len(frame)
    if rows == 0:
        raise DataError("the data table has no rows")
    logger.info("tabular table read: %d rows, %d declared columns", rows, len(declared))
    for name in config.numeric_features:
        _numeric_column(frame, name, at_load=True)  # refuse malformed columns up front

    labels, persons, rejected = screen_rows(frame, config, salt)
    accepted = np.array([label is not None for label in labels], dtype=bool)
    if not accepted.any():
        raise DataError(
            f"no usable rows: all {rows} rows were rejected ({reason_summary(rejected)})"
        )
    if rejected:
        logger.warning("%d of %d rows rejected (%s)", len(rejected), rows, reason_summary(rejected))

    kept = frame.loc[accepted].reset_index(drop=True)
    if bounds:
        preprocessor = TabularPreprocessor.public(config, bounds)
    else:
        logger.warning(
            "the base model declares no public feature bounds: scaling with this site's "
            "own statistics (other sites scale differently; see data.numeric_bounds)"
        )
        preprocessor = TabularPreprocessor.fit(kept, config)
    features = preprocessor.transform(kept)
    label_array = np.array([label for label in labels if label is not None], dtype=np.int64)
    keys = [key for key, keep in zip(persons, accepted, strict=True) if keep]

    data = SiteData(
        features=features,
        labels=label_array,
        person_keys=keys,
        classes=list(config.classes),
        rejected=rejected,
    )
    logger.info(
        "tabular data ready: %d rows accepted from %d persons; %d numeric and %d "
        "categorical features; label counts %s",
        data.accepted,
        data.persons,
        len(config.numeric_features),
        len(config.categorical_features),
        list(data.label_counts().values()),
    )
    return data, preprocessor


def _declared_categories(config: TabularDataConfig) -> dict[str, list[str]]:
    """A copy of the schema's categorical features and their allowed values."""
    return {name: list(values) for name, values in config.categorical_features.items()}


def _check_roles(config: TabularDataConfig) -> None:
    """Refuse schemas that would leak the label or the person id into the features."""
    features = [*config.numeric_features, *config.categorical_features]
    duplicated = sorted(name for name, count in Counter(features).items() if count > 1)
    if duplicated:
        raise DataError(f"column {duplicated[0]!r} is declared as a feature more than once")
    if config.label_column in features:
        raise DataError(f"label column {config.label_column!r} is also declared as a feature")
    if config.person_column is not None:
        if config.person_column in features:
            raise DataError(
                f"person column {config.person_column!r} is declared as a feature; "
                "identifiers must never be model inputs"
            )
        if config.person_column == config.label_column:
            raise DataError(f"column {config.label_column!r} is both the label and the person")


def _declared_columns(config: TabularDataConfig, *, with_label: bool) -> list[tuple[str, str]]:
    """(column, config key that declares it), in a stable order."""
    declared = [(name, "data.numeric_features") for name in config.numeric_features]
    declared += [(name, "data.categorical_features") for name in config.categorical_features]
    if with_label:
        declared.append((config.label_column, "data.label_column"))
        if config.person_column is not None:
            declared.append((config.person_column, "data.person_column"))
    return declared


def _numeric_column(
    frame: pd.DataFrame, name: str, *, at_load: bool = False
) -> npt.NDArray[np.float64]:
    """The column as float64 with NaN for missing, infinite or beyond
    :data:`MAX_NUMERIC_MAGNITUDE`; refuse text columns."""
    column = frame[name]
    if pd.api.types.is_bool_dtype(column):
        values = column.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    elif pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        coerced = pd.to_numeric(column, errors="coerce")
        blank = column.astype("string").str.strip().eq("").fillna(False)
        bad = (column.notna() & coerced.isna() & ~blank).to_numpy(dtype=bool)
        if bad.any():
            where = f" (first at row {int(np.flatnonzero(bad)[0]) + 1})" if at_load else ""
            raise DataError(
                f"column {name!r} declared in data.numeric_features is not numeric: "
                f"{int(bad.sum())} of {len(column)} rows hold a value that is not a "
                f"number{where}"
            )
        values = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
    values = np.array(values, dtype=np.float64, copy=True)
    with np.errstate(invalid="ignore"):
        values[~(np.abs(values) <= MAX_NUMERIC_MAGNITUDE)] = np.nan  # NaN and inf too
    return values


def screen_rows(
    frame: pd.DataFrame, config: TabularDataConfig | TextDataConfig, salt: bytes
) -> tuple[list[int | None], list[str], list[Rejection]]:
    """Label index (None if rejected) and person key per row, and the rejections."""
    lookup = text_lookup(config.classes)
    label_texts = column_texts(frame[config.label_column])
    person_texts: list[str | None]
    if config.person_column is not None:
        person_texts = column_texts(frame[config.person_column])
        hashed = {text: person_key(text, salt) for text in set(person_texts) if text is not None}
        persons = [hashed[text] if text is not None else "" for text in person_texts]
    else:
        persons = [person_key(f"row-{i}", salt) for i in range(1, len(frame) + 1)]
        person_texts = [f"row-{i}" for i in range(1, len(frame) + 1)]

    labels: list[int | None] = []
    rejected: list[Rejection] = []
    for i, (label_text, person_text) in enumerate(
        zip(label_texts, person_texts, strict=True), start=1
    ):
        reasons = []
        label = lookup(label_text)
        if label_text is None:
            reasons.append(f"label is missing (column {config.label_column!r})")
        elif label is None:
            reasons.append(f"label value is not one of data.classes ({', '.join(config.classes)})")
        if person_text is None:
            reasons.append(f"person id is missing (column {config.person_column!r})")
        if reasons:
            rejected.append(Rejection(record=f"row {i}", reason="; ".join(reasons)))
            labels.append(None)
        else:
            labels.append(label)
    return labels, persons, rejected


def reason_summary(rejected: Sequence[Rejection]) -> str:
    counts = Counter(rejection.reason for rejection in rejected)
    return "; ".join(f"{reason}: {count}" for reason, count in counts.most_common())


def _category_id(position: int | None) -> int:
    return OTHER_CATEGORY if position is None else position + 1
