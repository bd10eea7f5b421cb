"""A round's events, each stated once and heard by both the run's metrics recorder
(metrics.csv and the run summary) and its signed audit log.

The strategy publishes what happened (a site trained, failed, was excluded; the round
aggregated, failed, was evaluated, rolled back); ``RoundEvents`` hands each event to
the two consumers. Neither consumer can be forgotten for one kind of event, and a
new consumer (a metrics endpoint) is one more function here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.adapters import AdapterArrays
from server.audit import CoordinatorAudit
from server.reporting import RunRecorder
from server.strategy_utils import FailedReply, UpdateReceipt


@dataclass(frozen=True)
class RoundStarted:
    server_round: int
    phase: str
    sites: list[str]


@dataclass(frozen=True)
class SiteJoined:
    site: str
    details: dict[str, str]


@dataclass(frozen=True)
class SiteTrained:
    server_round: int
    site: str
    metrics: dict[str, float]
    norm: float | None
    receipt: UpdateReceipt


@dataclass(frozen=True)
class SiteFailed:
    """A site that refused, failed, stayed silent or whose reply was rejected; a rejected
    training reply carries the receipt of what it sent."""

    server_round: int
    phase: str
    failure: FailedReply
    receipt: UpdateReceipt | None = None


@dataclass(frozen=True)
class RoundFailed:
    server_round: int
    examples: int
    reason: str


@dataclass(frozen=True)
class Aggregated:
    server_round: int
    adapter: AdapterArrays
    sites: list[str]
    examples: int
    lora_error: float | None


@dataclass(frozen=True)
class SiteEvaluated:
    server_round: int
    site: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class Evaluated:
    server_round: int
    loss: float
    accuracy: float
    examples: int
    sites: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RolledBack:
    server_round: int
    to_round: int
    adapter: AdapterArrays
    reason: str


RoundEvent = (
    RoundStarted
    | SiteJoined
    | SiteTrained
    | SiteFailed
    | RoundFailed
    | Aggregated
    | SiteEvaluated
    | Evaluated
    | RolledBack
)


def to_metrics(recorder: RunRecorder, event: RoundEvent) -> None:
    """What the run's metrics record of an event (introductions and round starts:
    nothing)."""
    match event:
        case SiteTrained(server_round, site, metrics, norm, _):
            recorder.site_trained(server_round, site, metrics, norm)
        case SiteFailed(server_round, phase, failure, _):
            recorder.site_failed(server_round, failure.site, phase, failure.status, failure.reason)
        case RoundFailed(server_round, examples, reason):
            recorder.round_trained(server_round, examples, None, reason)
        case Aggregated(server_round, _, _, examples, lora_error):
            recorder.round_trained(server_round, examples, lora_error, None)
        case SiteEvaluated(server_round, site, metrics):
            recorder.site_evaluated(server_round, site, metrics)
        case Evaluated(server_round, loss, accuracy, examples, _):
            recorder.round_evaluated(server_round, loss, accuracy, examples)
        case RolledBack(server_round, to_round, _, reason):
            recorder.rolled_back(server_round, to_round, reason)


def to_audit(audit: CoordinatorAudit, event: RoundEvent) -> None:
    """What the run's audit log records of an event (per-site evaluations: nothing, the
    federated figure is what the log vouches for)."""
    match event:
        case RoundStarted(server_round, phase, sites):
            audit.round_started(server_round, phase, sites)
        case SiteJoined(site, details):
            audit.site_joined(site, details)
        case SiteTrained(server_round, site, _, norm, receipt):
            audit.update_received(server_round, site, receipt, accepted=True, norm=norm)
        case SiteFailed(server_round, phase, failure, receipt):
            if failure.status == "rejected" and receipt is not None:
                audit.update_received(
                    server_round, failure.site, receipt, accepted=False, reason=failure.reason
                )
            else:
                audit.site_excluded(
                    server_round, failure.site, phase, failure.status, failure.reason
                )
        case RoundFailed(server_round, _, reason):
            audit.round_failed(server_round, reason)
        case Aggregated(server_round, adapter, sites, examples, lora_error):
            audit.aggregated(server_round, adapter, sites, examples, lora_error)
        case Evaluated(server_round, loss, accuracy, examples, sites):
            audit.evaluated(server_round, accuracy, loss, examples, sites)
        case RolledBack(server_round, to_round, adapter, reason):
            audit.rolled_back(server_round, to_round, adapter, reason)


class RoundEvents:
    """Publishes each event to the recorder, then to the audit log."""

    def __init__(self, recorder: RunRecorder, audit: CoordinatorAudit) -> None:
        self.recorder = recorder
        self.audit = audit

    def __call__(self, event: RoundEvent) -> None:
        to_metrics(self.recorder, event)
        to_audit(self.audit, event)

    def publish(self, events: list[Any]) -> None:
        for event in events:
            self(event)
