"""Reconciling the coordinator's log with one site's: pure functions over entries.

Every update the coordinator accepted from the site must be one the site logged as sent
(same run, round, hash and ε), and every update the site logged for the run must have
reached the coordinator's log. Anything else is a finding; a site update that arrived
too late, or that the coordinator rejected as sent, is a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import AuditError

EPSILON_TOLERANCE = 1e-9
ROUND_EVENTS = ("update-received", "site-excluded", "site-refused")


@dataclass
class Reconciliation:
    site: str
    run: str
    matched: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _data(entry: dict[str, Any]) -> dict[str, Any]:
    data = entry.get("data")
    return data if isinstance(data, dict) else {}


def _same_epsilon(left: object, right: object) -> bool:
    if not isinstance(left, int | float) or not isinstance(right, int | float):
        return False
    return math.isclose(float(left), float(right), rel_tol=EPSILON_TOLERANCE, abs_tol=1e-12)


def _short(digest: object) -> str:
    return f"{str(digest)[:12]}…" if isinstance(digest, str) else "(none)"


def run_of(coordinator: Sequence[dict[str, Any]]) -> str:
    for entry in coordinator:
        if entry.get("event") == "run-started":
            return str(_data(entry).get("run"))
    raise AuditError("the coordinator's log has no 'run-started' entry: which run is it?")


def site_of(site_entries: Sequence[dict[str, Any]]) -> str:
    if not site_entries:
        raise AuditError("the site's log is empty")
    return str(site_entries[0].get("actor"))


def reconcile(
    coordinator: Sequence[dict[str, Any]], site_entries: Sequence[dict[str, Any]]
) -> Reconciliation:
    run, site = run_of(coordinator), site_of(site_entries)
    result = Reconciliation(site=site, run=run)
    received: dict[int, dict[str, Any]] = {}
    excluded: dict[int, dict[str, Any]] = {}
    resumes = _resumes(coordinator)
    for position, entry in enumerate(coordinator):
        data = _data(entry)
        if data.get("site") != site or entry.get("event") not in ROUND_EVENTS:
            continue
        if _superseded(data.get("round"), resumes, position=position):
            result.notes.append(
                f"round {data['round']}: the coordinator's {entry.get('event')} before the "
                "run was interrupted; the round was run again after the resume"
            )
            continue
        if not isinstance(data.get("round"), int):
            result.problems.append(f"a coordinator entry about {site} has no round number")
            continue
        if entry.get("event") == "update-received":
            if int(data["round"]) in received:
                result.problems.append(
                    f"round {data['round']}: the coordinator recorded two updates from {site}"
                )
            received[int(data["round"])] = data
        elif entry.get("event") in ("site-excluded", "site-refused") and data.get("phase") in (
            "train",
            None,
        ):
            excluded[int(data["round"])] = data
    sent: dict[int, dict[str, Any]] = {}
    for entry in site_entries:
        data = _data(entry)
        if entry.get("event") != "training-done" or str(data.get("run")) != run:
            continue
        if not isinstance(data.get("round"), int):
            result.problems.append("a training-done entry of the site has no round number")
            continue
        if _superseded(data["round"], resumes, time=str(entry.get("time", ""))):
            result.notes.append(
                f"round {data['round']}: the site trained it (update "
                f"{_short(data.get('update_sha256'))}, ε {data.get('epsilon_after')}) before "
                "the run was interrupted; the round was run again after the resume"
            )
            continue
        if int(data["round"]) in sent:
            result.problems.append(f"round {data['round']}: the site logged two updates sent")
        # The entry's own number and hash ride along: the coordinator recorded them.
        sent[int(data["round"])] = {**data, "_seq": entry.get("seq"), "_hash": entry.get("hash")}
    for server_round in sorted(set(received) | set(sent)):
        _reconcile_round(
            result,
            server_round,
            received.get(server_round),
            sent.get(server_round),
            excluded.get(server_round),
        )
    if not received and not sent:
        result.notes.append(f"site {site} sent no update in run {run}")
    return result


def _resumes(coordinator: Sequence[dict[str, Any]]) -> list[tuple[int, str, int]]:
    """(position, time, from_round) of each resume in the coordinator's log."""
    return [
        (position, str(entry.get("time", "")), int(_data(entry)["from_round"]))
        for position, entry in enumerate(coordinator)
        if entry.get("event") == "run-resumed" and isinstance(_data(entry).get("from_round"), int)
    ]


def _superseded(
    server_round: object,
    resumes: list[tuple[int, str, int]],
    *,
    position: int | None = None,
    time: str | None = None,
) -> bool:
    """Whether an entry about ``server_round`` came before a resume that ran the round
    again (placed by its position in the coordinator's log, or by its time)."""
    if not isinstance(server_round, int):
        return False
    return any(
        server_round > from_round and (position < at if position is not None else str(time) < when)
        for at, when, from_round in resumes
    )


def _reconcile_round(
    result: Reconciliation,
    server_round: int,
    got: dict[str, Any] | None,
    logged: dict[str, Any] | None,
    exclusion: dict[str, Any] | None,
) -> None:
    where = f"round {server_round}"
    if got is None:
        assert logged is not None
        if exclusion is not None:
            result.notes.append(
                f"{where}: the site sent update {_short(logged.get('update_sha256'))}, the "
                f"coordinator recorded {exclusion.get('status')} ({exclusion.get('reason')})"
            )
        else:
            result.problems.append(
                f"{where}: the site logged update {_short(logged.get('update_sha256'))} "
                f"(ε {logged.get('epsilon_after')}) that the coordinator's log never mentions"
            )
        return
    accepted = got.get("status") == "accepted"
    if logged is None:
        if accepted:
            result.problems.append(
                f"{where}: the coordinator accepted update {_short(got.get('update_sha256'))} "
                "that the site never logged sending"
            )
        else:
            result.notes.append(f"{where}: a rejected update the site never logged sending")
        return
    recorded = got.get("site_log_seq"), got.get("site_log_hash")
    if recorded[0] is not None and recorded != (logged["_seq"], logged["_hash"]):
        result.problems.append(
            f"{where}: the coordinator recorded the update as entry {recorded[0]} of the "
            f"site's log ({_short(recorded[1])}), but the site's log has it as entry "
            f"{logged['_seq']} ({_short(logged['_hash'])}): the site's log was rewritten"
        )
    same_hash = got.get("update_sha256") == logged.get("update_sha256")
    same_epsilon = _same_epsilon(got.get("epsilon"), logged.get("epsilon_after"))
    if same_hash and same_epsilon:
        result.matched += 1
        if not accepted:
            result.notes.append(f"{where}: rejected as the site sent it ({got.get('reason')})")
        return
    differences = []
    if not same_hash:
        differences.append(
            f"hash {_short(logged.get('update_sha256'))} at the site, "
            f"{_short(got.get('update_sha256'))} at the coordinator"
        )
    if not same_epsilon:
        differences.append(
            f"ε {logged.get('epsilon_after')} at the site, {got.get('epsilon')} at the coordinator"
        )
    message = f"{where}: " + "; ".join(differences)
    if accepted:
        result.problems.append(message + " (the coordinator aggregated it)")
    else:
        result.notes.append(message + f" (rejected: {got.get('reason')})")
