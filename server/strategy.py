"""The coordinator's strategy: Flower's FedAvg hooks, fedlora's pure functions inside.

Sampling and messaging stay Flower's; what changes is what a round means here:
every site gets the full round request (the site decides whether to take part), each
reply is validated (server/validation.py) before it may be aggregated, sites that
fail, refuse or stay silent are recorded with their reason instead of sinking the
round, every aggregate is checkpointed, and a round whose federated accuracy falls
too far below the best so far gives way to the best adapter (the rollback guard).

Each event of a round is published once (server/events.py) and reaches both the
metrics recorder and the audit log. Introductions (who a node is) are asked by the
round loop (server/rounds.py), never inside a hook, and retried until a node answers
(server/introductions.py). The strategy keeps the global adapter rather than trusting
arrays handed back by a loop, because the rollback guard may replace it after
evaluation; the loop sends what the strategy holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.adapters import AdapterArrays, AdapterSchema, adapter_sha256, arrays_to_record
from common.config import RollbackGuard, UpdateValidation
from common.errors import ConfigError
from common.protocol import RoundRequest
from common.replies import EvalMetrics, TrainMetrics
from server.aggregation import Aggregator, lora_product_error
from server.audit import CoordinatorAudit
from server.checkpoint import CheckpointStore, EvaluatedAdapter, RunState
from server.events import (
    Aggregated,
    Evaluated,
    RolledBack,
    RoundEvents,
    RoundFailed,
    RoundStarted,
    SiteEvaluated,
    SiteFailed,
    SiteJoined,
    SiteTrained,
)
from server.identity import Admission
from server.introductions import Introductions
from server.reporting import RunRecorder
from server.rollback import BestAdapter, decide
from server.strategy_utils import (
    EXCLUSION_STATUSES,
    FailedReply,
    SiteReply,
    UpdateReceipt,
    metric_record,
    missing_replies,
    parse_replies,
    update_receipt,
    weighted_mean,
)
from server.validation import NormReference, UpdateLimits, check_evaluation, validate_update

logger = logging.getLogger(__name__)


class FedLoraStrategy(FedAvg):
    def __init__(
        self,
        *,
        request_for_round: Callable[[int], RoundRequest],
        initial: AdapterArrays,
        frozen: AdapterArrays,
        aggregator: Aggregator,
        validation: UpdateValidation,
        min_sites: int,
        rollback: RollbackGuard,
        round_timeout: float,
        recorder: RunRecorder,
        checkpoints: CheckpointStore,
        audit: CoordinatorAudit,
        run_id: str = "",
        config_sha256: str = "",
        audit_keys: Mapping[str, str] | None = None,
    ) -> None:
        """``initial`` is the whole adapter; ``frozen`` the tensors no site trains or
        sends (FFA-LoRA's A matrices; empty otherwise). ``run_id`` and ``config_sha256``
        go into the state saved after every round, for a resume. ``audit_keys`` (site ->
        fingerprint, the site registry) are the audit keys sites must announce."""
        super().__init__(
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        self.request_for_round = request_for_round
        self.frozen = dict(frozen)
        self.trained = self._trained_part(initial)
        """The global adapter's trained tensors: what travels each round."""
        self.schema = AdapterSchema.of(self.trained)
        self.aggregator = aggregator
        self.limits = UpdateLimits.for_run(validation, self.schema)
        self.min_sites = min_sites
        self.rollback = rollback
        self.round_timeout = round_timeout
        self.recorder = recorder
        self.checkpoints = checkpoints
        self.audit = audit
        self.known_sites: dict[int, str] = {}
        self.admission = Admission(audit_keys)
        """Registered names and audit keys; the nodes rejected for their identity."""
        self.site_details: dict[str, dict[str, str]] = {}
        """What each site said of itself when it joined (kind, task, audit key)."""
        self.introduction_timeout = min(120.0, round_timeout)
        self.introductions = Introductions(retry_after=self.introduction_timeout)
        self.publish = RoundEvents(recorder, audit)
        self.rounds_aggregated = 0
        self.adapter_round = 0
        """The round that produced the current global adapter (0: the initial one)."""
        self.best: BestAdapter | None = None
        self.adapter_evaluation: dict[str, float] | None = None
        """The latest federated evaluation of the current global adapter."""
        self.declared_examples: dict[str, float] = {}
        """Each site's num-examples in this run: one dataset, one count."""
        self.run_id = run_id
        self.config_sha256 = config_sha256
        self.rounds_before = 0
        """Rounds completed before this process started (a resumed run): Flower's loop
        counts from 1 again, the hooks add this to get the run's round."""
        self._request: RoundRequest | None = None
        self._sent_adapter: AdapterArrays = self.trained
        self._sent_to: set[int] = set()

    def _trained_part(self, arrays: AdapterArrays) -> AdapterArrays:
        """The tensors of a whole adapter that train and travel (not the frozen ones)."""
        return {name: value for name, value in arrays.items() if name not in self.frozen}

    def current_arrays(self) -> ArrayRecord:
        """The trained tensors of the current global adapter, as they travel."""
        return arrays_to_record(self.trained)

    @property
    def global_adapter(self) -> AdapterArrays:
        """The whole current global adapter (trained and frozen tensors)."""
        return {**self.trained, **self.frozen}

    # ------------------------------------------------------------------- resume ---

    def save_state(self, completed_round: int) -> None:
        """Checkpoint everything a resume needs; called once a round is over."""
        if completed_round == 0:
            self.checkpoints.save(0, self.global_adapter)
        best = self.best
        self.checkpoints.save_state(
            RunState(
                run_id=self.run_id,
                config_sha256=self.config_sha256,
                completed_round=completed_round,
                adapter_round=self.adapter_round,
                adapter_sha256=adapter_sha256(self.global_adapter),
                rounds_aggregated=self.rounds_aggregated,
                best=(
                    EvaluatedAdapter(
                        round=best.server_round, accuracy=best.accuracy, loss=best.loss
                    )
                    if best
                    else None
                ),
                best_sha256=adapter_sha256({**best.trained, **self.frozen}) if best else None,
                adapter_evaluation=(
                    EvaluatedAdapter.model_validate(self.adapter_evaluation)
                    if self.adapter_evaluation
                    else None
                ),
                declared_examples=self.declared_examples,
                recorder=self.recorder.snapshot(),
            )
        )

    def resume(self, state: RunState) -> None:
        """Carry on from ``state``: the same global adapter, bit for bit, the same best
        adapter for the rollback guard, and the run's figures so far."""
        current = self.checkpoints.load_verified(state.adapter_round, state.adapter_sha256)
        if set(current) != set(self.global_adapter):
            raise ConfigError("the checkpoint's tensors do not fit this run's adapter")
        best = None
        if state.best is not None and state.best_sha256 is not None:
            arrays = self.checkpoints.load_verified(state.best.round, state.best_sha256)
            best = BestAdapter(
                state.best.round,
                state.best.accuracy,
                state.best.loss,
                self._trained_part(arrays),
            )
        # Everything is read and checked: only now does the strategy change.
        self.trained = self._trained_part(current)
        self.best = best
        self.adapter_round = state.adapter_round
        self.rounds_aggregated = state.rounds_aggregated
        self.rounds_before = state.completed_round
        self.declared_examples = dict(state.declared_examples)
        self.adapter_evaluation = (
            state.adapter_evaluation.model_dump() if state.adapter_evaluation else None
        )
        self.recorder.restore(state.recorder, state.completed_round)

    # ----------------------------------------------------------------- training ---

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.rounds_before
        self._request = self.request_for_round(server_round)
        self._sent_adapter = self.trained
        messages = list(
            super().configure_train(
                server_round, arrays_to_record(self.trained), self._request.to_record(), grid
            )
        )
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        self.admission.learn(grid, nodes)
        messages = self._for_this_task(messages)
        self._sent_to = {m.metadata.dst_node_id for m in messages}
        self.publish(RoundStarted(server_round, "train", self._site_names(self._sent_to)))
        self._failures(server_round, "train", self.admission.held_back(nodes, self.known_sites))
        return messages

    def _serves_this_task(self, node: int) -> bool:
        """False for a node whose site said it serves another task: in a deployment every
        SuperNode of the federation is connected, whatever task its data serves. A node
        that has not said is asked anyway (it refuses if it must)."""
        details = self.site_details.get(self.known_sites.get(node, ""), {})
        return details.get("task", self.recorder.task) == self.recorder.task

    def _for_this_task(self, messages: Iterable[Message]) -> list[Message]:
        """The messages for nodes that serve this task and may take part."""
        listed = list(messages)
        barred = self.admission.barred((m.metadata.dst_node_id for m in listed), self.known_sites)
        return [
            m
            for m in listed
            if m.metadata.dst_node_id not in barred
            and self._serves_this_task(m.metadata.dst_node_id)
        ]

    def sites_of_this_task(self) -> dict[int, str]:
        """Node -> site name, for the known sites that serve this run's task."""
        return {
            node: site for node, site in self.known_sites.items() if self._serves_this_task(node)
        }

    def _site_names(self, node_ids: Iterable[int]) -> list[str]:
        return [self.known_sites.get(node, f"node-{node}") for node in node_ids]

    def introduce(
        self, grid: Grid, node_ids: Iterable[int], wait: float = 0.0
    ) -> dict[str, dict[str, str]]:
        """Ask nodes we have not heard from which site they are, so that even a site that
        refuses every round is reported by name; take the answers that came meanwhile.
        Returns the sites that joined, each with what it said of itself (kind, task,
        audit key fingerprint). A node that claims a registered name or audit key not
        its own is rejected for the run (reported at the next configure_train); one
        whose audit key is unshown, or that has not answered within the introduction
        timeout, is asked again. ``wait``: seconds to wait for the answers (0: none)."""
        nodes = list(node_ids)
        self.admission.learn(grid, nodes)
        joined = self._screen(self.introductions.collect(grid))
        asked = self.introductions.answered | self.introductions.waiting()
        self.introductions.ask(grid, self.admission.to_introduce(nodes, self.known_sites, asked))
        joined.update(self._screen(self.introductions.collect(grid, wait)))
        return joined

    def admit(self, grid: Grid, wait: float = 0.0) -> None:
        """Introductions for every connected node, and the sites that joined recorded:
        what the round loop runs before each round and before updates are accepted."""
        for site, details in self.introduce(grid, sorted(grid.get_node_ids()), wait).items():
            self.publish(SiteJoined(site, details))

    def awaiting_introductions(self, grid: Grid) -> bool:
        """Whether no connected node of this task may take a round yet while some node
        has still to say who it is (not joined, not rejected, and no refusal from it)."""
        nodes = sorted(grid.get_node_ids())
        able = {node for node in nodes if node in self.known_sites and self._serves_this_task(node)}
        able -= self.admission.barred(nodes, self.known_sites)
        silent = [
            node
            for node in nodes
            if node not in self.known_sites
            and node not in self.admission.rejected
            and node not in self.admission.unanswered
        ]
        return not able and bool(silent)

    def _screen(self, replies: list[Message]) -> dict[str, dict[str, str]]:
        joined = self.admission.screen(replies, self.known_sites)
        self.site_details.update(joined)
        return joined

    def _failures(
        self,
        server_round: int,
        phase: str,
        failures: list[FailedReply],
        receipts: Mapping[int, UpdateReceipt] | None = None,
    ) -> None:
        """Record each failure; a rejected training reply is audited as a received
        update (with its hash) when ``receipts`` are given."""
        for failure in failures:
            receipt = (receipts or {}).get(failure.node_id)
            self.publish(SiteFailed(server_round, phase, failure, receipt))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.rounds_before
        if self._request is None:
            raise RuntimeError("aggregate_train before configure_train")
        received = list(replies)
        check = partial(
            validate_update,
            reference=NormReference.of(self._sent_adapter, self.schema),
            schema=self.schema,
            request=self._request,
            limits=self.limits,
        )
        parsed, bad = parse_replies(
            received, self.known_sites, check, TrainMetrics, registered=self.admission.registered
        )
        decoded = {reply.node_id: reply.arrays for reply in parsed}
        receipts = {
            m.metadata.src_node_id: update_receipt(
                m, decoded.get(m.metadata.src_node_id), self.limits.max_payload_bytes
            )
            for m in received
        }
        bad += missing_replies(self._sent_to, received, self.known_sites, self.round_timeout)
        good: list[SiteReply] = []
        for reply in parsed:
            changed = self._changed_count(reply)
            if changed:
                bad.append(FailedReply(reply.node_id, reply.site, "rejected", changed))
            else:
                good.append(reply)
        self._failures(server_round, "train", bad, receipts)
        for reply in good:
            self.publish(
                SiteTrained(
                    server_round, reply.site, reply.metrics, reply.norm, receipts[reply.node_id]
                )
            )
        counts = {
            status: float(sum(1 for failure in bad if failure.status == status))
            for status in EXCLUSION_STATUSES
        }
        updates = [reply.arrays for reply in good if reply.arrays is not None]
        weights = [reply.metrics["num-examples"] for reply in good if reply.arrays is not None]
        if len(good) < self.min_sites:
            reason = (
                f"{len(good)} usable update(s), fewer than the minimum of {self.min_sites} "
                "sites; the previous global adapter is kept"
            )
            logger.warning("%s round %d failed: %s", self.recorder.task, server_round, reason)
            self.publish(RoundFailed(server_round, int(sum(weights)), reason))
            return None, metric_record({"sites": float(len(good)), **counts})
        # Updates arrive in the run's update precision, packed by validation; the
        # aggregate is computed and kept in (at least) float32.
        aggregate = self.aggregator(updates, weights)
        error = lora_product_error(
            [{**update, **self.frozen} for update in updates],
            weights,
            {**aggregate, **self.frozen},
        )
        self.trained = aggregate
        self.adapter_round = server_round
        self.adapter_evaluation = None
        lora_error = error if math.isfinite(error) else None
        self.checkpoints.save(server_round, self.global_adapter)
        self.rounds_aggregated += 1
        sites = [reply.site for reply in good]
        self.publish(
            Aggregated(server_round, self.global_adapter, sites, int(sum(weights)), lora_error)
        )
        metrics = {
            "examples": float(sum(weights)),
            "sites": float(len(good)),
            **({"lora-product-error": lora_error} if lora_error is not None else {}),
            **counts,
        }
        return arrays_to_record(self.trained), metric_record(metrics)

    # --------------------------------------------------------------- evaluation ---

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.rounds_before
        request = self.request_for_round(server_round).to_record()
        messages = list(
            super().configure_evaluate(server_round, arrays_to_record(self.trained), request, grid)
        )
        self.admission.learn(grid, [m.metadata.dst_node_id for m in messages])
        messages = self._for_this_task(messages)
        self._sent_to = {m.metadata.dst_node_id for m in messages}
        self.publish(RoundStarted(server_round, "evaluate", self._site_names(self._sent_to)))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The round's last hook: its evaluation, then the round's checkpointed state."""
        server_round += self.rounds_before
        outcome = self._aggregate_evaluate(server_round, replies)
        self.save_state(server_round)
        return outcome

    def _aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        received = list(replies)
        good, bad = parse_replies(
            received,
            self.known_sites,
            None,
            EvalMetrics,
            check_metrics=partial(check_evaluation, limits=self.limits),
            registered=self.admission.registered,
        )
        bad += missing_replies(self._sent_to, received, self.known_sites, self.round_timeout)
        self._failures(server_round, "evaluate", bad)
        for reply in good:
            self.publish(SiteEvaluated(server_round, reply.site, reply.metrics))
        if not good:
            return None
        weights = [reply.metrics["num-examples"] for reply in good]
        loss = weighted_mean([r.metrics["eval-loss"] for r in good], weights)
        accuracy = weighted_mean([r.metrics["eval-accuracy"] for r in good], weights)
        sites = [reply.site for reply in good]
        self.publish(Evaluated(server_round, loss, accuracy, int(sum(weights)), sites))
        self._guard(server_round, accuracy, loss)
        return metric_record({"eval-loss": loss, "eval-accuracy": accuracy})

    def _guard(self, server_round: int, accuracy: float, loss: float) -> None:
        """The rollback guard (server/rollback.py): keep the best adapter when this
        round's fell too far."""
        self.adapter_evaluation = {"round": server_round, "accuracy": accuracy, "loss": loss}
        current = BestAdapter(self.adapter_round, accuracy, loss, self.trained)
        decision = decide(self.rollback, self.best, current)
        self.best = decision.best
        restore = decision.restore
        if restore is None or decision.reason is None:
            return
        logger.warning(
            "%s round %d rolled back: %s", self.recorder.task, server_round, decision.reason
        )
        self.trained = restore.trained
        self.publish(
            RolledBack(server_round, restore.server_round, self.global_adapter, decision.reason)
        )
        self.adapter_round = restore.server_round
        self.adapter_evaluation = {
            "round": restore.server_round,
            "accuracy": restore.accuracy,
            "loss": restore.loss,
        }

    def _changed_count(self, reply: SiteReply) -> str | None:
        """A site trains on one dataset through a run: a new count is a lie or a fault."""
        examples = reply.metrics["num-examples"]
        declared = self.declared_examples.setdefault(reply.site, examples)
        if declared != examples:
            return f"num-examples changed within the run, from {declared:g} to {examples:g}"
        return None
