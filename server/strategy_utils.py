"""Pure helpers the strategy's hooks call: parse replies, weigh metrics.

No network and no Flower runtime is needed to test them: a reply is just a Message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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


def _site_of(message: Message, known: dict[int, str]) -> str:
    node_id = message.metadata.src_node_id
    config = message.content.config_records.get("site") if message.has_content() else None
    if isinstance(config, ConfigRecord) and isinstance(config.get(SITE_ID_KEY), str):
        return str(config[SITE_ID_KEY])
    return known.get(node_id, f"node-{node_id}")


def parse_replies(
    replies: Iterable[Message],
    known_sites: dict[int, str],
    schema: AdapterSchema | None,
) -> tuple[list[SiteReply], list[FailedReply]]:
    """Split replies into usable ones and failures, each failure with its reason.

    With a schema, the ``arrays`` record of each reply is checked against it; without,
    the reply is an evaluation and carries metrics only.
    """
    good: list[SiteReply] = []
    bad: list[FailedReply] = []
    for message in replies:
        node_id = message.metadata.src_node_id
        site = _site_of(message, known_sites)
        if message.has_error():
            status = "refused" if message.error.code == REFUSED_BY_POLICY else "failed"
            bad.append(
                FailedReply(node_id, site, status, message.error.reason or "no reason given")
            )
            continue
        known_sites[node_id] = site
        metric_records = [r for r in message.content.metric_records.values()]
        if len(metric_records) != 1 or "num-examples" not in metric_records[0]:
            bad.append(FailedReply(node_id, site, "rejected", "reply lacks its metrics"))
            continue
        metrics = {k: float(v) for k, v in metric_records[0].items()}  # type: ignore[arg-type]
        arrays: AdapterArrays | None = None
        if schema is not None:
            record = message.content.array_records.get("arrays")
            if record is None:
                bad.append(FailedReply(node_id, site, "rejected", "reply carries no adapter"))
                continue
            try:
                arrays = record_to_arrays(record)
                schema.check(arrays)
            except (UpdateError, ValueError) as exc:
                bad.append(FailedReply(node_id, site, "rejected", f"malformed update: {exc}"))
                continue
        good.append(SiteReply(node_id, site, metrics, arrays))
    return good, bad


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)


def metric_record(values: dict[str, float]) -> MetricRecord:
    return MetricRecord(dict(values))
