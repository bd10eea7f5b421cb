"""Aggregators: pure functions from site updates to a new global adapter.

Each takes the updates (name -> array, same schema) and their weights and returns the
aggregate; none touches Flower, so each is tested against a NumPy reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from common.registry import Registry

Arrays = Mapping[str, npt.NDArray[np.floating]]
Aggregator = Callable[[Sequence[Arrays], Sequence[float]], dict[str, npt.NDArray[np.floating]]]


def fedavg(
    updates: Sequence[Arrays], weights: Sequence[float]
) -> dict[str, npt.NDArray[np.floating]]:
    """Weighted mean of every tensor (weights: examples per site), in float64, cast back.

    One pass over the updates with a running sum, so memory does not grow with the
    number of sites.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update is required")
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        raise ValueError("weights must be finite and non-negative")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    names = set(updates[0])
    if any(set(update) != names for update in updates[1:]):
        raise ValueError("every update must carry the same tensors")
    sums: dict[str, npt.NDArray[np.float64]] = {
        name: np.zeros(value.shape, dtype=np.float64) for name, value in updates[0].items()
    }
    for update, weight in zip(updates, weights, strict=True):
        for name, value in update.items():
            sums[name] += np.asarray(value, dtype=np.float64) * (weight / total)
    return {name: sums[name].astype(updates[0][name].dtype) for name in sums}


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", [("fedavg", fedavg)])
