"""How a simulated site misbehaves (fault injection), for every kind of scenario site.

Its own module because generated sites (:mod:`simulations.scenario`) and the sites of a
researcher's own data (:mod:`simulations.own_sites`) both carry one, and the latter
must not import the scenario that lists them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import StrictModel

BehaviourKind = Literal[
    "nan",
    "inf",
    "wrong-shape",
    "missing-keys",
    "scaled",
    "oversized",
    "error",
    "crash",
    "slow",
    "slow-introduction",
]


class SiteBehaviour(StrictModel):
    """How a simulated site misbehaves in training rounds (fault injection).

    The site trains honestly, then its reply is corrupted: ``nan``/``inf`` values,
    a ``wrong-shape`` tensor, ``missing-keys``, an update ``scaled`` by ``factor``, an
    ``oversized`` payload, an ``error`` reply (without training), a ``crash`` (the
    site's process dies after ``crash_after_steps`` optimiser steps) or a ``slow``
    reply (``delay`` seconds late: a straggler). Evaluation stays honest. A
    ``slow-introduction`` site is honest in every round but answers the coordinator's
    introduction ``delay`` seconds late (a site busy or on a loaded machine).
    """

    kind: BehaviourKind
    factor: float = Field(default=1000.0, description="scaled: the update's multiplier.")
    delay: float = Field(
        default=0.0, ge=0, description="slow, slow-introduction: seconds before replying."
    )
    crash_after_steps: int = Field(default=1, ge=1, description="crash: steps before dying.")
    from_round: int = Field(default=1, ge=1, description="First round that misbehaves.")
