"""The coordinator's strategy: Flower's FedAvg hooks, fedlora's pure functions inside.

Sampling and messaging stay Flower's; what changes is what a round means here:
every site gets the full round request (the site decides whether to take part), each
reply is checked against the run's adapter schema, failures are recorded with their
reason instead of sinking the round, and every aggregate is checkpointed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.adapters import AdapterArrays, AdapterSchema, arrays_to_record
from common.protocol import EVALUATE_METRICS, TRAIN_METRICS, RoundRequest
from server.aggregation import Aggregator
from server.checkpoint import CheckpointStore
from server.reporting import RunRecorder
from server.strategy_utils import metric_record, parse_replies, remember_site, weighted_mean

logger = logging.getLogger(__name__)


class FedLoraStrategy(FedAvg):
    def __init__(
        self,
        *,
        request_for_round: Callable[[int], RoundRequest],
        schema: AdapterSchema,
        aggregator: Aggregator,
        min_sites: int,
        recorder: RunRecorder,
        checkpoints: CheckpointStore,
    ) -> None:
        super().__init__(
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        self.request_for_round = request_for_round
        self.schema = schema
        self.aggregator = aggregator
        self.min_sites = min_sites
        self.recorder = recorder
        self.checkpoints = checkpoints
        self.known_sites: dict[int, str] = {}
        self.introduction_timeout = 120.0
        self.rounds_aggregated = 0
        self.last_aggregate: AdapterArrays | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        request = self.request_for_round(server_round).to_record()
        messages = list(super().configure_train(server_round, arrays, request, grid))
        self.introduce(grid, [m.metadata.dst_node_id for m in messages])
        return messages

    def introduce(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes we have not heard from which site they are, so that even a site that
        refuses every round is reported by name."""
        unknown = [node for node in node_ids if node not in self.known_sites]
        if not unknown:
            return
        queries = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in unknown
        ]
        replies = grid.send_and_receive(queries, timeout=self.introduction_timeout)
        for reply in replies:
            if not reply.has_error():
                remember_site(reply, self.known_sites)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        request = self.request_for_round(server_round).to_record()
        return super().configure_evaluate(server_round, arrays, request, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, bad = parse_replies(replies, self.known_sites, self.schema, TRAIN_METRICS)
        for failure in bad:
            self.recorder.site_failed(
                server_round, failure.site, "train", failure.status, failure.reason
            )
        for reply in good:
            self.recorder.site_trained(server_round, reply.site, reply.metrics)
        weights = [reply.metrics["num-examples"] for reply in good]
        if len(good) < self.min_sites:
            logger.warning(
                "round %d: %d usable update(s), fewer than the minimum of %d sites; "
                "the global adapter is kept as it was",
                server_round,
                len(good),
                self.min_sites,
            )
            self.recorder.round_trained(server_round, int(sum(weights)), aggregated=False)
            return None, None
        aggregate = self.aggregator([r.arrays for r in good if r.arrays is not None], weights)
        self.checkpoints.save(server_round, aggregate)
        self.last_aggregate = aggregate
        self.rounds_aggregated += 1
        self.recorder.round_trained(server_round, int(sum(weights)), aggregated=True)
        metrics = {
            "examples": float(sum(weights)),
            "sites": float(len(good)),
        }
        return arrays_to_record(aggregate), metric_record(metrics)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        good, bad = parse_replies(replies, self.known_sites, None, EVALUATE_METRICS)
        for failure in bad:
            self.recorder.site_failed(
                server_round, failure.site, "evaluate", failure.status, failure.reason
            )
        for reply in good:
            self.recorder.site_evaluated(server_round, reply.site, reply.metrics)
        if not good:
            return None
        weights = [reply.metrics["num-examples"] for reply in good]
        loss = weighted_mean([r.metrics["eval-loss"] for r in good], weights)
        accuracy = weighted_mean([r.metrics["eval-accuracy"] for r in good], weights)
        self.recorder.round_evaluated(server_round, loss, accuracy, int(sum(weights)))
        return metric_record({"eval-loss": loss, "eval-accuracy": accuracy})
