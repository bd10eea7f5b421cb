"""Aggregators: pure functions from site updates to a new global adapter.

Each takes the updates (name -> array, same schema) and their weights and returns the
aggregate; none touches Flower, so each is tested against a NumPy reference. The
registry says what each one needs of the sites (FFA-LoRA freezes A).

The robust aggregators (``trimmed-mean``, ``median``) ignore the weights: the weights
are the sites' own ``num-examples``, and a site that lies about them should not buy
influence over a statistic meant to resist it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from common.adapters import lora_pairs
from common.registry import Registry

Arrays = Mapping[str, npt.NDArray[np.floating]]
Aggregate = dict[str, npt.NDArray[np.floating]]
Aggregator = Callable[[Sequence[Arrays], Sequence[float]], Aggregate]


def _check_updates(updates: Sequence[Arrays], weights: Sequence[float]) -> None:
    if not updates:
        raise ValueError("nothing to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update is required")
    names = set(updates[0])
    if any(set(update) != names for update in updates[1:]):
        raise ValueError("every update must carry the same tensors")


def fedavg(updates: Sequence[Arrays], weights: Sequence[float]) -> Aggregate:
    """Weighted mean of every tensor (weights: examples per site), in float64, cast back.

    One pass over the updates with a running sum, so memory does not grow with the
    number of sites.
    """
    _check_updates(updates, weights)
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        raise ValueError("weights must be finite and non-negative")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    sums: dict[str, npt.NDArray[np.float64]] = {
        name: np.zeros(value.shape, dtype=np.float64) for name, value in updates[0].items()
    }
    for update, weight in zip(updates, weights, strict=True):
        for name, value in update.items():
            sums[name] += np.asarray(value, dtype=np.float64) * (weight / total)
    return {name: sums[name].astype(updates[0][name].dtype) for name in sums}


def _coordinatewise(
    updates: Sequence[Arrays],
    statistic: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
) -> Aggregate:
    """Apply ``statistic`` over the site axis, one tensor at a time (memory: N × one tensor)."""
    result: Aggregate = {}
    for name, first in updates[0].items():
        stacked = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
        result[name] = statistic(stacked).astype(first.dtype)
    return result


def symmetric_trimmed_mean(
    updates: Sequence[Arrays], weights: Sequence[float], trim_fraction: float = 0.2
) -> Aggregate:
    """Coordinate-wise mean after dropping the ⌊β·N⌋ smallest and largest values (the
    textbook trimmed mean of Yin et al., 2018).

    Tolerates up to ⌊β·N⌋ arbitrary sites, but with one of them present it also drops
    an honest value from the other end, which biases every coordinate toward the
    attacker's side by a fraction of the spread between sites; under DP that spread is
    the noise, and the bias costs accuracy (see the README's robustness benchmark).
    """
    _check_updates(updates, weights)
    trim = _trim_count(trim_fraction, len(updates))

    def statistic(stacked: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        ordered = np.sort(stacked, axis=0)
        kept = ordered[trim : len(updates) - trim]
        return np.asarray(kept.mean(axis=0))

    return _coordinatewise(updates, statistic)


def trimmed_mean(
    updates: Sequence[Arrays], weights: Sequence[float], trim_fraction: float = 0.2
) -> Aggregate:
    """Coordinate-wise mean after dropping the ⌊β·N⌋ values farthest from the median.

    Tolerates up to ⌊β·N⌋ arbitrary sites: any value far enough to matter is among the
    farthest from the median and is dropped. Unlike the symmetric trimmed mean it does
    not also drop honest values from the other end, so with the outliers gone it is the
    plain mean of the rest, without a bias toward the attacker's side. With too few
    sites to trim anything it is the plain (unweighted) mean.
    """
    _check_updates(updates, weights)
    trim = _trim_count(trim_fraction, len(updates))

    def statistic(stacked: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        distance = np.abs(stacked - np.median(stacked, axis=0))
        nearest = np.argsort(distance, axis=0, kind="stable")[: len(updates) - trim]
        return np.asarray(np.take_along_axis(stacked, nearest, axis=0).mean(axis=0))

    return _coordinatewise(updates, statistic)


def _trim_count(trim_fraction: float, sites: int) -> int:
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must lie in [0, 0.5)")
    return math.floor(trim_fraction * sites)


def coordinate_median(updates: Sequence[Arrays], weights: Sequence[float]) -> Aggregate:
    """Coordinate-wise median: tolerates any minority of arbitrary sites."""
    _check_updates(updates, weights)
    return _coordinatewise(updates, lambda stacked: np.asarray(np.median(stacked, axis=0)))


def lora_product_error(
    updates: Sequence[Arrays], weights: Sequence[float], aggregate: Arrays
) -> float:
    """How far the aggregate's LoRA product is from the mean of the sites' products.

    ‖Σ_m B̄_m Ā_m − Σ_m mean_k(B_k,m A_k,m)‖ / ‖Σ_m mean_k(B_k,m A_k,m)‖ over every LoRA
    module m (Frobenius, stacked), with the weights of the weighted mean. 0 means the
    aggregate is exactly the average update; averaging A and B separately is not.
    """
    _check_updates(updates, weights)
    total = float(sum(weights))
    error_sq, reference_sq = 0.0, 0.0
    for a_name, b_name in lora_pairs(aggregate):
        target = np.zeros(
            (aggregate[b_name].shape[0], aggregate[a_name].shape[1]), dtype=np.float64
        )
        for update, weight in zip(updates, weights, strict=True):
            product = np.asarray(update[b_name], np.float64) @ np.asarray(
                update[a_name], np.float64
            )
            target += product * (weight / total)
        combined = np.asarray(aggregate[b_name], np.float64) @ np.asarray(
            aggregate[a_name], np.float64
        )
        error_sq += float(np.sum((combined - target) ** 2))
        reference_sq += float(np.sum(target**2))
    if reference_sq == 0.0:
        return 0.0 if error_sq == 0.0 else math.inf
    return math.sqrt(error_sq / reference_sq)


@dataclass(frozen=True)
class AggregatorSpec:
    """A registered aggregator: how it is built from the run's settings, and whether the
    sites must freeze LoRA's A (FFA-LoRA) for it."""

    build: Callable[[float], Aggregator]
    """Takes the run's trim fraction (ignored by the aggregators that do not trim)."""
    freezes_lora_a: bool = False
    summary: str = ""


def _fixed(aggregator: Aggregator) -> Callable[[float], Aggregator]:
    return lambda _trim_fraction: aggregator


AGGREGATORS: Registry[AggregatorSpec] = Registry(
    "aggregator",
    [
        ("fedavg", AggregatorSpec(_fixed(fedavg), summary="weighted mean of A and B")),
        (
            "fedavg-ffa",
            AggregatorSpec(
                _fixed(fedavg),
                freezes_lora_a=True,
                summary="FFA-LoRA: A frozen at the run's seed, weighted mean of B (exact)",
            ),
        ),
        (
            "trimmed-mean",
            AggregatorSpec(
                lambda trim_fraction: partial(trimmed_mean, trim_fraction=trim_fraction),
                summary="coordinate-wise mean without the values farthest from the median "
                "(robust, unweighted)",
            ),
        ),
        (
            "trimmed-mean-symmetric",
            AggregatorSpec(
                lambda trim_fraction: partial(symmetric_trimmed_mean, trim_fraction=trim_fraction),
                summary="coordinate-wise mean without the smallest and largest values "
                "(textbook; robust, unweighted)",
            ),
        ),
        (
            "median",
            AggregatorSpec(
                _fixed(coordinate_median), summary="coordinate-wise median (robust, unweighted)"
            ),
        ),
    ],
)
