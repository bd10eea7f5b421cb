"""Privacy accounting as pure functions of a DP-SGD history.

An Opacus accountant is fully determined by its history of
``(noise_multiplier, sample_rate, steps)`` entries, so the site keeps that history and
rebuilds the accountant from it whenever it needs ε. Restoring the history is the same
as keeping one accountant alive for the whole life of the dataset, and it survives
process restarts, which a live object does not.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

from opacus.accountants import create_accountant

from common.dp import MIN_NOISE_MULTIPLIER
from common.errors import PolicyError

HistoryEntry = tuple[float, float, int]
"""(noise multiplier σ, sample rate q, steps) — Opacus's accountant history format."""

_MAX_SIGMA = 1e3
MIN_SIGMA = MIN_NOISE_MULTIPLIER
"""Below this a site never goes (and coordinators may not ask for it)."""


def compact(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Merge entries with the same (σ, q): composition does not depend on order, and the
    accountants' cost grows with the number of entries, not of steps."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        if not (math.isfinite(sigma) and sigma > 0 and 0 < rate <= 1 and count >= 0):
            # An accountant given σ = inf or NaN never returns; refuse instead.
            raise PolicyError(f"invalid privacy history entry (σ={sigma}, q={rate}, {count})")
        key = (float(sigma), float(rate))
        steps[key] = steps.get(key, 0) + int(count)
    return [(sigma, rate, count) for (sigma, rate), count in steps.items()]


def epsilon_spent(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    """ε at ``delta`` after every step in ``history`` (0 for an empty history).

    A pure function of its arguments, so each answer is kept for the life of the process:
    a round asks for the ε the ledger already reached, which the round before computed
    (PRV takes 0.5–1 s per call)."""
    if not history:
        return 0.0
    return _epsilon(tuple(compact(history)), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    engine = create_accountant(mechanism=accountant)
    engine.history = list(history)
    try:
        with warnings.catch_warnings():  # numerical notes from probing extreme σ
            warnings.simplefilter("ignore")
            epsilon = float(engine.get_epsilon(delta=delta))
    except (ArithmeticError, ValueError, MemoryError) as exc:
        raise PolicyError(
            f"privacy accounting failed for this plan ({type(exc).__name__})"
        ) from None
    return epsilon if math.isfinite(epsilon) else math.inf


def _rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    try:
        return epsilon_spent(history, delta, "rdp")
    except PolicyError:
        return math.inf


def calibrate_noise(
    history: Sequence[HistoryEntry],
    *,
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
    tolerance: float = 0.01,
) -> float:
    """Smallest σ (within ``tolerance`` in ε) so that history + planned steps fit the budget.

    Unlike Opacus's ``get_noise_multiplier`` this accounts for what was already spent.
    Raises PolicyError when even a huge σ cannot fit (the budget is used up).
    """
    if epsilon_spent(history, delta, accountant) >= target_epsilon:
        raise PolicyError("the privacy budget is already spent")

    def eps_with(sigma: float) -> float:
        try:
            return epsilon_spent([*history, (sigma, sample_rate, steps)], delta, accountant)
        except PolicyError:  # the accountant cannot handle so little noise: too much ε
            return math.inf

    # The floor is probed with RDP, an upper bound on what PRV reports, because PRV at
    # σ = 0.1 takes half a minute per call (and the answer is almost never the floor).
    floor_history = [*history, (MIN_SIGMA, sample_rate, steps)]
    floor_may_fit = accountant == "rdp" or _rdp_epsilon(floor_history, delta) <= target_epsilon
    if floor_may_fit and eps_with(MIN_SIGMA) <= target_epsilon:
        return MIN_SIGMA
    low, high = MIN_SIGMA, 1.0
    while eps_with(high) > target_epsilon:
        low, high = high, high * 2
        if high > _MAX_SIGMA:
            raise PolicyError(f"no noise level fits {steps} more steps into the remaining budget")
    while high - low > 1e-3:
        middle = (low + high) / 2
        eps = eps_with(middle)
        if eps > target_epsilon:
            low = middle
        else:
            high = middle
            if target_epsilon - eps <= tolerance:
                break
    return high
