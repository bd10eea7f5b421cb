"""DP-SGD arithmetic both sides compute: the site to plan and charge a round, the
coordinator to bound what an honest round can send.

These are Opacus's rules for a person-level Poisson loader with expected batch B over
N people, restated once here so the two sides cannot drift: q = 1/⌈N / B⌉, Opacus's
sampler runs int(1 / q) batches an epoch, and its optimizer divides the noisy sum by
the expected batch int(N · q).
"""

from __future__ import annotations

import math

BUDGET_TOLERANCE = 1e-6
"""How far above its budget a spent ε may lie and still count as within it (accountant
rounding): the site's planner refuses beyond it, and the coordinator rejects a reply
that reports more."""
MIN_NOISE_MULTIPLIER = 0.1
"""The least σ a site trains with, and a coordinator may ask for: below it a few rounds
spend any budget a site would hold."""
MAX_NOISE_MULTIPLIER = 1000.0
SGD_MOMENTUM = 0.9
"""The momentum of the sites' SGD: it lets past steps add up to 1/(1 - β) times each."""
ADAM_BETAS = (0.9, 0.999)
"""torch's Adam defaults, which the sites use."""


def batches_per_epoch(people: int, batch_size: int) -> int:
    """⌈people / B⌉ (at least 1): the batches an epoch is planned as."""
    return max(1, math.ceil(people / batch_size))


def sample_rate(people: int, batch_size: int) -> float:
    """Opacus's q: one over the number of batches in an epoch."""
    return 1.0 / batches_per_epoch(people, batch_size)


def steps_per_round(people: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps one round takes, and what the accountant is charged: Opacus's
    sampler runs int(1 / q) batches an epoch, which float rounding can make one less
    than the number of batches."""
    return epochs * int(1 / sample_rate(people, batch_size))


def max_steps_per_round(records: int, batch_size: int, epochs: int) -> int:
    """The most steps an honest site with ``records`` records takes (people ≤ records)."""
    return epochs * batches_per_epoch(records, batch_size)


def expected_batch(people: int, batch_size: int) -> int:
    """The batch Opacus divides the noisy sum by: int(people · q), at least 1."""
    return max(1, int(people * sample_rate(people, batch_size)))
