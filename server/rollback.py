"""The rollback guard as a pure decision: after a round's federated evaluation, keep its
adapter or give way to the best one so far.

The strategy applies the decision (server/strategy.py); what to decide depends only on
the guard's settings, the best adapter so far and the round's figures, so it is tested
without a strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.adapters import AdapterArrays
from common.config import RollbackGuard
from server.strategy_utils import rollback_reason


@dataclass(frozen=True)
class BestAdapter:
    server_round: int
    """The round whose aggregation produced this adapter (0: the initial one)."""
    accuracy: float
    loss: float
    trained: AdapterArrays


@dataclass(frozen=True)
class GuardDecision:
    best: BestAdapter | None
    """The best adapter after this round."""
    restore: BestAdapter | None = None
    """The adapter to go back to, when the round's fell too far."""
    reason: str | None = None


def decide(
    settings: RollbackGuard,
    best: BestAdapter | None,
    current: BestAdapter,
) -> GuardDecision:
    """Keep ``current`` (the round's adapter, with its evaluation) or restore ``best``."""
    if not settings.enabled:
        return GuardDecision(best)
    reason = rollback_reason(
        current.accuracy,
        best.accuracy if best else None,
        best.server_round if best else None,
        settings.max_accuracy_drop,
    )
    if reason is not None and best is not None:
        return GuardDecision(best, restore=best, reason=reason)
    if best is None or current.accuracy > best.accuracy:
        return GuardDecision(current)
    return GuardDecision(best)
