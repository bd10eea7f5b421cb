"""A site's side of a round: policy, data, model and DP training, with no Flower in it.

``client/app.py`` turns Flower messages into calls on :class:`Site`; everything here is
plain Python so the daemon, the CLI and the tests share it.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from client.data import SiteData, split_holdout
from client.data.dicom import load_dicom_dataset
from client.data.tabular import load_tabular_dataset
from client.policy import check_cohort, check_request
from client.privacy import HistoryEntry, calibrate_noise, epsilon_spent
from client.training import DPTrainer, EvalResult, TrainingPlan, TrainResult
from common.adapters import AdapterArrays, AdapterSchema
from common.config import DicomDataConfig, SiteConfig
from common.errors import PolicyError
from common.protocol import SITE_CALIBRATED, RoundRequest
from common.tasks import TASKS, TaskSpec

logger = logging.getLogger(__name__)

SALT_FILE = "person-salt"


@dataclass(frozen=True)
class LoadedData:
    train: SiteData
    holdout: SiteData
    all: SiteData
    class_weights: list[float] | None


@dataclass(frozen=True)
class PrivacyState:
    """What the site must remember between rounds to account for privacy."""

    history: list[HistoryEntry]
    run_noise_multiplier: float | None = None
    """σ this site calibrated for the current run (kept for every round of it)."""


@dataclass(frozen=True)
class TrainOutcome:
    adapter: AdapterArrays
    result: TrainResult
    privacy: PrivacyState
    epsilon: float
    noise_multiplier: float


class Site:
    """One institution: its config, its data and its rules."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.task: TaskSpec = TASKS.get(config.site.task)

    @property
    def site_id(self) -> str:
        return self.config.site.id

    @cached_property
    def salt(self) -> bytes:
        """A per-site secret that makes person keys meaningless outside the site."""
        path = self.config.site.state_dir / SALT_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return path.read_bytes()

    def load_data(self) -> LoadedData:
        data_config = self.config.data
        class_weights: list[float] | None = None
        if isinstance(data_config, DicomDataConfig):
            data = load_dicom_dataset(data_config, self.salt)
        else:
            data, preprocessor = load_tabular_dataset(data_config, self.salt)
            class_weights = list(preprocessor.class_weights)
        train, holdout = split_holdout(data, data_config.holdout_fraction, seed=0)
        return LoadedData(train=train, holdout=holdout, all=data, class_weights=class_weights)

    def build_model(self, request: RoundRequest, adapter: AdapterArrays) -> PeftModel:
        """Base model from the site's own directory, LoRA as the run asks, global weights in."""
        check_request(self.config, request)
        model = self.task.wrap_with_lora(
            self.task.load_base_model(self.config.site.base_model), request.lora
        )
        local = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
        AdapterSchema.of(local).check(adapter)
        set_peft_model_state_dict(
            model, {name: torch.from_numpy(np.array(value)) for name, value in adapter.items()}
        )
        return model

    def plan_round(
        self, request: RoundRequest, records: int, privacy: PrivacyState
    ) -> tuple[TrainingPlan, PrivacyState, float]:
        """Choose σ and refuse if this round would cross the budget; returns ε after."""
        budget = self.config.privacy
        plan = TrainingPlan(
            epochs=request.local_epochs,
            batch_size=request.batch_size,
            learning_rate=request.learning_rate,
            optimizer=request.optimizer,
            max_grad_norm=request.max_grad_norm,
            noise_multiplier=0.0,
            accountant=request.accountant,
            seed=request.seed * 100_003 + request.server_round,
        )
        sample_rate, steps = plan.sample_rate(records), plan.steps(records)
        sigma = privacy.run_noise_multiplier
        if request.noise_multiplier != SITE_CALIBRATED:
            sigma = request.noise_multiplier
        elif sigma is None:
            remaining_rounds = request.total_rounds - request.server_round + 1
            sigma = calibrate_noise(
                privacy.history,
                sample_rate=sample_rate,
                steps=steps * remaining_rounds,
                target_epsilon=budget.epsilon,
                delta=budget.delta,
                accountant=request.accountant,
            )
            logger.info(
                "site %s calibrated noise multiplier %.3f for %d rounds",
                self.site_id,
                sigma,
                remaining_rounds,
            )
        epsilon_after = epsilon_spent(
            [*privacy.history, (sigma, sample_rate, steps)], budget.delta, request.accountant
        )
        if epsilon_after > budget.epsilon:
            spent = epsilon_spent(privacy.history, budget.delta, request.accountant)
            raise PolicyError(
                f"site {self.site_id} refuses round {request.server_round}: it would bring ε "
                f"from {spent:.2f} to {epsilon_after:.2f}, over the site's budget of "
                f"{budget.epsilon:.2f} (δ={budget.delta:g})"
            )
        plan = TrainingPlan(**{**plan.__dict__, "noise_multiplier": sigma})
        return plan, PrivacyState(privacy.history, sigma), epsilon_after

    def train(
        self, request: RoundRequest, adapter: AdapterArrays, privacy: PrivacyState
    ) -> TrainOutcome:
        check_request(self.config, request)
        data = self.load_data()
        check_cohort(self.config, data.train.persons, purpose="train")
        plan, privacy, _ = self.plan_round(request, data.train.accepted, privacy)
        model = self.build_model(request, adapter)
        trainer = DPTrainer(model, self.task.input_names, data.class_weights)
        result = trainer.train(data.train, plan, privacy.history)
        epsilon = epsilon_spent(result.history, self.config.privacy.delta, request.accountant)
        adapter_out = {
            k: v.detach().cpu().numpy() for k, v in get_peft_model_state_dict(model).items()
        }
        logger.info(
            "site %s trained round %d: %d steps, ε=%.3f of %.3f",
            self.site_id,
            request.server_round,
            result.steps,
            epsilon,
            self.config.privacy.epsilon,
        )
        return TrainOutcome(
            adapter=adapter_out,
            result=result,
            privacy=PrivacyState(result.history, privacy.run_noise_multiplier),
            epsilon=epsilon,
            noise_multiplier=plan.noise_multiplier,
        )

    def evaluate(self, request: RoundRequest, adapter: AdapterArrays) -> EvalResult:
        check_request(self.config, request)
        data = self.load_data()
        check_cohort(self.config, data.holdout.persons, purpose="report metrics")
        model = self.build_model(request, adapter)
        return DPTrainer(model, self.task.input_names).evaluate(data.holdout)


def load_site(path: Path) -> Site:
    from common.config import load_site_config

    return Site(load_site_config(path))
