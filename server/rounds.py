"""The round loop fedlora owns: Flower's ``Strategy.start`` with introductions between
the hooks instead of inside them.

Per round: introductions (ask the nodes not yet heard from; take the answers that came),
the training phase, introductions again (sites that answered while training are
recorded before their updates are), the evaluation phase. The hooks are Flower's
(configure_train, aggregate_train, configure_evaluate, aggregate_evaluate), so the
strategy stays a Flower strategy; what the loop adds is that no hook does network I/O
of its own, and that a site slow to introduce itself is introduced when it answers,
up to a last look before the run ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)


INTRODUCTION_POLL = 1.0
"""Seconds between looks while a round waits for its sites' introductions."""


class RoundStrategy(Protocol):
    """What the loop needs of a strategy (server/strategy.py's FedLoraStrategy)."""

    introduction_timeout: float
    rounds_before: int

    def admit(self, grid: Grid, wait: float = 0.0) -> None: ...

    def awaiting_introductions(self, grid: Grid) -> bool: ...

    def current_arrays(self) -> ArrayRecord: ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]: ...

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None: ...


def run_rounds(strategy: RoundStrategy, grid: Grid, num_rounds: int, timeout: float) -> None:
    """Run ``num_rounds`` rounds (after the ``strategy.rounds_before`` already done)."""
    total = strategy.rounds_before + num_rounds
    for current in range(1, num_rounds + 1):
        started = time.monotonic()
        logger.info("round %d of %d", strategy.rounds_before + current, total)
        strategy.admit(grid)
        # No site may take the round yet, but some have still to say who they are (a
        # resumed run's sites, busy after a restart): ask and look again for up to the
        # introduction timeout rather than fail the round at once.
        deadline = time.monotonic() + strategy.introduction_timeout
        while strategy.awaiting_introductions(grid) and time.monotonic() < deadline:
            strategy.admit(grid, wait=INTRODUCTION_POLL)
        messages = strategy.configure_train(
            current, strategy.current_arrays(), ConfigRecord(), grid
        )
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        strategy.admit(grid)
        strategy.aggregate_train(current, replies)
        messages = strategy.configure_evaluate(
            current, strategy.current_arrays(), ConfigRecord(), grid
        )
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        strategy.aggregate_evaluate(current, replies)
        logger.info(
            "round %d done in %.1f s", strategy.rounds_before + current, time.monotonic() - started
        )
    # A site that has still not said who it is gets one last chance to.
    strategy.admit(grid, wait=strategy.introduction_timeout)
