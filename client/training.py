"""One DP-SGD trainer for every task: peft model in, Opacus-private training out.

The façade mirrors Opacus's ``make_private``: callers hand over a model whose trainable
parameters are exactly the ones to train (LoRA + head), the site's data and a plan, and
get back metrics and the accountant history that now includes this round. The history
is the caller's to persist *before* anything leaves the site.

The privacy unit is the person, not the record. Opacus's Poisson sampler draws *people*
(each with probability q), and each drawn person contributes exactly one of their
records, picked at random, to the batch. A person's influence on any step is therefore
one clipped gradient, so the (ε, δ) that the accountant computes from q holds per
person however many records (images, loans) they own.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from client.data import SiteData
from client.privacy import HistoryEntry
from common import dp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """How one site trains for one round."""

    epochs: int
    batch_size: int
    """Expected batch size; Poisson sampling draws each record with q = batch / N."""
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    """How Opacus computes per-sample gradients: 'hooks', 'functorch' or 'ghost' (ghost
    clipping: norms without materialising per-sample gradients, two backward passes)."""
    private: bool = True
    """False trains the same model, batches and data with no clipping and no noise: the
    baseline of the DP-overhead and utility benchmarks. A site never trains this way."""
    optimizer: str = "sgd"
    """'sgd' (with momentum 0.9) or 'adam'."""
    seed: int | None = None
    """Seeds sampling and noise. None (always, at a site): fresh site-local entropy. A
    seed from the coordinator would let it regenerate the noise and undo the privacy;
    tests pass one for reproducibility."""

    def batches_per_epoch(self, people: int) -> int:
        return dp.batches_per_epoch(people, self.batch_size)

    def sample_rate(self, people: int) -> float:
        """Opacus's q for this plan (common.dp)."""
        return dp.sample_rate(people, self.batch_size)

    def steps(self, people: int) -> int:
        """Optimiser steps one round takes: what the accountant will be charged."""
        return dp.steps_per_round(people, self.batch_size, self.epochs)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    accuracy: float
    examples: int
    steps: int
    history: list[HistoryEntry]
    """The full accountant history after this round (previous rounds included)."""
    round_entry: HistoryEntry
    """What this round alone charged: (σ, q, steps)."""
    batched: int = 0
    """Records the round's batches held in all (Poisson batches vary in size)."""


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    examples: int


class OneRecordPerPerson(Dataset[tuple[torch.Tensor, ...]]):
    """Item *i* is a random record of person *i*: sampling items samples people."""

    def __init__(self, records: TensorDataset, person_keys: Sequence[str], seed: int) -> None:
        self.records = records
        by_person: dict[str, list[int]] = {}
        for index, key in enumerate(person_keys):
            by_person.setdefault(key, []).append(index)
        self.people = [by_person[key] for key in sorted(by_person)]
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.people)

    def __getitem__(self, person: int) -> tuple[torch.Tensor, ...]:
        owned = self.people[person]
        pick = owned[int(torch.randint(len(owned), (1,), generator=self.generator))]
        return tuple(self.records[pick])


class PerSampleLoss(nn.Module):
    """Cross-entropy per record, weighted by class; ``reduction`` is Opacus's switch.

    Ghost clipping calls the criterion with ``reduction = "none"`` to get one loss per
    record, so the weighting lives here rather than in the training loop.
    """

    def __init__(self, class_weights: torch.Tensor | None, reduction: str = "mean") -> None:
        super().__init__()
        self.class_weights = class_weights
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        if self.class_weights is not None:
            losses = losses * self.class_weights.to(logits.device)[labels]
        return losses.mean() if self.reduction == "mean" else losses


class PrivateTraining(NamedTuple):
    engine: PrivacyEngine | None
    """None when the plan is not private."""
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, ...]]
    trainable: list[nn.Parameter]
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _empty_step(optimizer: torch.optim.Optimizer, trainable: Sequence[nn.Parameter]) -> None:
    """The noise-only step of an empty Poisson batch: zero per-sample gradients (or, under
    ghost clipping, zero gradients and no per-sample norms) and Opacus's step."""
    for parameter in trainable:
        parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()


class DPTrainer:
    """Trains and evaluates any task's peft model on a site's arrays."""

    def __init__(
        self,
        model: nn.Module,
        input_names: Sequence[str],
        class_weights: Sequence[float] | None = None,
    ) -> None:
        self.model = model
        self.input_names = tuple(input_names)
        self.class_weights = (
            torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        )

    @property
    def device(self) -> torch.device:
        """Where the model lives (a site's CPU; a GPU when the operator put it there):
        batches and Opacus's noise are made there too."""
        return next(self.model.parameters()).device

    def _dataset(self, data: SiteData) -> TensorDataset:
        missing = [name for name in self.input_names if name not in data.features]
        if missing:
            raise ValueError(f"site data lacks model inputs {missing}")
        tensors = [
            torch.from_numpy(np.ascontiguousarray(data.features[n])) for n in self.input_names
        ]
        return TensorDataset(*tensors, torch.from_numpy(data.labels))

    def _per_sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return PerSampleLoss(self.class_weights, reduction="none")(logits, labels)

    def make_private(
        self, data: SiteData, plan: TrainingPlan, history: Sequence[HistoryEntry]
    ) -> PrivateTraining:
        """Opacus's model, optimizer, criterion and person-level Poisson loader for ``plan``.

        The accountant starts from ``history``, so ε keeps accumulating across rounds. A
        plan that is not private gets the same optimizer over fixed-size shuffled batches
        of the same one-record-per-person data, and no Opacus at all.
        """
        self.model.train()
        seed = plan.seed if plan.seed is not None else secrets.randbits(63)
        people = OneRecordPerPerson(self._dataset(data), data.person_keys, seed=seed)
        generator = torch.Generator().manual_seed(seed + 1)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if plan.optimizer == "adam":
            optimizer = torch.optim.Adam(trainable, lr=plan.learning_rate, betas=dp.ADAM_BETAS)
        else:
            optimizer = torch.optim.SGD(trainable, lr=plan.learning_rate, momentum=dp.SGD_MOMENTUM)
        criterion = PerSampleLoss(self.class_weights)
        if not plan.private:
            loader = DataLoader(
                people, batch_size=plan.batch_size, shuffle=True, generator=generator
            )
            return PrivateTraining(None, self.model, optimizer, loader, trainable, criterion)
        loader = DataLoader(people, batch_size=plan.batch_size, generator=generator)
        with warnings.catch_warnings():
            # Opacus warns that secure RNG is off (torchcsprng is not part of the stack).
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=plan.accountant)
            engine.accountant.history = [tuple(entry) for entry in history]
            made = engine.make_private(
                module=self.model,
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=plan.grad_sample_mode,
                noise_generator=torch.Generator(device=self.device).manual_seed(seed + 2),
            )
        if len(made) == 4:  # ghost clipping wraps the criterion too
            module, private_optimizer, criterion, private_loader = made
        else:
            module, private_optimizer, private_loader = made
        return PrivateTraining(
            engine, module, private_optimizer, private_loader, trainable, criterion
        )

    def train(
        self, data: SiteData, plan: TrainingPlan, history: Sequence[HistoryEntry]
    ) -> TrainResult:
        """Run ``plan.epochs`` of DP-SGD, charging an accountant that starts from ``history``."""
        # Subnormal floats (a zero-initialised head sends ~1e-40 gradients back through
        # the frozen backbone) run CPU matmuls ~4x slower; flushing them to zero changes
        # nothing a DP step can see. The setting is per process: sites train in their own.
        torch.set_flush_denormal(True)
        engine, model, optimizer, loader, trainable, criterion = self.make_private(
            data, plan, history
        )
        device = self.device
        total_loss, correct, seen, steps = 0.0, 0, 0, 0
        with warnings.catch_warnings():
            # Frozen inputs make torch warn about full backward hooks on every batch.
            warnings.filterwarnings("ignore", message="Full backward hook")
            try:
                for _ in range(plan.epochs):
                    for *inputs, labels in loader:
                        optimizer.zero_grad(set_to_none=True)
                        if len(labels) == 0:
                            # An empty Poisson batch still takes a noise-only step, charged
                            # to the accountant like any other. Models cannot run on zero
                            # records, so hand Opacus the (empty) per-sample gradients.
                            _empty_step(optimizer, trainable)
                            steps += 1
                            continue
                        labels = labels.to(device)
                        kwargs = {
                            name: tensor.to(device)
                            for name, tensor in zip(self.input_names, inputs, strict=True)
                        }
                        logits = model(**kwargs).logits
                        criterion(logits, labels).backward()
                        optimizer.step()
                        total_loss += float(self._per_sample_loss(logits.detach(), labels).sum())
                        correct += int((logits.argmax(-1) == labels).sum())
                        seen += len(labels)
                        steps += 1
            finally:
                if isinstance(model, AbstractGradSampleModule):
                    model._close()  # removes Opacus hooks; the peft model stays usable
        self.model.eval()
        if engine is None:
            history_out = [tuple(entry) for entry in history]
            round_entry: HistoryEntry = (0.0, 0.0, steps)
        else:
            history_out = list(engine.accountant.history)
            round_entry = (plan.noise_multiplier, float(loader.sample_rate), steps)  # type: ignore[attr-defined]
        return TrainResult(
            loss=total_loss / max(seen, 1),
            accuracy=correct / max(seen, 1),
            examples=len(data.labels),
            steps=steps,
            history=[(float(s), float(q), int(n)) for s, q, n in history_out],
            round_entry=round_entry,
            batched=seen,
        )

    @torch.no_grad()
    def logits(self, data: SiteData, batch_size: int = 256) -> list[torch.Tensor]:
        """The model's logits on ``data``, one tensor per batch, in record order."""
        self.model.eval()
        loader = DataLoader(self._dataset(data), batch_size=batch_size)
        device = self.device
        return [
            self.model(
                **{n: t.to(device) for n, t in zip(self.input_names, inputs, strict=True)}
            ).logits.cpu()
            for *inputs, _ in loader
        ]

    @torch.no_grad()
    def evaluate(self, data: SiteData, batch_size: int = 256) -> EvalResult:
        labels = torch.from_numpy(data.labels).split(batch_size)
        total_loss, correct = 0.0, 0
        for logits, batch_labels in zip(self.logits(data, batch_size), labels, strict=True):
            total_loss += float(nn.functional.cross_entropy(logits, batch_labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch_labels).sum())
        examples = len(data.labels)
        return EvalResult(
            loss=total_loss / max(examples, 1),
            accuracy=correct / max(examples, 1),
            examples=examples,
        )
