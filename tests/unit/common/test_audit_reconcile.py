"""Reconciling the coordinator's log with a site's: pure tests over the entries of a
realistic audited run (tests/audit_runs.py), altered in memory."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from common.audit.log import read_entries
from common.audit.reconcile import reconcile, run_of
from common.errors import AuditError
from tests.audit_runs import RUN, reseal_all, write_audited_run

Entries = list[dict[str, Any]]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Entries]:
    """The run's entries by log: 'coordinator', 'bank-a', 'bank-b' (never mutate: copy)."""
    run = write_audited_run(tmp_path_factory.mktemp("reconcile") / "run")
    found = {"coordinator": read_entries(run.coordinator_log)}
    for site, path in run.site_logs.items():
        found[site] = read_entries(path)
    return found


@pytest.fixture
def coordinator(logs: dict[str, Entries]) -> Entries:
    return copy.deepcopy(logs["coordinator"])


@pytest.fixture
def bank_a(logs: dict[str, Entries]) -> Entries:
    return copy.deepcopy(logs["bank-a"])


@pytest.fixture
def bank_b(logs: dict[str, Entries]) -> Entries:
    return copy.deepcopy(logs["bank-b"])


def _one(entries: Entries, event: str, server_round: int, site: str | None = None) -> dict:
    """The single entry of this event and round (and site, for the coordinator's log)."""
    found = [
        entry
        for entry in entries
        if entry["event"] == event
        and entry["data"].get("round") == server_round
        and (site is None or entry["data"].get("site") == site)
    ]
    assert len(found) == 1, (event, server_round, site, found)
    return found[0]


def _flip(digest: str) -> str:
    return ("0" if digest[0] != "0" else "1") + digest[1:]


# ------------------------------------------------------------------- honest run ---


def test_the_honest_run_reconciles_for_both_sites(
    coordinator: Entries, bank_a: Entries, bank_b: Entries
) -> None:
    a = reconcile(coordinator, bank_a)
    assert (a.site, a.run) == ("bank-a", RUN)
    assert a.ok
    assert a.problems == []
    assert a.matched == 3
    assert a.notes == []

    b = reconcile(coordinator, bank_b)
    assert (b.site, b.run) == ("bank-b", RUN)
    assert b.ok
    assert b.problems == []
    # round 1 accepted, round 2 rejected as sent (matched, with a note); round 3 refused
    assert b.matched == 2
    assert len(b.notes) == 1
    assert b.notes[0].startswith("round 2: rejected as the site sent it")
    assert "update norm 612 exceeds the bound 44" in b.notes[0]


def test_run_of_names_the_coordinator_run(coordinator: Entries) -> None:
    assert run_of(coordinator) == RUN


# ------------------------------------------------------------------ mismatches ---


def test_a_changed_update_hash_at_the_site_fails_naming_the_round(
    coordinator: Entries, bank_a: Entries
) -> None:
    done = _one(bank_a, "training-done", 2)
    original = done["data"]["update_sha256"]
    done["data"]["update_sha256"] = _flip(original)

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert result.matched == 2
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert problem.startswith("round 2:")
    assert "hash" in problem
    assert "the coordinator aggregated it" in problem
    assert _flip(original)[:12] in problem
    assert original[:12] in problem


def test_a_changed_update_hash_at_the_coordinator_fails(
    coordinator: Entries, bank_b: Entries
) -> None:
    received = _one(coordinator, "update-received", 1, "bank-b")
    assert received["data"]["status"] == "accepted"
    received["data"]["update_sha256"] = _flip(received["data"]["update_sha256"])

    result = reconcile(coordinator, bank_b)

    assert not result.ok
    assert [p.split(":")[0] for p in result.problems] == ["round 1"]


def test_a_changed_epsilon_at_the_site_fails(coordinator: Entries, bank_a: Entries) -> None:
    _one(bank_a, "training-done", 3)["data"]["epsilon_after"] = 3.5

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith("round 3:")
    assert "ε 3.5 at the site, 3.75 at the coordinator" in result.problems[0]
    assert "hash" not in result.problems[0]


def test_a_changed_epsilon_at_the_coordinator_fails(coordinator: Entries, bank_a: Entries) -> None:
    _one(coordinator, "update-received", 1, "bank-a")["data"]["epsilon"] = 0.5

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith("round 1:")
    assert "ε 1.25 at the site, 0.5 at the coordinator" in result.problems[0]


def test_a_missing_epsilon_at_the_coordinator_fails(coordinator: Entries, bank_a: Entries) -> None:
    _one(coordinator, "update-received", 2, "bank-a")["data"]["epsilon"] = None

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert result.problems[0].startswith("round 2:")


def test_an_epsilon_equal_up_to_rounding_still_matches(
    coordinator: Entries, bank_a: Entries
) -> None:
    done = _one(bank_a, "training-done", 1)
    done["data"]["epsilon_after"] = done["data"]["epsilon_after"] * (1 + 1e-12)

    assert reconcile(coordinator, bank_a).ok


def test_an_accepted_update_the_site_never_logged_fails(
    coordinator: Entries, bank_a: Entries
) -> None:
    bank_a.remove(_one(bank_a, "training-done", 2))

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert result.matched == 2
    assert len(result.problems) == 1
    assert result.problems[0].startswith("round 2: the coordinator accepted update")
    assert "never logged sending" in result.problems[0]


def test_a_rejected_update_the_site_never_logged_is_a_note(
    coordinator: Entries, bank_b: Entries
) -> None:
    bank_b.remove(_one(bank_b, "training-done", 2))

    result = reconcile(coordinator, bank_b)

    assert result.ok
    assert result.matched == 1
    assert result.notes == ["round 2: a rejected update the site never logged sending"]


def test_a_site_update_the_coordinator_never_mentions_fails(
    coordinator: Entries, bank_a: Entries
) -> None:
    coordinator.remove(_one(coordinator, "update-received", 3, "bank-a"))

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert result.matched == 2
    assert len(result.problems) == 1
    assert result.problems[0].startswith("round 3: the site logged update")
    assert "never mentions" in result.problems[0]
    assert "3.75" in result.problems[0]


@pytest.mark.parametrize(
    ("event", "status", "phase"),
    [
        ("site-excluded", "timed-out", "train"),
        ("site-excluded", "failed", "train"),
        ("site-refused", "refused", "train"),
        ("site-excluded", "timed-out", None),
    ],
)
def test_a_site_update_the_coordinator_excluded_is_a_note(
    coordinator: Entries,
    bank_a: Entries,
    event: str,
    status: str,
    phase: str | None,
) -> None:
    received = _one(coordinator, "update-received", 3, "bank-a")
    data: dict[str, Any] = {
        "round": 3,
        "site": "bank-a",
        "status": status,
        "reason": "no reply within 600 s",
    }
    if phase is not None:
        data["phase"] = phase
    coordinator[coordinator.index(received)] = {**received, "event": event, "data": data}

    result = reconcile(coordinator, bank_a)

    assert result.ok, result.problems
    assert result.matched == 2
    assert len(result.notes) == 1
    assert result.notes[0].startswith("round 3: the site sent update")
    assert f"the coordinator recorded {status} (no reply within 600 s)" in result.notes[0]


def test_an_exclusion_in_another_round_or_phase_does_not_excuse_a_missing_update(
    coordinator: Entries, bank_a: Entries
) -> None:
    received = _one(coordinator, "update-received", 3, "bank-a")
    index = coordinator.index(received)
    coordinator[index] = {
        **received,
        "event": "site-excluded",
        "data": {"round": 3, "site": "bank-a", "phase": "evaluate", "status": "timed-out"},
    }
    coordinator.append(
        {
            **received,
            "event": "site-excluded",
            "data": {"round": 2, "site": "bank-a", "phase": "train", "status": "timed-out"},
        }
    )

    result = reconcile(coordinator, bank_a)

    assert not result.ok
    assert [p.split(":")[0] for p in result.problems] == ["round 3"]


def test_an_exclusion_of_another_site_does_not_excuse_a_missing_update(
    coordinator: Entries, bank_a: Entries
) -> None:
    received = _one(coordinator, "update-received", 3, "bank-a")
    coordinator[coordinator.index(received)] = {
        **received,
        "event": "site-excluded",
        "data": {"round": 3, "site": "bank-b", "phase": "train", "status": "timed-out"},
    }

    assert not reconcile(coordinator, bank_a).ok


def test_a_rejected_update_with_a_different_hash_is_a_note(
    coordinator: Entries, bank_b: Entries
) -> None:
    received = _one(coordinator, "update-received", 2, "bank-b")
    assert received["data"]["status"] == "rejected"
    received["data"]["update_sha256"] = _flip(received["data"]["update_sha256"])

    result = reconcile(coordinator, bank_b)

    assert result.ok
    assert result.problems == []
    assert result.matched == 1
    assert len(result.notes) == 1
    assert result.notes[0].startswith("round 2: hash")
    assert "(rejected: update norm 612 exceeds the bound 44)" in result.notes[0]


def test_updates_of_the_other_site_are_not_compared(coordinator: Entries, bank_a: Entries) -> None:
    """A change to bank-b's entries leaves bank-a's reconciliation alone."""
    _one(coordinator, "update-received", 1, "bank-b")["data"]["update_sha256"] = "f" * 64

    result = reconcile(coordinator, bank_a)

    assert result.ok
    assert result.matched == 3


def test_entries_of_other_runs_in_the_site_log_are_ignored(
    coordinator: Entries, bank_a: Entries
) -> None:
    """A site's log spans runs: training-done entries of another run (logged after this
    run's, so a missing run filter would overwrite them) change nothing."""
    template = _one(bank_a, "training-done", 1)
    for server_round in (1, 2, 4):
        other = copy.deepcopy(template)
        other["seq"] = len(bank_a)
        other["data"].update(
            run="9999", round=server_round, update_sha256="e" * 64, epsilon_after=0.1
        )
        bank_a.append(other)

    result = reconcile(coordinator, bank_a)

    assert result.ok, result.problems
    assert result.matched == 3
    assert result.notes == []


def test_a_site_log_of_another_run_only_sent_nothing(coordinator: Entries, bank_a: Entries) -> None:
    for entry in bank_a:
        if entry["event"] == "training-done":
            entry["data"]["run"] = "9999"

    result = reconcile(coordinator, bank_a)

    # the coordinator accepted three updates that this site's log never records
    assert not result.ok
    assert [p.split(":")[0] for p in result.problems] == ["round 1", "round 2", "round 3"]


def test_a_site_that_sent_nothing_gets_a_note(coordinator: Entries, bank_a: Entries) -> None:
    coordinator = [
        e
        for e in coordinator
        if not (e["event"] == "update-received" and e["data"].get("site") == "bank-a")
    ]
    bank_a = [e for e in bank_a if e["event"] != "training-done"]

    result = reconcile(coordinator, bank_a)

    assert result.ok
    assert result.matched == 0
    assert result.notes == [f"site bank-a sent no update in run {RUN}"]


# ---------------------------------------------------------------------- errors ---


def test_a_coordinator_log_without_run_started_raises(
    coordinator: Entries, bank_a: Entries
) -> None:
    coordinator = [e for e in coordinator if e["event"] != "run-started"]

    with pytest.raises(AuditError, match="run-started"):
        reconcile(coordinator, bank_a)


def test_an_empty_site_log_raises(coordinator: Entries) -> None:
    with pytest.raises(AuditError, match="empty"):
        reconcile(coordinator, [])


def test_reconcile_does_not_modify_its_inputs(
    logs: dict[str, Entries], coordinator: Entries, bank_b: Entries
) -> None:
    reconcile(coordinator, bank_b)
    assert coordinator == logs["coordinator"]
    assert bank_b == logs["bank-b"]


def test_the_site_is_the_actor_of_the_site_log(coordinator: Entries) -> None:
    """A log whose actor the coordinator never heard of: nothing to match, nothing sent."""
    stranger = [{"seq": 0, "actor": "bank-z", "event": "log-opened", "data": {}}]
    result = reconcile(coordinator, stranger)
    assert result.site == "bank-z"
    assert result.ok
    assert result.matched == 0


def test_a_site_log_rewritten_by_its_own_key_does_not_reconcile(
    tmp_path: Path,
) -> None:
    """The site inserts an entry and re-seals its whole log with its own key: the log
    verifies and every update still matches by hash and ε, but the coordinator recorded
    where each update sat in the site's log, and those entries moved."""
    run = write_audited_run(tmp_path / "run")
    entries = read_entries(run.site_logs["bank-a"])
    inserted = {**entries[2], "event": "policy-decision", "data": {"decision": "accepted"}}
    shifted = [*entries[:2], inserted, *entries[2:]]
    for seq, entry in enumerate(shifted):
        entry["seq"] = seq
    sealed, _ = reseal_all(shifted, run.site_keys["bank-a"])
    result = reconcile(read_entries(run.coordinator_log), sealed)
    assert not result.ok
    assert result.matched == 3  # hashes and ε agree: only the position gives it away
    assert all("the site's log was rewritten" in p for p in result.problems)
    assert len(result.problems) == 3


def _entry(actor: str, seq: int, time: str, event: str, **data: Any) -> dict[str, Any]:
    return {"actor": actor, "seq": seq, "time": time, "event": event, "data": data}


def _update(round_: int, digest: str, epsilon: float, time: str) -> dict[str, Any]:
    return _entry(
        "coordinator", 0, time, "update-received",
        round=round_, site="bank-x", status="accepted", update_sha256=digest, epsilon=epsilon,
    )  # fmt: skip


def _trained(seq: int, round_: int, digest: str, epsilon: float, time: str) -> dict[str, Any]:
    return _entry(
        "bank-x", seq, time, "training-done",
        run="R", round=round_, update_sha256=digest, epsilon_after=epsilon,
    )  # fmt: skip


def test_a_round_run_again_after_a_resume_is_a_note_not_a_problem() -> None:
    coordinator = [
        _entry("coordinator", 0, "2026-01-01T10:00:00Z", "run-started", run="R"),
        _update(1, "a" * 64, 1.0, "2026-01-01T10:01:00Z"),
        # round 2 was under way when the SuperLink died; the resume ran it again
        _entry("coordinator", 2, "2026-01-01T10:05:00Z", "run-resumed", run="S", from_round=1),
        _update(2, "c" * 64, 3.0, "2026-01-01T10:06:00Z"),
    ]
    site = [
        _trained(1, 1, "a" * 64, 1.0, "2026-01-01T10:00:50Z"),
        _trained(2, 2, "b" * 64, 2.0, "2026-01-01T10:02:00Z"),  # lost in the crash
        _trained(3, 2, "c" * 64, 3.0, "2026-01-01T10:05:50Z"),
    ]
    outcome = reconcile(coordinator, site)
    assert outcome.ok, outcome.problems
    assert outcome.matched == 2
    assert any(
        "before the run was interrupted" in note and "bbbb" in note for note in outcome.notes
    )
    # Without the resume the same logs are a problem: two updates of round 2 at the site.
    assert not reconcile([e for e in coordinator if e["event"] != "run-resumed"], site).ok
