"""A site: the one object a site's process keeps, and the round's work it does.

It connects small parts, each with one job and each loaded once per process:

* ``data`` (client/data/source.py): the site's records, read and hashed once, again
  when the files change;
* ``models`` (client/models.py): the base model, hashed and loaded once, again when
  its files change;
* ``planner`` (client/planner.py): what a round may spend, from budget and ledger;
* ``audit`` (client/audit.py): the site's signed log;
* ``preflight`` (client/preflight.py): every reason to refuse, shared with the CLI.

``client/app.py`` turns Flower messages into calls on :class:`Site`; there is no
Flower here, so the daemon, the CLI and the tests share it. A Site is used by one
message at a time (``lock``): the cached model is the site's one working copy.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model_state_dict

from client.audit import SiteAudit
from client.data.source import LoadedData, SiteDataSource
from client.ledger import LedgerError, PrivacyLedger, RunPlan, read_index
from client.models import BaseModelCache
from client.planner import EPSILON_TOLERANCE, PrivacyPlanner, RoundPlan
from client.preflight import classes_problem, preflight
from client.privacy import HistoryEntry
from client.training import DPTrainer, EvalResult, TrainingPlan, TrainResult
from common.adapters import AdapterArrays, adapter_sha256
from common.config import SiteConfig, data_kind, load_site_config
from common.errors import BudgetError, ConfigError, PolicyError
from common.protocol import RoundRequest
from common.tasks import TASKS, TaskSpec

logger = logging.getLogger(__name__)

SALT_FILE = "person-salt"

__all__ = [
    "EPSILON_TOLERANCE",
    "SALT_FILE",
    "LoadedData",
    "RoundPlan",
    "Site",
    "TrainOutcome",
    "load_site",
    "outgoing_adapter",
]


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
        self.data = SiteDataSource(config, lambda: self.salt)
        self.models = BaseModelCache(self.task, config.site.base_model)
        self.planner = PrivacyPlanner(
            config.site.id, config.privacy, config.privacy.grad_sample_mode
        )
        self.lock = threading.RLock()
        """Held while a message uses the site's data and model."""

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
        """The site's data (read once per process; again when its files change)."""
        return self.data.load()

    def preprocessing(self) -> dict[str, Any]:
        """How records become model inputs here (a table's is fitted on its data)."""
        return self.data.preprocessing()

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
        """The site's base model with LoRA as the run asks and the global weights in.

        Under FFA-LoRA the coordinator sends no A matrices: they are regenerated from the
        run's seed and frozen, so only B (and the head) train."""
        self.check_classes(self.models.outputs())
        return self.models.model(request.lora, request.layout, adapter)

    def check_classes(self, outputs: int) -> None:
        """The model must have one output per class the site's data names."""
        problem = classes_problem(self.config, outputs)
        if problem is not None:
            raise problem

    # ------------------------------------------------------------------ privacy ---

    def training_plan(self, request: RoundRequest) -> TrainingPlan:
        return self.planner.training_plan(request)

    def run_noise(
        self,
        request: RoundRequest,
        history: list[HistoryEntry],
        sample_rate: float,
        steps_per_round: int,
    ) -> tuple[float, float]:
        return self.planner.run_noise(request, history, sample_rate, steps_per_round)

    def plan_round(
        self, request: RoundRequest, people: int, ledger: PrivacyLedger, run: str
    ) -> RoundPlan:
        """The round's plan (client/planner.py); a run planned here is audited."""

        def planned(plan: RunPlan, spent: float) -> None:
            self.audit.record(
                "run-planned",
                run=run,
                noise_multiplier=plan.noise_multiplier,
                rounds=plan.planned_rounds,
                epsilon_spent=spent,
                epsilon_target=plan.epsilon_target,
            )

        return self.planner.plan_round(request, people, ledger, run, planned)

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
        """The coordinator introduced itself for ``run``; the site names its audit key.
        Reads no data and no model: an introduction is answered at once."""
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
        with self.lock:
            with self._deciding(run, request, "train"):
                checked = preflight(self, "train", request)
                checked.raise_first()
                data = self._data(checked.data)
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
        with self.lock:
            with self._deciding(run, request, "evaluate"):
                checked = preflight(self, "evaluate", request)
                checked.raise_first()
                data = self._data(checked.data)
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

    @staticmethod
    def _data(data: LoadedData | None) -> LoadedData:
        if data is None:  # a round's preflight raises rather than leave it unread
            raise RuntimeError("preflight returned without the site's data")
        return data


def outgoing_adapter(model: PeftModel, request: RoundRequest) -> AdapterArrays:
    """The update as it leaves the site (and as it is hashed): the adapter's tensors in
    the run's update precision, without the frozen A matrices under FFA-LoRA."""
    arrays = {
        name: value.detach().cpu().numpy().astype(request.update_dtype, copy=True)
        for name, value in get_peft_model_state_dict(model).items()
    }
    return request.layout.trained(arrays)


def load_site(path: Path) -> Site:
    return Site(load_site_config(path))
