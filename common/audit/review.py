"""Finding, verifying and tabulating the logs of a run directory.

A run directory keeps its audit trail under ``audit/``: one coordinator log per task
(``coordinator-<task>.jsonl``) and, in a simulation, a copy of each site's log
(``sites/<site>.jsonl``), each with its signed head beside it. The coordinator's public
key is in ``keys/coordinator.pub``; each site's key fingerprint is vouched for by the
coordinator's log (the ``site-joined`` entries), so pinning the coordinator's key pins
them all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.audit.chain import Verification, verify_lines
from common.audit.log import parse_entries, read_entries, read_log
from common.errors import AuditError
from common.signing import load_public_key

AUDIT_DIR = "audit"
SITE_LOGS_DIR = "sites"
COORDINATOR_PUBLIC_KEY = Path("keys") / "coordinator.pub"
COORDINATOR_PRIVATE_KEY = Path("keys") / "coordinator.key"
"""Where a run without a configured key (a simulation) keeps the one it makes."""
LOG_SUFFIX = ".jsonl"


def coordinator_log_name(task: str) -> str:
    return f"coordinator-{task}{LOG_SUFFIX}"


@dataclass(frozen=True)
class RunLogs:
    coordinator: list[Path]
    sites: list[Path]

    @property
    def all(self) -> list[Path]:
        return [*self.coordinator, *self.sites]


def find_logs(path: Path) -> RunLogs:
    """The logs at ``path``: one log file, or every log of a run directory."""
    if path.is_file():
        return RunLogs([path], [])
    audit = path / AUDIT_DIR
    if not audit.is_dir():
        raise AuditError(f"{path} is neither an audit log nor a run directory with audit/")
    coordinator = sorted(audit.glob(f"coordinator-*{LOG_SUFFIX}"))
    sites = sorted((audit / SITE_LOGS_DIR).glob(f"*{LOG_SUFFIX}"))
    if not coordinator and not sites:
        raise AuditError(f"{audit} holds no audit logs")
    return RunLogs(coordinator, sites)


@dataclass(frozen=True)
class LogReport:
    path: Path
    verification: Verification
    key_source: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    """The log's entries as read for verifying it (so reviews need not read it again)."""


def site_keys(coordinator_entries: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Site -> the audit key fingerprint it announced when it joined the run."""
    keys: dict[str, str] = {}
    for entry in coordinator_entries:
        data = entry.get("data") or {}
        if entry.get("event") == "site-joined" and "audit-key" in data:
            keys[str(data["site"])] = str(data["audit-key"])
    return keys


def site_anchors(coordinator_entries: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, str]]]:
    """Site -> the (entry number, hash) of its own log that it sent with each update and
    the coordinator recorded: points its log must still contain, whatever its head says."""
    anchors: dict[str, list[tuple[int, str]]] = {}
    for entry in coordinator_entries:
        data = entry.get("data") or {}
        seq, digest = data.get("site_log_seq"), data.get("site_log_hash")
        if entry.get("event") == "update-received" and isinstance(seq, int):
            anchors.setdefault(str(data.get("site")), []).append((seq, str(digest)))
    return anchors


def check_anchors(
    verification: Verification, entries: list[dict[str, Any]], anchors: list[tuple[int, str]]
) -> None:
    by_seq = {entry.get("seq"): entry for entry in entries}
    for seq, digest in anchors:
        found = by_seq.get(seq)
        if found is None or found.get("hash") != digest:
            what = "no longer has it" if found is None else "has another entry there"
            verification.add(
                0,
                f"the coordinator recorded entry {seq} of this log (hash {digest[:12]}…) "
                f"with an update, and the log {what}: it was cut back or rewritten",
            )


def _verified(log: Path, key: Ed25519PublicKey | None) -> tuple[Verification, list[dict[str, Any]]]:
    """The verdict on a log and its entries, from one read of it."""
    lines, head = read_log(log)
    return verify_lines(lines, key, head), parse_entries(lines)


def verify_path(path: Path, key: Ed25519PublicKey | None = None) -> list[LogReport]:
    """Verify one log, or every log of a run directory.

    For a run directory, ``key`` (else ``keys/coordinator.pub``) checks the coordinator's
    logs, and each site log must be signed by the key the coordinator recorded for it.
    """
    logs = find_logs(path)
    if path.is_file():
        source = "pinned with --key" if key else "taken from the log itself (pass --key to pin)"
        verification, entries = _verified(path, key)
        return [LogReport(path, verification, source, entries)]
    source = "pinned with --key"
    if key is None and (path / COORDINATOR_PUBLIC_KEY).is_file():
        key = load_public_key(path / COORDINATOR_PUBLIC_KEY)
        source = f"{COORDINATOR_PUBLIC_KEY} of the run directory (pass --key to pin)"
    elif key is None:
        source = "taken from the log itself (pass --key to pin)"
    reports = []
    vouched: dict[str, str] = {}
    anchors: dict[str, list[tuple[int, str]]] = {}
    for log in logs.coordinator:
        verification, entries = _verified(log, key)
        reports.append(LogReport(log, verification, source, entries))
        if verification.ok:
            vouched.update(site_keys(entries))
            for site, points in site_anchors(entries).items():
                anchors.setdefault(site, []).extend(points)
    for log in logs.sites:
        verification, entries = _verified(log, None)
        expected = vouched.get(verification.actor or "")
        if expected is None:
            site_source = "taken from the log itself: no verified coordinator log names it"
            verification.add(
                0,
                f"no intact coordinator log in this run directory records site "
                f"{verification.actor}'s key, so nothing vouches for who signed this log",
            )
        else:
            site_source = "the key the coordinator recorded when the site joined"
            if verification.key != expected:
                verification.add(
                    1,
                    f"signed with key {verification.key}, but the coordinator recorded "
                    f"{expected} for site {verification.actor}: the log was re-signed",
                )
        check_anchors(verification, entries, anchors.get(verification.actor or "", []))
        reports.append(LogReport(log, verification, site_source, entries))
    return reports


# ----------------------------------------------------------------------- show ---

SHOW_COLUMNS = (
    "log",
    "seq",
    "time",
    "event",
    "round",
    "site",
    "status",
    "epsilon",
    "hash",
    "detail",
)
HASH_FIELDS = ("update_sha256", "adapter_sha256", "final_adapter_sha256", "config_sha256")
STATUS_FIELDS = ("status", "decision", "phase")


def _status(data: dict[str, Any]) -> str:
    for name in STATUS_FIELDS:
        if data.get(name):
            return str(data[name])
    return ""


def real_number(value: object) -> float | None:
    """A finite float from a log value, or None (not a number, or too large for one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _epsilon(data: dict[str, Any]) -> str:
    for name in ("epsilon", "epsilon_after", "epsilon_target"):
        value = real_number(data.get(name))
        if value is not None:
            return f"{value:.4f}"
    return ""


def _number(value: object) -> str:
    """Three decimals, or 'n/a' for what was not finite when it was logged (now null)."""
    number = real_number(value)
    return "n/a" if number is None else f"{number:.3f}"


def _names(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _detail(event: str, data: dict[str, Any]) -> str:
    if data.get("reason"):
        return str(data["reason"])
    if event in ("evaluation", "evaluation-done"):
        return f"accuracy {_number(data.get('accuracy'))}, loss {_number(data.get('loss'))}"
    if event == "run-started":
        return (
            f"task {data.get('task')}, {data.get('planned_rounds')} rounds, "
            f"{len(_names(data.get('sites')))} sites"
        )
    if event == "aggregation-done":
        return f"{len(_names(data.get('sites')))} sites, {data.get('examples')} examples"
    if event == "data-summary":
        return f"{data.get('records')} records, {data.get('people')} people"
    if event == "round-started":
        return ", ".join(_names(data.get("sites")))
    return ""


def entry_row(entry: dict[str, Any]) -> dict[str, str]:
    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    assert isinstance(data, dict)
    event = str(entry.get("event", ""))
    digest = next((str(data[name]) for name in HASH_FIELDS if data.get(name)), "")
    site = data.get("site")
    if (
        site is None
        and event not in ("run-started", "round-started")
        and (entry.get("actor") != "coordinator")
    ):
        site = entry.get("actor")
    return {
        "log": str(entry.get("actor", "")),
        "seq": str(entry.get("seq", "")),
        "time": str(entry.get("time", "")),
        "event": event,
        "round": "" if data.get("round") is None else str(data["round"]),
        "site": "" if site is None else str(site),
        "status": _status(data),
        "epsilon": _epsilon(data),
        "hash": digest,
        "detail": _detail(event, data),
    }


def select(
    entries: Sequence[dict[str, Any]],
    *,
    sites: Sequence[str] = (),
    rounds: Sequence[int] = (),
    events: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Entries matching every given filter (each filter: any of its values)."""
    chosen = []
    for entry in entries:
        row = entry_row(entry)
        if sites and row["site"] not in sites and row["log"] not in sites:
            continue
        if rounds and row["round"] not in {str(r) for r in rounds}:
            continue
        if events and row["event"] not in events:
            continue
        chosen.append(entry)
    return chosen


def entries_of(logs: Iterable[Path]) -> list[dict[str, Any]]:
    """Entries of several logs, in time order (ties: by log, then sequence)."""
    return in_time_order(read_entries(log) for log in logs)


def in_time_order(logs: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return sorted((entry for entries in logs for entry in entries), key=_time_order)


def _time_order(entry: dict[str, Any]) -> tuple[str, str, int]:
    seq = entry.get("seq")
    return str(entry.get("time")), str(entry.get("actor")), seq if isinstance(seq, int) else -1
