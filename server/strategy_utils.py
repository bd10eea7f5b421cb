"""Pure helpers the strategy's hooks call: parse replies, weigh metrics.

No network and no Flower runtime is needed to test them: a reply is just a Message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord

from common.adapters import AdapterArrays, AdapterSchema, record_to_arrays
from common.errors import UpdateError
from common.protocol import REFUSED_BY_POLICY, SITE_ID_KEY


@dataclass(frozen=True)
class SiteReply:
    node_id: int
    site: str
    metrics: dict[str, float]
    arrays: AdapterArrays | None


@dataclass(frozen=True)
class FailedReply:
    node_id: int
    site: str
    status: str
    """'refused' (the site's policy said no), 'rejected' (bad update) or 'failed'."""
    reason: str


def _claimed_site(message: Message) -> str | None:
    if not message.has_content():
        return None
    config = message.content.config_records.get("site")
    if isinstance(config, ConfigRecord) and isinstance(config.get(SITE_ID_KEY), str):
        return str(config[SITE_ID_KEY])
    return None


def _bind_site(node_id: int, claimed: str | None, known: dict[int, str]) -> tuple[str, str | None]:
    """The site name for a node, and a reason to reject if the claim contradicts the past.

    A node keeps the first name it gave; no two nodes may use the same name.
    """
    previous = known.get(node_id)
    if claimed is None:
        return previous or f"node-{node_id}", None
    if previous is not None and previous != claimed:
        return previous, f"node of site {previous} now claims to be {claimed}"
    if previous is None and claimed in known.values():
        return f"node-{node_id}", f"site name {claimed} is already used by another node"
    known[node_id] = claimed
    return claimed, None


def remember_site(message: Message, known: dict[int, str]) -> str | None:
    """Bind the name a node gives in an introduction; returns a reason if it contradicts."""
    return _bind_site(message.metadata.src_node_id, _claimed_site(message), known)[1]


def _metrics_of(message: Message, required: tuple[str, ...]) -> dict[str, float] | str:
    """The reply's metrics as finite floats, or the reason they cannot be used."""
    records = list(message.content.metric_records.values())
    if len(records) != 1:
        return f"expected one metric record, got {len(records)}"
    metrics: dict[str, float] = {}
    for key, value in records[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {key!r} is not a number"
        if not math.isfinite(value):
            return f"metric {key!r} is not finite"
        metrics[key] = float(value)
    missing = [key for key in required if key not in metrics]
    if missing:
        return f"reply lacks metric(s) {', '.join(missing)}"
    if metrics["num-examples"] <= 0 or not metrics["num-examples"].is_integer():
        return "num-examples must be a positive whole number"
    return metrics


def _adapter_of(message: Message, schema: AdapterSchema) -> AdapterArrays | str:
    record = message.content.array_records.get("arrays")
    if record is None:
        return "reply carries no adapter"
    try:
        arrays = record_to_arrays(record)
        schema.check(arrays)
    except (UpdateError, ValueError) as exc:
        return f"malformed update: {exc}"
    not_finite = [name for name, value in arrays.items() if not np.isfinite(value).all()]
    if not_finite:
        return f"malformed update: non-finite values in {', '.join(not_finite[:3])}"
    return arrays


def parse_replies(
    replies: Iterable[Message],
    known_sites: dict[int, str],
    schema: AdapterSchema | None,
    required_metrics: tuple[str, ...] = ("num-examples",),
) -> tuple[list[SiteReply], list[FailedReply]]:
    """Split replies into usable ones and failures, each failure with its reason.

    With a schema, the ``arrays`` record of each reply is checked against it (and for
    finite values); without, the reply is an evaluation and carries metrics only.
    """
    good: list[SiteReply] = []
    bad: list[FailedReply] = []
    for message in replies:
        node_id = message.metadata.src_node_id
        site, identity_problem = _bind_site(node_id, _claimed_site(message), known_sites)
        if message.has_error():
            status = "refused" if message.error.code == REFUSED_BY_POLICY else "failed"
            reason = message.error.reason or "no reason given"
            bad.append(FailedReply(node_id, site, status, reason))
            continue
        if identity_problem:
            bad.append(FailedReply(node_id, site, "rejected", identity_problem))
            continue
        metrics = _metrics_of(message, required_metrics)
        if isinstance(metrics, str):
            bad.append(FailedReply(node_id, site, "rejected", metrics))
            continue
        arrays: AdapterArrays | None = None
        if schema is not None:
            adapter = _adapter_of(message, schema)
            if isinstance(adapter, str):
                bad.append(FailedReply(node_id, site, "rejected", adapter))
                continue
            arrays = adapter
        good.append(SiteReply(node_id, site, metrics, arrays))
    return good, bad


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)


def metric_record(values: dict[str, float]) -> MetricRecord:
    return MetricRecord(dict(values))
