"""Pure helpers the strategy's hooks call: parse replies, weigh metrics.

No network and no Flower runtime is needed to test them: a reply is just a Message.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from common.adapters import AdapterArrays, adapter_sha256, record_to_arrays
from common.errors import UpdateError
from common.identifiers import is_site_id
from common.protocol import (
    ARTIFACT_REFUSED,
    AUDIT_HEAD_HASH,
    AUDIT_HEAD_SEQ,
    CLIENT_CODE_REFUSED,
    REFUSED_BY_POLICY,
    SITE_ID_KEY,
)
from common.replies import CountMetrics, ReplyMetrics
from server.validation import record_payload_bytes

logger = logging.getLogger(__name__)

EXCLUSION_STATUSES = ("refused", "rejected", "failed", "timed-out")
"""Why a site did not contribute to a phase of a round (see FailedReply.status)."""


@dataclass(frozen=True)
class SiteReply:
    node_id: int
    site: str
    metrics: dict[str, float]
    arrays: AdapterArrays | None
    norm: float | None = None
    """L2 norm of the update (its adapter minus the global one sent to it)."""


@dataclass(frozen=True)
class FailedReply:
    node_id: int
    site: str
    status: str
    """'refused' (the site's policy said no), 'rejected' (bad update), 'failed' (an error
    reply) or 'timed-out' (no reply in time)."""
    reason: str


@dataclass(frozen=True)
class UpdateReceipt:
    """What a training reply carried, as the audit trail records it."""

    sha256: str | None
    """The update's hash (as the site computes it), ``raw:``-prefixed when the arrays do
    not decode, None when the reply carried none."""
    examples: float | None
    epsilon: float | None
    site_log: tuple[int, str] | None = None
    """(number, hash) of the site's audit-log entry for this update, as the site sent it."""


def _site_log_head(message: Message) -> tuple[int, str] | None:
    identity = message.content.config_records.get("site")
    if not isinstance(identity, ConfigRecord):
        return None
    seq, digest = identity.get(AUDIT_HEAD_SEQ), identity.get(AUDIT_HEAD_HASH)
    if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(digest, str):
        return seq, digest[:64]
    return None


def update_receipt(
    message: Message,
    arrays: AdapterArrays | None = None,
    max_payload_bytes: int | None = None,
) -> UpdateReceipt:
    """Hash and reported numbers of a reply, whatever validation says of it.

    ``arrays`` are the reply's arrays when validation already decoded them (not decoded
    twice). A payload over ``max_payload_bytes`` is never decoded at all: its bytes are
    hashed as they came (``raw:``), as are arrays that do not decode.
    """
    if message.has_error() or not message.has_content():
        return UpdateReceipt(None, None, None)
    record = message.content.array_records.get("arrays")
    digest: str | None = None
    if arrays is not None:
        digest = adapter_sha256(arrays)
    elif record is not None:
        oversized = max_payload_bytes is not None and (
            record_payload_bytes(record) > max_payload_bytes
        )
        try:
            digest = None if oversized else adapter_sha256(record_to_arrays(record))
        except Exception:
            digest = None
        if digest is None:
            raw = hashlib.sha256()
            for name, array in record.items():
                raw.update(name.encode())
                raw.update(bytes(array.data))
            digest = "raw:" + raw.hexdigest()
    reported: dict[str, float] = {}
    for metrics in message.content.metric_records.values():
        for key in ("num-examples", "epsilon"):
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                reported[key] = float(value)
    return UpdateReceipt(
        digest, reported.get("num-examples"), reported.get("epsilon"), _site_log_head(message)
    )


def claimed_site(message: Message) -> str | None:
    """The site name a reply claims, if it is a site id."""
    if not message.has_content():
        return None
    config = message.content.config_records.get("site")
    if isinstance(config, ConfigRecord) and isinstance(config.get(SITE_ID_KEY), str):
        claimed = str(config[SITE_ID_KEY])
        return claimed if is_site_id(claimed) else None
    return None


def bind_site(
    node_id: int,
    claimed: str | None,
    known: dict[int, str],
    registered: Mapping[int, str] | None = None,
) -> tuple[str, str | None]:
    """The site name for a node, and a reason to reject if the claim contradicts the past.

    With ``registered`` names (node -> the name Flower has its key registered under: a
    deployment), a node's name is its registered one. Without (a simulation), a node
    keeps the first name it gave, and no two nodes may use the same name.
    """
    if registered:
        return _bind_registered_site(node_id, claimed, known, registered)
    previous = known.get(node_id)
    if claimed is None:
        return previous or f"node-{node_id}", None
    if previous is not None and previous != claimed:
        return previous, f"node of site {previous} now claims to be {claimed}"
    if previous is None and claimed in known.values():
        return f"node-{node_id}", f"site name {claimed} is already used by another node"
    known[node_id] = claimed
    return claimed, None


def _bind_registered_site(
    node_id: int, claimed: str | None, known: dict[int, str], registered: Mapping[int, str]
) -> tuple[str, str | None]:
    """A node may claim only the name its key is registered under, and a node registered
    under no name is no site. The registered owner of a name takes it even from a node
    that claimed it first (not possible once the registry is known, but a name is never
    left with a node not registered under it); of two nodes registered under one name,
    the first to claim it keeps it."""
    own = registered.get(node_id)
    if own is None:
        unnamed = f"node {node_id} has no registered site name"
        if claimed is None:
            return f"node-{node_id}", unnamed
        holder = (
            f"{claimed} is registered to another node"
            if claimed in registered.values()
            else f"no node is registered as {claimed}"
        )
        return f"node-{node_id}", f"{unnamed} and {holder}"
    if claimed is None:
        return own, None
    if claimed != own:
        return own, f"node registered as {own} claims to be {claimed}"
    for other, site in list(known.items()):
        if other != node_id and site == own:
            if registered.get(other) == own:
                return f"node-{node_id}", f"site name {own} is already used by another node"
            del known[other]
    known[node_id] = own
    return own, None


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
MAX_REASON_CHARS = 300


def readable_reason(reason: str | None) -> str:
    """One line of an error reply's reason, fit for a CSV cell and a log line.

    Flower reports an exception in a ClientApp as its whole (remote) traceback; the
    message the exception carried is what a reader needs.
    """
    if not reason:
        return "no reason given"
    text = _ANSI_ESCAPE.sub("", reason)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1].removesuffix("'>")
    text = " ".join(text.split())
    if not text:
        return "no reason given"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _metrics_of(message: Message, schema: type[ReplyMetrics]) -> dict[str, float] | str:
    """The reply's metrics as ``schema`` reads them (common/replies.py), or the reason
    they cannot be used."""
    records = list(message.content.metric_records.values())
    if len(records) != 1:
        return f"expected one metric record, got {len(records)}"
    values = dict(records[0])
    try:
        checked = schema.from_values(values).as_dict()
    except UpdateError as exc:
        return str(exc)
    # Numbers beyond the schema's pass through (as floats); none is used unchecked.
    return {**{key: float(value) for key, value in values.items()}, **checked}  # type: ignore[arg-type]


UpdateCheck = Callable[[ArrayRecord | None, dict[str, float]], tuple[AdapterArrays, float]]
"""Validates a training reply's adapter against its metrics: (arrays, update norm), or
UpdateError naming the failed check (see server/validation.py)."""


def parse_replies(
    replies: Iterable[Message],
    known_sites: dict[int, str],
    check_update: UpdateCheck | None,
    schema: type[ReplyMetrics] = CountMetrics,
    check_metrics: Callable[[dict[str, float]], None] | None = None,
    registered: Mapping[int, str] | None = None,
) -> tuple[list[SiteReply], list[FailedReply]]:
    """Split replies into usable ones and failures, each failure with its reason.

    With ``check_update``, each reply's ``arrays`` record must pass it; without, the
    reply is an evaluation and carries metrics only. ``check_metrics`` raises
    UpdateError for numbers no honest site reports. ``registered`` (node -> the name its
    key is registered under; empty in a simulation) decides which name a node may use.
    A reply is data from another party: nothing in it may stop the round, so a check
    that breaks rejects that reply only.
    """
    good: list[SiteReply] = []
    bad: list[FailedReply] = []
    for message in replies:
        node_id = message.metadata.src_node_id
        site, identity_problem = bind_site(node_id, claimed_site(message), known_sites, registered)
        if message.has_error():
            refused = message.error.code in (
                REFUSED_BY_POLICY,
                ARTIFACT_REFUSED,
                CLIENT_CODE_REFUSED,
            )
            status = "refused" if refused else "failed"
            reason = readable_reason(message.error.reason)
            bad.append(FailedReply(node_id, site, status, reason))
            continue
        if identity_problem:
            bad.append(FailedReply(node_id, site, "rejected", identity_problem))
            continue
        metrics = _metrics_of(message, schema)
        if isinstance(metrics, str):
            bad.append(FailedReply(node_id, site, "rejected", metrics))
            continue
        arrays: AdapterArrays | None = None
        norm: float | None = None
        try:
            if check_metrics is not None:
                check_metrics(metrics)
            if check_update is not None:
                arrays, norm = check_update(message.content.array_records.get("arrays"), metrics)
        except UpdateError as exc:
            prefix = "malformed update" if check_update is not None else "implausible metrics"
            bad.append(FailedReply(node_id, site, "rejected", f"{prefix}: {exc}"))
            continue
        except Exception as exc:
            logger.exception("checking a reply of %s failed", site)
            reason = f"the reply could not be checked ({type(exc).__name__})"
            bad.append(FailedReply(node_id, site, "rejected", reason))
            continue
        good.append(SiteReply(node_id, site, metrics, arrays, norm))
    return good, bad


def missing_replies(
    sent: Iterable[int], replies: Sequence[Message], known_sites: dict[int, str], timeout: float
) -> list[FailedReply]:
    """Nodes that were sent a message and did not answer within the round's timeout."""
    answered = {message.metadata.src_node_id for message in replies}
    return [
        FailedReply(
            node,
            known_sites.get(node, f"node-{node}"),
            "timed-out",
            f"no reply within {timeout:g} s",
        )
        for node in sorted(set(sent) - answered)
    ]


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    # Each weight as a share first: a large value times a large weight cannot overflow.
    return float(sum(v * (w / total) for v, w in zip(values, weights, strict=True)))


def metric_record(values: dict[str, float]) -> MetricRecord:
    return MetricRecord(dict(values))


def rollback_reason(
    accuracy: float, best_accuracy: float | None, best_round: int | None, max_drop: float
) -> str | None:
    """Why the round's adapter must give way to the best one so far, or None to keep it."""
    if best_accuracy is None or best_round is None:
        return None
    if accuracy < best_accuracy - max_drop:
        return (
            f"federated accuracy {accuracy:.3f} is more than {max_drop:.3f} below the best "
            f"so far ({best_accuracy:.3f}, round {best_round}); the round {best_round} "
            "adapter is kept"
        )
    return None
