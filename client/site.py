"""A site's side of a round: policy, data, privacy budget, model and DP training, with
no Flower in it.

``client/app.py`` turns Flower messages into calls on :class:`Site`; everything here is
plain Python so the daemon, the CLI and the tests share it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from client.audit import SiteAudit
from client.data import SiteData, dataset_fingerprint, split_holdout
from client.data.dicom import load_dicom_dataset
from client.data.tabular import load_tabular_dataset
from client.data.text import load_text_dataset
from client.ledger import LedgerError, PrivacyLedger, RunPlan, read_index
from client.policy import check_cohort, check_request
from client.predict import dicom_preprocessing, tabular_preprocessing, text_preprocessing
from client.privacy import HistoryEntry, calibrate_noise, epsilon_spent
from client.training import DPTrainer, EvalResult, TrainingPlan, TrainResult
from common.adapters import (
    AdapterArrays,
    AdapterSchema,
    adapter_sha256,
    is_lora_a,
    lora_a_dtype,
    seeded_lora_a,
    without_lora_a,
)
from common.config import (
    DicomDataConfig,
    SiteConfig,
    TextDataConfig,
    data_kind,
    load_site_config,
)
from common.errors import BudgetError, ConfigError, PolicyError
from common.protocol import SITE_CALIBRATED, SITE_REMAINING_BUDGET, RoundRequest
from common.tasks import TASKS, TaskSpec
from common.tasks.text import load_tokenizer

logger = logging.getLogger(__name__)

SALT_FILE = "person-salt"
EPSILON_TOLERANCE = 1e-6


@dataclass(frozen=True)
class LoadedData:
    train: SiteData
    holdout: SiteData
    all: SiteData
    class_weights: list[float] | None
    dataset: str
    """Content hash of the dataset: the name of its privacy ledger."""
    preprocessing: dict[str, Any]
    """How records become model inputs here (see client.predict): kept with an
    installed artifact so prediction cleans records exactly as training did."""


@dataclass(frozen=True)
class RoundPlan:
    """What the site will do this round, and what it will have spent after it."""

    training: TrainingPlan
    people: int
    epsilon_before: float
    epsilon_after: float
    run_plan: RunPlan


@dataclass(frozen=True)
class TrainOutcome:
    adapter: AdapterArrays
    result: TrainResult
    epsilon: float
    noise_multiplier: float


class Site:
    """One institution: its config, its data and its rules."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.task: TaskSpec = TASKS.get(config.site.task)
        if data_kind(config.data) != self.task.data_kind:
            raise ConfigError(
                f"site {config.site.id}: task {self.task.name!r} trains on "
                f"{self.task.data_kind} data, but [data] describes {data_kind(config.data)} data"
            )
        self.audit = SiteAudit(config)

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

    # --------------------------------------------------------------------- data ---

    def load_data(self) -> LoadedData:
        data_config = self.config.data
        class_weights: list[float] | None = None
        if isinstance(data_config, DicomDataConfig):
            data = load_dicom_dataset(data_config, self.salt)
            preprocessing = dicom_preprocessing(data_config)
        elif isinstance(data_config, TextDataConfig):
            base_model = self.config.site.base_model
            data = load_text_dataset(data_config, self.salt, load_tokenizer(base_model))
            preprocessing = text_preprocessing(data_config, base_model)
        else:
            data, preprocessor = load_tabular_dataset(data_config, self.salt)
            class_weights = list(preprocessor.class_weights)
            preprocessing = tabular_preprocessing(preprocessor)
        train, holdout = split_holdout(data, data_config.holdout_fraction, seed=0)
        dataset = dataset_fingerprint(data_config.path, exclude=self.config.site.state_dir)
        return LoadedData(train, holdout, data, class_weights, dataset, preprocessing)

    def preprocessing(self) -> dict[str, Any]:
        """How records become model inputs here: a DICOM site's cleaning is its config,
        a table's is fitted on its data (so only then is the data read)."""
        if isinstance(self.config.data, DicomDataConfig):
            return dicom_preprocessing(self.config.data)
        if isinstance(self.config.data, TextDataConfig):
            return text_preprocessing(self.config.data, self.config.site.base_model)
        return self.load_data().preprocessing

    def open_ledger(self, dataset: str, accept_new: bool = False) -> PrivacyLedger:
        """The ledger of ``dataset``. A dataset never seen before, at a site that already
        has history, is refused until an operator accepts it: changed data would
        otherwise start a fresh budget for the same people."""
        privacy = self.config.privacy
        ledger = PrivacyLedger.open(
            self.config.site.state_dir,
            dataset,
            accountant=privacy.accountant,
            delta=privacy.delta,
        )
        if not ledger.path.exists() and read_index(ledger.index) and not accept_new:
            raise LedgerError(
                f"site {self.site_id}: its data changed since it last trained (new content "
                f"hash {dataset[:12]}…), and new data starts a new privacy budget. An "
                "operator must confirm it with `fedlora site budget SITE_CONFIG "
                "--accept-new-data`, or restore the data."
            )
        return ledger

    # -------------------------------------------------------------------- model ---

    def build_model(self, request: RoundRequest, adapter: AdapterArrays) -> PeftModel:
        """Base model from the site's own directory, LoRA as the run asks, global weights in.

        Under FFA-LoRA the coordinator sends no A matrices: they are regenerated from the
        run's seed and frozen, so only B (and the head) train.
        """
        base = self.task.load_base_model(self.config.site.base_model)
        self.check_classes(base.config.num_labels or 0)
        model = self.task.wrap_with_lora(base, request.lora)
        local = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
        if request.freeze_lora_a:
            frozen = seeded_lora_a(
                {k: v.shape for k, v in local.items()}, request.seed, dtype=lora_a_dtype(local)
            )
            AdapterSchema.of(without_lora_a(local)).check(adapter)
            adapter = {**adapter, **frozen}
        AdapterSchema.of(local).check(adapter)
        set_peft_model_state_dict(
            model, {name: torch.from_numpy(np.array(value)) for name, value in adapter.items()}
        )
        if request.freeze_lora_a:
            for name, parameter in model.named_parameters():
                if is_lora_a(name):
                    parameter.requires_grad_(False)
        return model

    def check_classes(self, outputs: int) -> None:
        """The model must have one output per class the site's data names."""
        classes = len(self.config.data.classes)
        if outputs != classes:
            raise ConfigError(
                f"site {self.site_id}: data.classes names {classes} classes but the base "
                f"model has {outputs} outputs (num_labels / id2label in its config.json)"
            )

    # ------------------------------------------------------------------ privacy ---

    def training_plan(self, request: RoundRequest) -> TrainingPlan:
        """The run's training settings with the site's accountant; σ is chosen later."""
        return TrainingPlan(
            epochs=request.local_epochs,
            batch_size=request.batch_size,
            learning_rate=request.learning_rate,
            optimizer=request.optimizer,
            max_grad_norm=request.max_grad_norm,
            noise_multiplier=0.0,
            accountant=self.config.privacy.accountant,
            grad_sample_mode=self.config.privacy.grad_sample_mode,
        )

    def plan_round(
        self, request: RoundRequest, people: int, ledger: PrivacyLedger, run: str
    ) -> RoundPlan:
        """Choose σ for the run (once) and refuse any round that would cross a limit.

        The limits are the site's own: its total budget, and the ε the run asked for
        when it started here. Nothing in the request can raise either.
        """
        budget = self.config.privacy
        training = self.training_plan(request)
        if budget.delta >= 1 / people:
            raise PolicyError(
                f"site {self.site_id} refuses: δ={budget.delta:g} is not below 1/{people} "
                "(one over the people trained on); such a δ allows releasing a record outright"
            )
        sample_rate, steps = training.sample_rate(people), training.steps(people)
        spent = ledger.epsilon()
        run_plan = ledger.plan_for(run)
        if run_plan is None:
            run_plan = self._plan_run(request, run, ledger, spent, sample_rate, steps)
        sigma = run_plan.noise_multiplier
        epsilon_after = ledger.epsilon([(sigma, sample_rate, steps)])
        if not math.isfinite(epsilon_after) or epsilon_after > budget.epsilon + EPSILON_TOLERANCE:
            raise BudgetError(
                f"site {self.site_id} refuses round {request.server_round}: it would bring ε "
                f"from {spent:.2f} to {epsilon_after:.2f}, over the site's budget of "
                f"{budget.epsilon:.2f} (δ={budget.delta:g})"
            )
        if epsilon_after > run_plan.epsilon_target + max(1e-3, 0.01 * run_plan.epsilon_target):
            raise BudgetError(
                f"site {self.site_id} refuses round {request.server_round}: the run planned "
                f"to reach ε={run_plan.epsilon_target:.2f} here and this round would bring "
                f"it to {epsilon_after:.2f} (more rounds or data than planned)"
            )
        return RoundPlan(
            replace(training, noise_multiplier=sigma), people, spent, epsilon_after, run_plan
        )

    def run_noise(
        self,
        request: RoundRequest,
        history: list[HistoryEntry],
        sample_rate: float,
        steps_per_round: int,
    ) -> tuple[float, float]:
        """(σ, ε target) for a run starting at ``request.server_round``; writes nothing.

        Refuses a run that asks for more ε than the site has left.
        """
        budget = self.config.privacy
        spent = epsilon_spent(history, budget.delta, budget.accountant)
        if request.epsilon_per_run == SITE_REMAINING_BUDGET:
            target = budget.epsilon
        else:
            target = spent + request.epsilon_per_run
            if target > budget.epsilon + EPSILON_TOLERANCE:
                raise BudgetError(
                    f"site {self.site_id} refuses the run: it asks for "
                    f"ε={request.epsilon_per_run:.2f} but only "
                    f"{max(budget.epsilon - spent, 0):.2f} of the site's budget of "
                    f"{budget.epsilon:.2f} is left (spent {spent:.2f})"
                )
        if request.noise_multiplier != SITE_CALIBRATED:
            return request.noise_multiplier, target
        rounds = request.total_rounds - request.server_round + 1
        sigma = calibrate_noise(
            history,
            sample_rate=sample_rate,
            steps=steps_per_round * rounds,
            target_epsilon=target,
            delta=budget.delta,
            accountant=budget.accountant,
        )
        return sigma, target

    def _plan_run(
        self,
        request: RoundRequest,
        run: str,
        ledger: PrivacyLedger,
        spent: float,
        sample_rate: float,
        steps: int,
    ) -> RunPlan:
        sigma, target = self.run_noise(request, ledger.history, sample_rate, steps)
        rounds = request.total_rounds - request.server_round + 1
        plan = RunPlan(
            run=run, noise_multiplier=sigma, epsilon_target=target, planned_rounds=rounds
        )
        kept = ledger.record_plan(plan)
        if kept is not plan:  # another process of this site planned the run first
            return kept
        self.audit.record(
            "run-planned",
            run=run,
            noise_multiplier=sigma,
            rounds=rounds,
            epsilon_spent=spent,
            epsilon_target=target,
        )
        logger.info("site %s: σ=%.3f for %d rounds of run %s", self.site_id, sigma, rounds, run)
        return plan

    # ------------------------------------------------------------------- rounds ---

    @contextmanager
    def _deciding(self, run: str, request: RoundRequest, phase: str) -> Iterator[None]:
        """The policy decision on a request: audited whichever way it goes."""
        where = {"run": run, "round": request.server_round, "phase": phase}
        try:
            yield
        except BudgetError as exc:
            self.audit.record("budget-refused", **where, reason=str(exc))
            raise
        except PolicyError as exc:
            self.audit.record("policy-decision", **where, decision="refused", reason=str(exc))
            raise
        self.audit.record("policy-decision", **where, decision="accepted")

    def joined(self, run: str) -> None:
        """The coordinator introduced itself for ``run``; the site names its audit key."""
        self.audit.record(
            "run-joined", run=run, task=self.task.name, audit_key=self.audit.key_fingerprint
        )

    def _data_summary(self, run: str, data: LoadedData) -> None:
        """Counts only: how much data the run uses, never which."""
        self.audit.record(
            "data-summary",
            run=run,
            dataset_sha256=data.dataset,
            records=len(data.all.labels),
            people=data.all.persons,
            train_records=len(data.train.labels),
            holdout_records=len(data.holdout.labels),
            rejected_records=len(data.all.rejected),
            adjusted_records=dict(data.all.adjusted),
            class_counts=data.all.label_counts(),
        )

    def train(self, request: RoundRequest, adapter: AdapterArrays, run: str) -> TrainOutcome:
        """One round of DP training; the ledger is written before this returns."""
        with self._deciding(run, request, "train"):
            check_request(self.config, request)
            data = self.load_data()
            check_cohort(self.config, data.train.persons, purpose="train")
            ledger = self.open_ledger(data.dataset)
            first_round_of_run = ledger.plan_for(run) is None
            plan = self.plan_round(request, data.train.persons, ledger, run)
        if first_round_of_run:
            self._data_summary(run, data)
        if not plan.training.private:  # only benchmarks build such plans; never a site
            raise PolicyError(f"site {self.site_id} trains only under differential privacy")
        model = self.build_model(request, adapter)
        trainer = DPTrainer(model, self.task.input_names, data.class_weights)
        result = trainer.train(data.train, plan.training, ledger.history)
        try:
            entry = ledger.record_round(
                run, request.server_round, result.round_entry, limit=self.config.privacy.epsilon
            )
        except LedgerError as exc:  # the round as trained would cross the budget
            self.audit.record(
                "budget-refused",
                run=run,
                round=request.server_round,
                phase="train",
                reason=str(exc),
            )
            raise
        adapter_out = outgoing_adapter(model, request)
        self.audit.record(
            "training-done",
            run=run,
            round=request.server_round,
            update_sha256=adapter_sha256(adapter_out),
            people=plan.people,
            records=result.examples,
            steps=result.steps,
            noise_multiplier=plan.training.noise_multiplier,
            epsilon_before=plan.epsilon_before,
            epsilon_after=entry.epsilon_after,
            epsilon_budget=self.config.privacy.epsilon,
            delta=self.config.privacy.delta,
        )
        logger.info(
            "site %s trained round %d: %d steps, ε=%.3f of %.3f",
            self.site_id,
            request.server_round,
            result.steps,
            entry.epsilon_after,
            self.config.privacy.epsilon,
        )
        return TrainOutcome(
            adapter=adapter_out,
            result=result,
            epsilon=entry.epsilon_after,
            noise_multiplier=plan.training.noise_multiplier,
        )

    def evaluate(self, request: RoundRequest, adapter: AdapterArrays, run: str) -> EvalResult:
        with self._deciding(run, request, "evaluate"):
            check_request(self.config, request)
            data = self.load_data()
            check_cohort(self.config, data.holdout.persons, purpose="report metrics")
        model = self.build_model(request, adapter)
        result = DPTrainer(model, self.task.input_names).evaluate(data.holdout)
        self.audit.record(
            "evaluation-done",
            run=run,
            round=request.server_round,
            records=result.examples,
            accuracy=result.accuracy,
            loss=result.loss,
        )
        return result


def outgoing_adapter(model: PeftModel, request: RoundRequest) -> AdapterArrays:
    """The update as it leaves the site (and as it is hashed): the adapter's tensors in
    the run's update precision, without the frozen A matrices under FFA-LoRA."""
    arrays = {
        name: value.detach().cpu().numpy().astype(request.update_dtype, copy=False)
        for name, value in get_peft_model_state_dict(model).items()
    }
    return without_lora_a(arrays) if request.freeze_lora_a else arrays


def load_site(path: Path) -> Site:
    return Site(load_site_config(path))
