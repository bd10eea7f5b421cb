"""What a site replies, as typed records both sides import.

A site builds its reply from these models and the coordinator reads it back through
them, so a metric can never be spelt two ways or read as the wrong kind. Parsing is
strict: a reply is data from another party, and each field must be a finite number of
its kind. Extra metrics are allowed but ignored by the coordinator: it uses only what
these models name. Whether a number is plausible (ε within budget, accuracy in [0, 1])
is the coordinator's validation (server/validation.py), not the reply's type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Self

from flwr.app import MetricRecord
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from common.errors import UpdateError


def _hyphenated(name: str) -> str:
    return name.replace("_", "-")


class ReplyMetrics(BaseModel):
    """The numbers of one kind of reply, as its one MetricRecord carries them."""

    model_config = ConfigDict(frozen=True, alias_generator=_hyphenated, populate_by_name=True)

    def to_record(self) -> MetricRecord:
        values: dict[str, int | float | list[int] | list[float]] = dict(self.as_dict())
        return MetricRecord(values)

    def as_dict(self) -> dict[str, float]:
        dumped = self.model_dump(by_alias=True, exclude_none=True)
        return {key: float(value) for key, value in dumped.items()}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Self:
        """The metrics of a reply, or UpdateError with the first reason they are unusable."""
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UpdateError(f"metric {key!r} is not a number")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int beyond float64 (possible only in process)
                finite = False
            if not finite:
                raise UpdateError(f"metric {key!r} is not finite")
        missing = [key for key in cls.required() if key not in values]
        if missing:
            raise UpdateError(f"reply lacks metric(s) {', '.join(missing)}")
        known = {_hyphenated(name) for name in cls.model_fields}
        try:
            return cls.model_validate({k: float(v) for k, v in values.items() if k in known})
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise UpdateError(str(first["msg"]).removeprefix("Value error, ")) from None

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return tuple(
            _hyphenated(name) for name, field in cls.model_fields.items() if field.is_required()
        )


class CountMetrics(ReplyMetrics):
    """A reply that says how many records it used: a positive whole number."""

    num_examples: float

    @field_validator("num_examples")
    @classmethod
    def _whole(cls, value: float) -> float:
        if value <= 0 or not float(value).is_integer():
            raise ValueError("num-examples must be a positive whole number")
        return float(value)


class TrainMetrics(CountMetrics):
    """A training reply's numbers. No training loss or accuracy: computed on the site's
    data without noise, they are not covered by ε."""

    epsilon: float
    epsilon_budget: float
    delta: float
    noise_multiplier: float
    steps: float


class EvalMetrics(CountMetrics):
    """An evaluation reply's numbers, on the site's held-out people."""

    eval_loss: float
    eval_accuracy: float


class ArtifactCheckMetrics(CountMetrics):
    """A site's scores of the fp32 and int8 artifact on its held-out people; no AUC when
    that data has a single class."""

    fp32_accuracy: float
    fp32_loss: float
    int8_accuracy: float
    int8_loss: float
    fp32_auc: float | None = None
    int8_auc: float | None = None


class InstallMetrics(ReplyMetrics):
    """A site's answer to the artifact's installation."""

    installed: float


TRAIN_METRICS = TrainMetrics.required()
EVALUATE_METRICS = EvalMetrics.required()
ARTIFACT_CHECK_METRICS = ArtifactCheckMetrics.required()
"""Metrics every artifact check reply carries; 'fp32-auc' and 'int8-auc' come too unless
the site's held-out data has a single class."""
