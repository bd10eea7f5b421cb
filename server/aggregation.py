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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from common.adapters import AdapterSchema, PackedAdapter, lora_pairs
from common.registry import Registry

Arrays = Mapping[str, npt.NDArray[np.floating]]
Aggregate = dict[str, npt.NDArray[np.floating]]
Aggregator = Callable[[Iterable[Arrays], Iterable[float]], Aggregate]
"""Takes the updates and their weights as iterables: fedavg streams them, the robust
aggregators (which need every value of a coordinate at once) hold them all."""


def _check_updates(
    updates: Iterable[Arrays], weights: Iterable[float]
) -> tuple[list[Arrays], list[float]]:
    """Every update and weight, in lists, once checked to belong together."""
    held, held_weights = list(updates), list(weights)
    if not held:
        raise ValueError("nothing to aggregate")
    if len(held) != len(held_weights):
        raise ValueError("one weight per update is required")
    names = set(held[0])
    if any(set(update) != names for update in held[1:]):
        raise ValueError("every update must carry the same tensors")
    return held, held_weights


PARTIAL_SUM_UPDATES = 32
"""fedavg sums at most this many updates in float32 before folding them into float64."""


def fedavg(
    updates: Iterable[Arrays],
    weights: Iterable[float],
    partial_sum_updates: int = PARTIAL_SUM_UPDATES,
) -> Aggregate:
    """Weighted mean of every tensor (weights: examples per site), cast back to the
    updates' dtype.

    Streaming: one pass over ``updates`` (a generator is fine), holding one running sum,
    so memory does not grow with the number of sites. Each update is handled as one
    contiguous vector (packed updates, see ``AdapterSchema.pack``, are used as they are)
    with one fused multiply-add, on every core; float32 partial sums of at most
    ``partial_sum_updates`` updates are folded into a float64 total, so rounding is that
    of a 32-term float32 sum, far below the DP noise in any update.
    """
    schema: AdapterSchema | None = None
    running: torch.Tensor | None = None
    total: torch.Tensor | None = None
    scale, weight_sum, in_partial = 1.0, 0.0, 0
    for update, weight in _paired(updates, weights):
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError("weights must be finite and non-negative")
        if schema is None:
            if not update:
                raise ValueError("every update must carry the same tensors")
            schema = AdapterSchema.of(update)
            exact = schema.entries[0][2] == "float64"
            running = torch.zeros(schema.elements, dtype=torch.float64 if exact else torch.float32)
            total = torch.zeros(schema.elements, dtype=torch.float64)
            scale = weight if weight > 0 else 1.0  # relative weights: one update stays exact
        elif set(update) != {name for name, _, _ in schema.entries}:
            raise ValueError("every update must carry the same tensors")
        assert running is not None and total is not None
        flat = _flat(update, schema)
        running.add_(torch.from_numpy(flat).to(running.dtype), alpha=weight / scale)
        weight_sum += weight
        in_partial += 1
        if in_partial == partial_sum_updates:
            total.add_(running)
            running.zero_()
            in_partial = 0
    if schema is None or running is None or total is None:
        raise ValueError("nothing to aggregate")
    if weight_sum <= 0:
        raise ValueError("weights must have a positive sum")
    total.add_(running)
    mean = (total * (scale / weight_sum)).numpy()
    dtype = aggregate_dtype(np.dtype(schema.entries[0][2]))
    return dict(schema.with_dtype(dtype.name).unpack(mean.astype(dtype)))


def aggregate_dtype(update_dtype: np.dtype[Any]) -> np.dtype[Any]:
    """What an aggregate is kept in: the updates' dtype, but never below float32 (sites
    may send float16 to halve the traffic; the global adapter stays full precision)."""
    return np.promote_types(update_dtype, np.float32)


def _paired(updates: Iterable[Arrays], weights: Iterable[float]) -> Iterator[tuple[Arrays, float]]:
    sentinel = object()
    for update, weight in zip_longest(updates, weights, fillvalue=sentinel):
        if update is sentinel or weight is sentinel:
            raise ValueError("one weight per update is required")
        yield update, weight  # type: ignore[misc]


def _flat(update: Arrays, schema: AdapterSchema) -> npt.NDArray[np.floating]:
    """The update as one vector in the schema's order: free for a packed update."""
    if (
        isinstance(update, PackedAdapter)
        and update.flat.dtype == np.dtype(schema.entries[0][2])
        and list(update) == [name for name, _, _ in schema.entries]
    ):
        return update.flat
    return schema.pack(update).flat


def _coordinatewise(
    updates: Sequence[Arrays],
    statistic: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
) -> Aggregate:
    """Apply ``statistic`` over the site axis, one tensor at a time (memory: N × one tensor)."""
    result: Aggregate = {}
    for name, first in updates[0].items():
        stacked = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
        result[name] = statistic(stacked).astype(aggregate_dtype(first.dtype))
    return result


def symmetric_trimmed_mean(
    updates: Iterable[Arrays], weights: Iterable[float], trim_fraction: float = 0.2
) -> Aggregate:
    """Coordinate-wise mean after dropping the ⌊β·N⌋ smallest and largest values (the
    textbook trimmed mean of Yin et al., 2018).

    Tolerates up to ⌊β·N⌋ arbitrary sites, but with one of them present it also drops
    an honest value from the other end, which biases every coordinate toward the
    attacker's side by a fraction of the spread between sites; under DP that spread is
    the noise, and the bias costs accuracy (see the README's robustness benchmark).
    """
    updates, weights = _check_updates(updates, weights)
    trim = _trim_count(trim_fraction, len(updates))

    def statistic(stacked: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        ordered = np.sort(stacked, axis=0)
        kept = ordered[trim : len(updates) - trim]
        return np.asarray(kept.mean(axis=0))

    return _coordinatewise(updates, statistic)


def trimmed_mean(
    updates: Iterable[Arrays], weights: Iterable[float], trim_fraction: float = 0.2
) -> Aggregate:
    """Coordinate-wise mean after dropping the ⌊β·N⌋ values farthest from the median.

    Tolerates up to ⌊β·N⌋ arbitrary sites: any value far enough to matter is among the
    farthest from the median and is dropped. Unlike the symmetric trimmed mean it does
    not also drop honest values from the other end, so with the outliers gone it is the
    plain mean of the rest, without a bias toward the attacker's side. With too few
    sites to trim anything it is the plain (unweighted) mean.
    """
    updates, weights = _check_updates(updates, weights)
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


def coordinate_median(updates: Iterable[Arrays], weights: Iterable[float]) -> Aggregate:
    """Coordinate-wise median: tolerates any minority of arbitrary sites."""
    updates, weights = _check_updates(updates, weights)
    return _coordinatewise(updates, lambda stacked: np.asarray(np.median(stacked, axis=0)))


def lora_product_error(
    updates: Sequence[Arrays], weights: Sequence[float], aggregate: Arrays
) -> float:
    """How far the aggregate's LoRA product is from the mean of the sites' products.

    ‖Σ_m B̄_m Ā_m − Σ_m mean_k(B_k,m A_k,m)‖ / ‖Σ_m mean_k(B_k,m A_k,m)‖ over every LoRA
    module m (Frobenius, stacked), with the weights of the weighted mean. 0 means the
    aggregate is exactly the average update; averaging A and B separately is not.
    """
    updates, weights = _check_updates(updates, weights)
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
