"""Finding, verifying and tabulating the logs of an audited run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.log import head_path, read_entries
from common.audit.review import (
    SHOW_COLUMNS,
    LogReport,
    entries_of,
    entry_row,
    find_logs,
    select,
    site_keys,
    verify_path,
)
from common.errors import AuditError
from common.signing import fingerprint
from tests.audit_runs import RUN, TASK, AuditedRun, reseal_all, write_audited_run

VOUCHED = "the key the coordinator recorded when the site joined"
NOT_VOUCHED = "taken from the log itself: no verified coordinator log names it"


@pytest.fixture
def run(tmp_path: Path) -> AuditedRun:
    return write_audited_run(tmp_path / "run")


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    """A run for read-only tests (never modify it)."""
    return write_audited_run(tmp_path_factory.mktemp("review") / "run")


def _by_path(reports: list[LogReport]) -> dict[Path, LogReport]:
    return {report.path: report for report in reports}


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text(
        "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries),
        encoding="utf-8",
    )


def _edit_field(path: Path, line: int, **data: Any) -> None:
    """Change data fields of the entry on this (1-based) line, leaving its hash alone."""
    entries = read_entries(path)
    entries[line - 1]["data"].update(data)
    _write_entries(path, entries)


def _re_sign(path: Path, key: Ed25519PrivateKey) -> None:
    """Rewrite the whole log (and its head) as if ``key`` had written it: a consistent
    log that verifies on its own."""
    new, head = reseal_all(read_entries(path), key)
    _write_entries(path, new)
    head_path(path).write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------- find_logs ---


def test_find_logs_of_a_run_directory(shared_run: AuditedRun) -> None:
    logs = find_logs(shared_run.run_dir)
    assert logs.coordinator == [shared_run.coordinator_log]
    assert logs.sites == [shared_run.site_logs["bank-a"], shared_run.site_logs["bank-b"]]
    assert logs.all == [shared_run.coordinator_log, *logs.sites]
    # heads are not logs
    assert all(path.suffix == ".jsonl" for path in logs.all)


def test_find_logs_of_one_file(shared_run: AuditedRun) -> None:
    logs = find_logs(shared_run.site_logs["bank-b"])
    assert logs.coordinator == [shared_run.site_logs["bank-b"]]
    assert logs.sites == []


def test_find_logs_errors_on_a_directory_without_audit(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    with pytest.raises(AuditError, match="audit/"):
        find_logs(tmp_path)


def test_find_logs_errors_on_an_empty_audit_directory(tmp_path: Path) -> None:
    (tmp_path / "audit" / "sites").mkdir(parents=True)
    with pytest.raises(AuditError, match="no audit logs"):
        find_logs(tmp_path)


# ------------------------------------------------------------------- verify_path ---


def test_an_honest_run_directory_verifies(shared_run: AuditedRun) -> None:
    reports = verify_path(shared_run.run_dir)

    assert [r.path for r in reports] == find_logs(shared_run.run_dir).all
    assert all(r.verification.ok for r in reports), [r.verification.findings for r in reports]
    by_path = _by_path(reports)
    coordinator = by_path[shared_run.coordinator_log]
    assert coordinator.verification.actor == "coordinator"
    assert coordinator.verification.key_pinned
    assert coordinator.verification.key == fingerprint(shared_run.coordinator_key.public_key())
    assert coordinator.key_source.startswith("keys/coordinator.pub of the run directory")
    assert coordinator.verification.entries == 23
    assert coordinator.verification.head_seq == 22
    for site, path in shared_run.site_logs.items():
        report = by_path[path]
        assert report.verification.actor == site
        assert report.verification.key == fingerprint(shared_run.site_keys[site].public_key())
        assert report.key_source == VOUCHED


def test_the_right_pinned_key_verifies(shared_run: AuditedRun) -> None:
    reports = verify_path(shared_run.run_dir, shared_run.coordinator_key.public_key())

    assert all(r.verification.ok for r in reports)
    assert _by_path(reports)[shared_run.coordinator_log].key_source == "pinned with --key"


def test_a_wrong_pinned_key_fails_the_coordinator_log(shared_run: AuditedRun) -> None:
    wrong = Ed25519PrivateKey.generate().public_key()

    reports = _by_path(verify_path(shared_run.run_dir, wrong))

    coordinator = reports[shared_run.coordinator_log].verification
    assert not coordinator.ok
    assert coordinator.key == fingerprint(wrong)
    first = coordinator.first_problem
    assert first is not None
    assert first.line == 1
    assert "re-signed by another party" in first.problem
    # the sites' keys are then not vouched for by a verified coordinator log
    for path in shared_run.site_logs.values():
        assert reports[path].key_source == NOT_VOUCHED


def test_without_coordinator_pub_the_key_comes_from_the_log(run: AuditedRun) -> None:
    (run.run_dir / "keys" / "coordinator.pub").unlink()

    reports = _by_path(verify_path(run.run_dir))

    coordinator = reports[run.coordinator_log]
    assert coordinator.verification.ok
    assert not coordinator.verification.key_pinned
    assert coordinator.key_source == "taken from the log itself (pass --key to pin)"
    assert reports[run.site_logs["bank-a"]].key_source == VOUCHED


def test_a_re_signed_site_log_passes_alone_but_fails_in_the_run(run: AuditedRun) -> None:
    path = run.site_logs["bank-a"]
    impostor = Ed25519PrivateKey.generate()
    _re_sign(path, impostor)

    (alone,) = verify_path(path)
    assert alone.verification.ok, alone.verification.findings
    assert alone.verification.key == fingerprint(impostor.public_key())
    assert alone.key_source == "taken from the log itself (pass --key to pin)"

    reports = _by_path(verify_path(run.run_dir))
    report = reports[path]
    assert not report.verification.ok
    assert report.key_source == VOUCHED
    first = report.verification.first_problem
    assert first is not None
    assert first.line == 1
    assert fingerprint(impostor.public_key()) in first.problem
    assert fingerprint(run.site_keys["bank-a"].public_key()) in first.problem
    assert "re-signed" in first.problem
    # the other logs are untouched
    assert reports[run.coordinator_log].verification.ok
    assert reports[run.site_logs["bank-b"]].verification.ok


def test_a_re_signed_site_log_fails_with_its_real_key_pinned(run: AuditedRun) -> None:
    path = run.site_logs["bank-b"]
    _re_sign(path, Ed25519PrivateKey.generate())

    (report,) = verify_path(path, run.site_keys["bank-b"].public_key())

    assert not report.verification.ok
    assert report.key_source == "pinned with --key"


def test_a_tampered_coordinator_log_leaves_the_site_keys_unvouched(run: AuditedRun) -> None:
    _edit_field(run.coordinator_log, 6, epsilon=0.1)  # update-received, round 1, bank-a

    reports = _by_path(verify_path(run.run_dir))

    coordinator = reports[run.coordinator_log].verification
    assert not coordinator.ok
    assert coordinator.first_problem is not None
    assert coordinator.first_problem.line == 6
    assert "edited" in coordinator.first_problem.problem
    for path in run.site_logs.values():
        assert reports[path].key_source == NOT_VOUCHED
        # Intact in itself, but nothing vouches for its signer: not a pass.
        verification = reports[path].verification
        assert not verification.ok
        assert len(verification.findings) == 1
        assert "nothing vouches for who signed this log" in verification.findings[0].problem


def test_a_tampered_site_log_fails_at_the_edited_line(run: AuditedRun) -> None:
    _edit_field(run.site_logs["bank-b"], 5, update_sha256="0" * 64)

    reports = _by_path(verify_path(run.run_dir))

    site = reports[run.site_logs["bank-b"]].verification
    assert not site.ok
    assert [finding.line for finding in site.findings] == [5]
    assert reports[run.coordinator_log].verification.ok
    assert reports[run.site_logs["bank-a"]].verification.ok


def test_site_keys_come_from_site_joined_entries(shared_run: AuditedRun) -> None:
    keys = site_keys(read_entries(shared_run.coordinator_log))
    assert keys == {
        site: fingerprint(key.public_key()) for site, key in shared_run.site_keys.items()
    }


def test_site_keys_ignore_entries_without_an_audit_key() -> None:
    entries = [
        {"event": "site-joined", "data": {"site": "bank-a", "kind": "bank"}},
        {"event": "update-received", "data": {"site": "bank-b", "audit-key": "x"}},
        {"event": "site-joined", "data": {"site": "bank-c", "audit-key": "ed25519:c"}},
        {"event": "site-joined", "data": None},
    ]
    assert site_keys(entries) == {"bank-c": "ed25519:c"}


# ------------------------------------------------------------------------ select ---


def _keys(entries: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(str(e["actor"]), int(e["seq"])) for e in entries]


@pytest.fixture(scope="module")
def merged(shared_run: AuditedRun) -> list[dict[str, Any]]:
    return entries_of(find_logs(shared_run.run_dir).all)


def test_select_without_filters_keeps_everything(merged: list[dict[str, Any]]) -> None:
    assert select(merged) == merged
    assert len(merged) == 23 + 9 + 8


def test_select_by_site_takes_its_log_and_coordinator_entries_about_it(
    merged: list[dict[str, Any]],
) -> None:
    chosen = select(merged, sites=["bank-b"])

    own = [e for e in chosen if e["actor"] == "bank-b"]
    about = [e for e in chosen if e["actor"] == "coordinator"]
    assert len(own) == 8  # the whole of bank-b's log
    assert sorted(e["event"] for e in about) == [
        "site-joined",
        "site-refused",
        "update-received",
        "update-received",
    ]
    assert all(e["data"]["site"] == "bank-b" for e in about)
    assert len(chosen) == len(own) + len(about)
    assert not any(e["actor"] == "bank-a" for e in chosen)


def test_select_by_several_sites(merged: list[dict[str, Any]]) -> None:
    both = select(merged, sites=["bank-a", "bank-b"])
    assert len(both) == len(select(merged, sites=["bank-a"])) + len(
        select(merged, sites=["bank-b"])
    )
    assert select(merged, sites=["bank-z"]) == []


def test_select_by_the_coordinator_takes_its_log(merged: list[dict[str, Any]]) -> None:
    chosen = select(merged, sites=["coordinator"])
    assert len(chosen) == 23
    assert {e["actor"] for e in chosen} == {"coordinator"}


def test_select_by_round(merged: list[dict[str, Any]]) -> None:
    chosen = select(merged, rounds=[3])

    assert chosen
    assert all(e["data"]["round"] == 3 for e in chosen)
    expected = [e for e in merged if e["data"].get("round") == 3]
    assert _keys(chosen) == _keys(expected)
    # coordinator: 2 round-started, update-received, site-refused, aggregation-done,
    # evaluation; bank-a: policy-decision, training-done; bank-b: budget-refused
    assert len(chosen) == 9


def test_select_by_several_rounds(merged: list[dict[str, Any]]) -> None:
    chosen = select(merged, rounds=[1, 3])
    assert {e["data"]["round"] for e in chosen} == {1, 3}
    assert len(chosen) == len(select(merged, rounds=[1])) + len(select(merged, rounds=[3]))


def test_select_by_event(merged: list[dict[str, Any]]) -> None:
    chosen = select(merged, events=["update-received"])
    assert len(chosen) == 5
    assert {e["event"] for e in chosen} == {"update-received"}

    two = select(merged, events=["training-done", "budget-refused"])
    assert sorted(e["event"] for e in two) == ["budget-refused"] + ["training-done"] * 5


def test_select_with_combined_filters(merged: list[dict[str, Any]]) -> None:
    chosen = select(merged, sites=["bank-b"], rounds=[2])
    assert sorted(_keys(chosen)) == sorted([("bank-b", 5), ("bank-b", 6), ("coordinator", 12)])

    (only,) = select(merged, sites=["bank-b"], rounds=[2], events=["update-received"])
    assert only["actor"] == "coordinator"
    assert only["data"]["status"] == "rejected"

    assert select(merged, sites=["bank-b"], rounds=[3], events=["training-done"]) == []


# -------------------------------------------------------------------- entries_of ---


def test_entries_of_merges_the_logs_in_time_order(shared_run: AuditedRun) -> None:
    logs = find_logs(shared_run.run_dir).all
    merged = entries_of(logs)

    times = [e["time"] for e in merged]
    assert times == sorted(times)
    every = [e for log in logs for e in read_entries(log)]
    assert sorted(_keys(merged)) == sorted(_keys(every))
    # interleaved, not one log after another
    actors = [e["actor"] for e in merged]
    assert actors[:2] == ["coordinator", "coordinator"]
    assert actors.index("bank-a") < len(actors) - actors[::-1].index("coordinator") - 1


def test_entries_of_breaks_time_ties_by_log_then_sequence(tmp_path: Path) -> None:
    def entry(actor: str, seq: int, time: str) -> dict[str, Any]:
        return {"seq": seq, "time": time, "actor": actor, "event": "x", "data": {}}

    tie = "2030-01-01T00:00:01.000Z"
    _write_entries(
        tmp_path / "z.jsonl",
        [entry("zeta", 1, tie), entry("zeta", 0, tie), entry("zeta", 2, "2030-01-01T00:00:02Z")],
    )
    _write_entries(
        tmp_path / "a.jsonl",
        [entry("alpha", 0, "2030-01-01T00:00:00.500Z"), entry("alpha", 1, tie)],
    )

    merged = entries_of([tmp_path / "z.jsonl", tmp_path / "a.jsonl"])

    assert _keys(merged) == [("alpha", 0), ("alpha", 1), ("zeta", 0), ("zeta", 1), ("zeta", 2)]


# --------------------------------------------------------------------- entry_row ---


def _entry(entries: list[dict[str, Any]], actor: str, event: str, **data: Any) -> dict:
    (found,) = [
        e
        for e in entries
        if e["actor"] == actor
        and e["event"] == event
        and all(e["data"].get(k) == v for k, v in data.items())
    ]
    return found


def test_entry_row_has_the_show_columns(merged: list[dict[str, Any]]) -> None:
    for entry in merged:
        row = entry_row(entry)
        assert tuple(row) == SHOW_COLUMNS
        assert all(isinstance(value, str) for value in row.values())


def test_entry_row_of_a_rejected_update(merged: list[dict[str, Any]]) -> None:
    entry = _entry(merged, "coordinator", "update-received", round=2, site="bank-b")

    assert entry_row(entry) == {
        "log": "coordinator",
        "seq": "12",
        "time": entry["time"],
        "event": "update-received",
        "round": "2",
        "site": "bank-b",
        "status": "rejected",
        "epsilon": "2.5000",
        "hash": entry["data"]["update_sha256"],
        "detail": "update norm 612 exceeds the bound 44",
    }


def test_entry_row_of_a_site_training_done(merged: list[dict[str, Any]]) -> None:
    entry = _entry(merged, "bank-a", "training-done", round=1)

    row = entry_row(entry)

    assert row["log"] == "bank-a"
    assert row["site"] == "bank-a"  # a site's own entries are about the site
    assert row["seq"] == "4"
    assert row["round"] == "1"
    assert row["status"] == ""
    assert row["epsilon"] == "1.2500"  # epsilon_after
    assert row["hash"] == entry["data"]["update_sha256"]
    assert row["detail"] == ""


def test_entry_row_of_coordinator_events(merged: list[dict[str, Any]]) -> None:
    started_entry = _entry(merged, "coordinator", "run-started")
    started = entry_row(started_entry)
    assert started["site"] == ""
    assert started["round"] == ""
    assert started["detail"] == f"task {TASK}, 3 rounds, 2 sites"
    assert started["hash"] == started_entry["data"]["config_sha256"]

    round_started = entry_row(
        _entry(merged, "coordinator", "round-started", round=1, phase="train")
    )
    assert round_started["status"] == "train"
    assert round_started["site"] == ""
    assert round_started["detail"] == "bank-a, bank-b"

    aggregated_entry = _entry(merged, "coordinator", "aggregation-done", round=2)
    aggregated = entry_row(aggregated_entry)
    assert aggregated["site"] == ""
    assert aggregated["hash"] == aggregated_entry["data"]["adapter_sha256"]
    assert aggregated["detail"] == "1 sites, 200 examples"

    evaluation = entry_row(_entry(merged, "coordinator", "evaluation", round=1))
    assert evaluation["detail"] == "accuracy 0.650, loss 0.800"

    refused = entry_row(_entry(merged, "coordinator", "site-refused"))
    assert refused["site"] == "bank-b"
    assert refused["status"] == "refused"
    assert refused["detail"] == "site bank-b refuses round 3: over the site's budget"

    finished_entry = _entry(merged, "coordinator", "run-finished")
    assert entry_row(finished_entry)["hash"] == finished_entry["data"]["final_adapter_sha256"]


def test_entry_row_of_site_events(merged: list[dict[str, Any]]) -> None:
    decision = entry_row(_entry(merged, "bank-b", "policy-decision", round=2))
    assert decision["status"] == "accepted"
    assert decision["site"] == "bank-b"

    summary = entry_row(_entry(merged, "bank-a", "data-summary"))
    assert summary["detail"] == "200 records, 150 people"
    assert summary["round"] == ""

    joined = entry_row(_entry(merged, "bank-b", "run-joined"))
    assert joined["site"] == "bank-b"
    assert joined["detail"] == ""


def test_entry_row_tolerates_odd_entries() -> None:
    row = entry_row({"actor": "bank-a", "seq": 7, "event": "custom", "data": "not a mapping"})
    assert row["log"] == "bank-a"
    assert row["site"] == "bank-a"
    assert row["seq"] == "7"
    assert row["round"] == row["status"] == row["epsilon"] == row["hash"] == ""

    assert entry_row({}) == dict.fromkeys(SHOW_COLUMNS, "")


def test_entry_row_keeps_round_zero_and_epsilon_zero() -> None:
    row = entry_row(
        {"actor": "coordinator", "event": "x", "data": {"round": 0, "site": "s", "epsilon": 0}}
    )
    assert row["round"] == "0"
    assert row["epsilon"] == "0.0000"
    assert row["site"] == "s"


def test_the_audited_run_is_the_one_described(shared_run: AuditedRun) -> None:
    """Guards the counts the tests above rely on."""
    (started,) = [
        e for e in read_entries(shared_run.coordinator_log) if e["event"] == "run-started"
    ]
    assert started["data"]["run"] == RUN
    assert len(read_entries(shared_run.coordinator_log)) == 23
    assert len(read_entries(shared_run.site_logs["bank-a"])) == 9
    assert len(read_entries(shared_run.site_logs["bank-b"])) == 8


# ------------------------------------------------------------ coordinator anchors ---


def test_a_site_log_rolled_back_with_its_old_head_passes_alone_but_not_in_the_run(
    run: AuditedRun,
) -> None:
    """The site keeps an old genuine head, cuts its log back to it and puts it back:
    every piece is signed, so the log alone verifies; the coordinator's log recorded
    later entries of it (one per update), and the run-directory check finds them gone."""
    path = run.site_logs["bank-a"]
    entries = read_entries(path)
    first_update = next(i for i, e in enumerate(entries) if e["event"] == "training-done")
    early = reseal_all(entries[: first_update + 1], run.site_keys["bank-a"])
    assert early[0] == entries[: first_update + 1]  # same key, same entries: same seal
    _write_entries(path, early[0])
    head_path(path).write_text(json.dumps(early[1]))

    (alone,) = verify_path(path)
    assert alone.verification.ok, alone.verification.findings

    report = _by_path(verify_path(run.run_dir))[path]
    assert not report.verification.ok
    problems = [f.problem for f in report.verification.findings]
    assert len(problems) == 2  # rounds 2 and 3 of bank-a: their entries are gone
    assert all("no longer has it" in p and "cut back or rewritten" in p for p in problems)


def test_the_coordinator_records_where_each_update_sits_in_the_site_log(
    shared_run: AuditedRun,
) -> None:
    coordinator = read_entries(shared_run.coordinator_log)
    site = {e["seq"]: e for e in read_entries(shared_run.site_logs["bank-a"])}
    received = [
        e["data"]
        for e in coordinator
        if e["event"] == "update-received" and e["data"]["site"] == "bank-a"
    ]
    assert len(received) == 3
    for data in received:
        logged = site[data["site_log_seq"]]
        assert logged["hash"] == data["site_log_hash"]
        assert logged["event"] == "training-done"
        assert logged["data"]["update_sha256"] == data["update_sha256"]
