"""What the coordinator asks of a site each round, as a Flower ConfigRecord.

Both sides use this one definition, so a key can never be spelt two ways. The site
treats every value as a request: its own policy and budget decide what it does.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from common.config import FederationConfig, LoraSettings
from common.errors import UpdateError

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
ARTIFACT_CHECK_METRICS = (
    "num-examples",
    "fp32-accuracy",
    "fp32-loss",
    "int8-accuracy",
    "int8-loss",
)
"""Metrics every artifact check reply carries; 'fp32-auc' and 'int8-auc' come too unless
the site's held-out data has a single class."""

TRAIN_METRICS = (
    "num-examples",
    "epsilon",
    "epsilon-budget",
    "delta",
    "noise-multiplier",
    "steps",
)
"""Metrics every training reply carries (a reply without them is rejected). No training
loss or accuracy: computed on the site's data without noise, they are not covered by ε."""
EVALUATE_METRICS = ("num-examples", "eval-loss", "eval-accuracy")

SITE_CALIBRATED = -1.0
"""noise_multiplier value meaning: each site calibrates σ from its own budget."""
SITE_REMAINING_BUDGET = -1.0
"""epsilon_per_run value meaning: the run may spend what is left of each site's budget."""
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{0,64}")


UPDATE_DTYPES = ("float32", "float16")
OPTIONAL_KEYS = frozenset({"update-dtype"})
"""Keys a coordinator from before they existed does not send: their defaults apply
(such a coordinator expects float32 updates)."""
"""Precisions an update may travel in. float16 rounds each value to 11 significant bits,
far below the DP noise (σ·C/B per step), and post-processing costs no privacy."""


@dataclass(frozen=True)
class RoundRequest:
    task: str
    base_model_sha256: str
    server_round: int
    total_rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    max_grad_norm: float
    noise_multiplier: float
    epsilon_per_run: float
    """ε the run asks of each site; SITE_REMAINING_BUDGET (-1) for 'what is left'."""
    lora_r: int
    lora_alpha: float
    lora_targets: list[str]
    freeze_lora_a: bool
    """FFA-LoRA: A stays at the run's seeded initialisation; sites train and send B only."""
    seed: int
    run_id: str
    """The federation run the round belongs to. It stays the same when a run is resumed,
    so a site keeps the run's privacy plan; empty: the Flower run that carries it."""
    update_dtype: str = "float32"
    """The dtype a site sends its update in (UPDATE_DTYPES); float16 halves the traffic."""

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

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({name.replace("_", "-"): value for name, value in asdict(self).items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundRequest:
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key in record:
                values[field.name] = record[key]
            elif key not in OPTIONAL_KEYS:
                raise UpdateError(f"round configuration lacks {key!r}")
        values["lora_targets"] = list(values["lora_targets"])
        request = cls(**values)
        request.validate()
        return request

    def validate(self) -> None:
        """Reject values no honest coordinator sends; the site never guesses around them.

        (NaN in particular: every comparison with it is false, so an unchecked NaN σ
        would slip past a budget check.)
        """
        problems: list[str] = []
        for name in (
            "server_round",
            "total_rounds",
            "local_epochs",
            "batch_size",
            "lora_r",
            "seed",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be a whole number")
            elif value < (0 if name == "seed" else 1):
                problems.append(f"{name} must be positive")
        for name in ("learning_rate", "max_grad_norm", "lora_alpha"):
            value = getattr(self, name)
            if not _finite_number(value) or value <= 0:
                problems.append(f"{name} must be a finite positive number")
        if not _finite_number(self.noise_multiplier) or not (
            self.noise_multiplier == SITE_CALIBRATED or 0.1 <= self.noise_multiplier <= 1000
        ):
            problems.append("noise_multiplier must lie in [0.1, 1000] (or -1: site-calibrated)")
        if _finite_number(self.local_epochs) and self.local_epochs > 100:
            problems.append("local_epochs must be at most 100")
        if not _finite_number(self.epsilon_per_run) or not (
            self.epsilon_per_run == SITE_REMAINING_BUDGET or self.epsilon_per_run > 0
        ):
            problems.append("epsilon_per_run must be positive (or -1: what is left)")
        if not problems and self.server_round > self.total_rounds:
            problems.append("server_round is past total_rounds")
        if not isinstance(self.freeze_lora_a, bool):
            problems.append("freeze_lora_a must be true or false")
        if not isinstance(self.run_id, str) or not RUN_ID_PATTERN.fullmatch(self.run_id):
            problems.append("run_id must be up to 64 letters, digits, '.', '_' or '-'")
        if not all(isinstance(target, str) for target in self.lora_targets):
            problems.append("lora_targets must be module names")
        if self.update_dtype not in UPDATE_DTYPES:
            problems.append(f"update_dtype must be one of {', '.join(UPDATE_DTYPES)}")
        if problems:
            raise UpdateError("invalid round configuration: " + "; ".join(problems))


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
