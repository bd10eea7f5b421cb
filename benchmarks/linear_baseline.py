"""The baselines of ``utility_real``: a linear model on the sites' own model inputs.

A softmax regression (logistic for two classes) on the same cleaned inputs the
federation trains on (a table's scaled numeric values and one-hot categories, an
image's normalised pixels), fitted on every site's training records pooled, which
only a simulation can do: with DP-SGD (Opacus, Poisson sampling, σ calibrated for the
run's ε and δ by Opacus's own ``make_private_with_epsilon``) and without it.

Its learning rate is the best of a few on the pooled held-out records, the same
records the federation is scored on; picking the baseline's best makes the comparison
harder for fedlora, not easier. (Choosing on the held-out data is not private; it is
a benchmark's ceiling for the baseline, not something a site would do.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.data import SiteData
from common.inference import classification_metrics

LEARNING_RATES = (0.05, 0.2, 1.0)
EPOCHS = 30
BATCH_SIZE = 64
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class LinearResult:
    accuracy: float
    auc: float | None
    learning_rate: float


def design_matrix(data: SiteData) -> npt.NDArray[np.float32]:
    """One row per record: every float input flattened, every integer input one-hot
    (a table's categorical ids; width: the largest id seen plus one)."""
    columns = []
    for name in sorted(data.features):
        values = np.asarray(data.features[name])
        if np.issubdtype(values.dtype, np.integer):
            for feature in range(values.shape[1]):
                width = int(values[:, feature].max(initial=0)) + 1
                columns.append(np.eye(width, dtype=np.float32)[values[:, feature]])
        else:
            columns.append(values.reshape(len(values), -1).astype(np.float32))
    return np.concatenate(columns, axis=1)


def _fit(
    train: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    learning_rate: float,
    privacy: tuple[float, float] | None,
    seed: int,
) -> nn.Linear:
    torch.manual_seed(seed)
    features, labels = train
    model = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=0.9
    )
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        TensorDataset(features, labels), batch_size=BATCH_SIZE, shuffle=True
    )
    trained: nn.Module = model
    if privacy is not None:
        epsilon, delta = privacy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the secure-RNG notice
            trained, optimizer, loader = PrivacyEngine(accountant="prv").make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=epsilon,
                target_delta=delta,
                epochs=EPOCHS,
                max_grad_norm=MAX_GRAD_NORM,
                poisson_sampling=True,
            )
    with warnings.catch_warnings():
        # Opacus's hooks on a model whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook")
        _epochs(trained, model, optimizer, loader, private=privacy is not None)
    return model


def _epochs(
    trained: nn.Module,
    model: nn.Linear,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    *,
    private: bool,
) -> None:
    for _ in range(EPOCHS):
        for batch_features, batch_labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(batch_labels):
                nn.functional.cross_entropy(trained(batch_features), batch_labels).backward()
            elif private:  # an empty Poisson batch: a noise-only step
                for parameter in model.parameters():
                    parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]
            optimizer.step()


def linear_baseline(
    train: SiteData,
    holdout: SiteData,
    privacy: tuple[float, float] | None,
    seed: int = 0,
) -> LinearResult:
    """The best of :data:`LEARNING_RATES` on ``holdout``; ``privacy``: (ε, δ) or None."""
    x_train = torch.from_numpy(design_matrix(train))
    x_holdout = design_matrix(holdout)
    if x_holdout.shape[1] != x_train.shape[1]:  # a category seen on one side only
        width = max(x_holdout.shape[1], x_train.shape[1])
        x_train = nn.functional.pad(x_train, (0, width - x_train.shape[1]))
        x_holdout = np.pad(x_holdout, ((0, 0), (0, width - x_holdout.shape[1])))
    labels = torch.from_numpy(train.labels.astype(np.int64))
    best: LinearResult | None = None
    for learning_rate in LEARNING_RATES:
        model = _fit((x_train, labels), len(train.classes), learning_rate, privacy, seed)
        with torch.no_grad():
            logits = model(torch.from_numpy(x_holdout)).numpy()
        scores = classification_metrics(logits, holdout.labels)
        auc = scores["auc"]
        result = LinearResult(
            float(scores["accuracy"] or 0.0), None if auc is None else float(auc), learning_rate
        )
        if best is None or result.accuracy > best.accuracy:
            best = result
    assert best is not None
    return best
