"""The federation (run) config: what one run trains, for how long, how privately and
how defended (LoRA, DP-SGD, update validation, the rollback guard).

Apart from the site config because the coordinator owns it and a site only checks a
run against its own rules; simulation scenarios reuse :class:`FederationSettings`,
which is the run without its task, base model and seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.dp import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from common.strict_model import StrictModel

OptimizerName = Literal["sgd", "adam"]
"""The optimizers a site trains with; a request for any other is refused."""


class LoraSettings(StrictModel):
    r: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; the task's default when omitted."
    )


class DPSettings(StrictModel):
    max_grad_norm: float = Field(default=1.0, gt=0, description="Per-sample clipping bound C.")
    noise_multiplier: float | None = Field(
        default=None,
        ge=MIN_NOISE_MULTIPLIER,
        le=MAX_NOISE_MULTIPLIER,
        description="σ (0.1 to 1000); when omitted each site calibrates σ so the run's "
        "planned rounds spend epsilon_per_run (or what is left of its budget).",
    )
    epsilon_per_run: float | None = Field(
        default=None,
        gt=0,
        description="ε this run asks each site to spend; a site whose remaining budget is "
        "smaller refuses. Omitted: each site may spend what is left of its budget.",
    )


class UpdateValidation(StrictModel):
    """What the coordinator checks in every update before it may be aggregated."""

    max_update_norm: float | Literal["derived", "off"] = Field(
        default="derived",
        description="L2 bound on a site's update (its adapter minus the global one). "
        "'derived': per reply, from the DP clipping bound, learning rate, steps and noise "
        "(the most honest DP-SGD can move); a number: a fixed bound; 'off': no bound "
        "(for robustness studies of the aggregators alone).",
    )
    max_payload_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Largest adapter payload accepted; omitted: twice the run's adapter size.",
    )
    min_examples: int = Field(
        default=20, ge=1, description="Smallest num-examples accepted (sites refuse below 20)."
    )
    max_examples: int = Field(
        default=10_000_000, ge=1, description="Largest num-examples accepted."
    )

    @field_validator("max_update_norm", mode="before")
    @classmethod
    def _not_a_flag(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("max_update_norm must be a number, 'derived' or 'off', not true/false")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> UpdateValidation:
        if self.min_examples > self.max_examples:
            raise ValueError("min_examples must not exceed max_examples")
        bound = self.max_update_norm
        if isinstance(bound, float) and not (math.isfinite(bound) and bound > 0):
            raise ValueError("max_update_norm must be a finite positive number, 'derived' or 'off'")
        return self


class RollbackGuard(StrictModel):
    """Keep the best global adapter when federated accuracy falls too far below it."""

    enabled: bool = True
    max_accuracy_drop: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="Largest drop below the best accuracy (0.03 = 3 points).",
    )


class FederationSettings(StrictModel):
    """How a task's federation runs: everything but which model and which task."""

    rounds: int = Field(default=5, ge=1, le=1000)
    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, description="Expected (Poisson) batch size.")
    learning_rate: float = Field(default=0.1, gt=0)
    optimizer: OptimizerName = Field(
        default="sgd", description="'sgd' (momentum 0.9) is the robust choice under DP noise."
    )
    min_sites: int = Field(default=2, ge=1)
    aggregator: str = Field(
        default="fedavg",
        description="fedavg, fedavg-ffa, trimmed-mean, trimmed-mean-symmetric or median.",
    )
    trim_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=0.5,
        description="trimmed-mean: fraction of sites dropped at each end, per coordinate.",
    )
    round_timeout: float = Field(
        default=3600,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to wait for replies; late sites are skipped.",
    )
    update_precision: Literal["float16", "float32"] = Field(
        default="float16",
        description="Precision sites send their adapter updates in. 'float16' halves the "
        "traffic; its rounding is far below the DP noise, and the coordinator aggregates "
        "in float32/float64 either way.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dp: DPSettings = Field(default_factory=DPSettings)
    validation: UpdateValidation = Field(default_factory=UpdateValidation)
    rollback: RollbackGuard = Field(default_factory=RollbackGuard)

    @field_validator("lora")
    @classmethod
    def _no_dropout_under_dp(cls, value: LoraSettings) -> LoraSettings:
        if value.dropout != 0.0:
            raise ValueError("LoRA dropout must be 0 under DP-SGD (per-sample gradients)")
        return value


class FederationConfig(FederationSettings):
    """One run of one task: what to train, for how long, how privately and how defended."""

    task: str
    base_model: Path = Field(description="Directory of the frozen base model.")
    seed: int = Field(default=0, ge=0, lt=2**63)
