"""What the coordinator asks of a site each round, as a Flower ConfigRecord.

Both sides use this one definition, so a key can never be spelt two ways. The site
treats every value as a request: its own policy and budget decide what it does.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from flwr.app import ConfigRecord
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.adapters import AdapterLayout
from common.config import FederationConfig, LoraSettings
from common.dp import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
from common.errors import UpdateError
from common.federation_config import OptimizerName

SITE_ID_KEY = "site-id"
"""Key of the reply's ConfigRecord that names the replying site (public site name)."""
AUDIT_KEY = "audit-key"
"""In a site's introduction: the fingerprint of the key that signs its audit log, so the
coordinator's log vouches for which key each site's log must be signed with."""
AUDIT_HEAD_SEQ = "audit-head-seq"
AUDIT_HEAD_HASH = "audit-head-hash"
"""In a training reply: the number and hash of the last entry of the site's audit log
(its 'training-done'). The coordinator records them, so a site log later cut back or
rewritten past that entry is caught even with an old signed head put back."""

ARTIFACT_CHECK = "evaluate.artifact_check"
"""Message type: verify the signed artifact and evaluate fp32 and int8 on held-out data."""
ARTIFACT_INSTALL = "query.artifact_install"
"""Message type: verify the checked, signed artifact and install it."""
ARTIFACT_RECORD = "artifact"
"""ConfigRecord of an artifact message: file name -> bytes."""


SITE_CALIBRATED = -1.0
"""noise_multiplier value meaning: each site calibrates σ from its own budget."""
SITE_REMAINING_BUDGET = -1.0
"""epsilon_per_run value meaning: the run may spend what is left of each site's budget."""
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{0,64}$")


UPDATE_DTYPES = ("float32", "float16")
"""Precisions an update may travel in. float16 rounds each value to 11 significant bits,
far below the DP noise (σ·C/B per step), and post-processing costs no privacy."""
OPTIONAL_KEYS = frozenset({"update-dtype"})
"""Keys a coordinator from before they existed does not send: their defaults apply
(such a coordinator expects float32 updates)."""
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RoundRequest(BaseModel):
    """One round as the coordinator asks for it: strict types, no extra keys, and no
    value an honest coordinator would not send (NaN in particular: every comparison
    with it is false, so an unchecked NaN σ would slip past a budget check)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    task: str
    base_model_sha256: str
    server_round: int = Field(ge=1)
    total_rounds: int = Field(ge=1)
    local_epochs: int = Field(ge=1, le=100)
    batch_size: int = Field(ge=1)
    learning_rate: PositiveFinite
    optimizer: OptimizerName
    max_grad_norm: PositiveFinite
    noise_multiplier: float = Field(allow_inf_nan=False)
    """σ for every site; SITE_CALIBRATED (-1): each site calibrates its own."""
    epsilon_per_run: float = Field(allow_inf_nan=False)
    """ε the run asks of each site; SITE_REMAINING_BUDGET (-1) for 'what is left'."""
    lora_r: int = Field(ge=1)
    lora_alpha: PositiveFinite
    lora_targets: list[str]
    freeze_lora_a: bool
    """FFA-LoRA: A stays at the run's seeded initialisation; sites train and send B only."""
    seed: int = Field(ge=0)
    run_id: str = Field(pattern=RUN_ID_PATTERN.pattern)
    """The federation run the round belongs to. It stays the same when a run is resumed,
    so a site keeps the run's privacy plan; empty: the Flower run that carries it."""
    update_dtype: str = "float32"
    """The dtype a site sends its update in (UPDATE_DTYPES); float16 halves the traffic."""

    @field_validator("noise_multiplier")
    @classmethod
    def _sigma(cls, value: float) -> float:
        if not (value == SITE_CALIBRATED or MIN_NOISE_MULTIPLIER <= value <= MAX_NOISE_MULTIPLIER):
            raise ValueError("noise_multiplier must lie in [0.1, 1000] (or -1: site-calibrated)")
        return value

    @field_validator("epsilon_per_run")
    @classmethod
    def _epsilon(cls, value: float) -> float:
        if not (value == SITE_REMAINING_BUDGET or value > 0):
            raise ValueError("epsilon_per_run must be positive (or -1: what is left)")
        return value

    @field_validator("update_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in UPDATE_DTYPES:
            raise ValueError(f"update_dtype must be one of {', '.join(UPDATE_DTYPES)}")
        return value

    @model_validator(mode="after")
    def _round_in_run(self) -> RoundRequest:
        if self.server_round > self.total_rounds:
            raise ValueError("server_round is past total_rounds")
        return self

    @classmethod
    def for_round(
        cls,
        federation: FederationConfig,
        base_model_sha256: str,
        server_round: int,
        default_targets: tuple[str, ...],
        freeze_lora_a: bool = False,
        run_id: str = "",
    ) -> RoundRequest:
        return cls(
            task=federation.task,
            base_model_sha256=base_model_sha256,
            server_round=server_round,
            total_rounds=federation.rounds,
            local_epochs=federation.local_epochs,
            batch_size=federation.batch_size,
            learning_rate=federation.learning_rate,
            optimizer=federation.optimizer,
            max_grad_norm=federation.dp.max_grad_norm,
            noise_multiplier=(
                SITE_CALIBRATED
                if federation.dp.noise_multiplier is None
                else federation.dp.noise_multiplier
            ),
            epsilon_per_run=(
                SITE_REMAINING_BUDGET
                if federation.dp.epsilon_per_run is None
                else federation.dp.epsilon_per_run
            ),
            lora_r=federation.lora.r,
            lora_alpha=federation.lora.alpha,
            lora_targets=list(federation.lora.target_modules or default_targets),
            freeze_lora_a=freeze_lora_a,
            seed=federation.seed,
            run_id=run_id,
            update_dtype=federation.update_precision,
        )

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, target_modules=self.lora_targets)

    @property
    def layout(self) -> AdapterLayout:
        """Which adapter tensors the sites train and send this run."""
        return AdapterLayout(freeze_lora_a=self.freeze_lora_a, seed=self.seed)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {name.replace("_", "-"): value for name, value in self.model_dump().items()}
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundRequest:
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            key = name.replace("_", "-")
            if key in record:
                values[name] = record[key]
            elif key not in OPTIONAL_KEYS or field.is_required():
                raise UpdateError(f"round configuration lacks {key!r}")
        if isinstance(values.get("lora_targets"), list | tuple):
            values["lora_targets"] = list(values["lora_targets"])
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise UpdateError("invalid round configuration: " + _problems(exc)) from None


_RULES = {
    "freeze_lora_a": "freeze_lora_a must be true or false",
    "run_id": "run_id must be up to 64 letters, digits, '.', '_' or '-'",
    "lora_targets": "lora_targets must be a list of module names",
}
"""How a broken field is explained where pydantic's own words would be obscure."""


def _problems(exc: ValidationError) -> str:
    """Pydantic's findings in the request's own words: 'field: what is wrong'."""
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        if field in _RULES:
            message = _RULES[field]
        elif not message.startswith(field):
            message = f"{field}: {message}"
        if message not in problems:
            problems.append(message)
    return "; ".join(problems)


# Error codes a site puts in an error reply (Flower's own codes are small integers).
REFUSED_BY_POLICY = 4001
"""The site's policy or privacy budget forbids the round."""
SITE_MISCONFIGURED = 4002
"""The site's configuration or data cannot be used."""
BAD_GLOBAL_ADAPTER = 4003
"""What the coordinator sent does not fit the site's model."""
SITE_FAILED = 4004
"""An unexpected failure at the site; details stay in the site's log."""
ARTIFACT_REFUSED = 4005
"""The artifact failed the site's verification (signature, hashes, base model)."""
CLIENT_CODE_REFUSED = 4006
"""The run's app bundle is not a release the site pinned (client/launcher.py)."""
REFUSAL_CODES = (REFUSED_BY_POLICY, ARTIFACT_REFUSED, CLIENT_CODE_REFUSED)
"""The error codes by which a site refuses (rather than fails): recorded as refused."""
