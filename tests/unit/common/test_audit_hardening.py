"""The audit trail's hardening: a damaged log is never extended, lines are ASCII, crafted
lines are findings (never crashes), opening keys are checked, log text is never rich
markup, odd entry values do not break reconciling or the report, an unpinned key is
said so, and a site log nobody vouches for fails."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import (
    GENESIS_PREV,
    LOG_OPENED,
    canonical,
    opening_data,
    seal,
    sha256_hex,
    sign_head,
    verify_lines,
)
from common.audit.log import AuditLog, head_path, read_entries, read_head, read_lines, verify_log
from common.audit.reconcile import reconcile
from common.audit.report import render_report
from common.audit.review import AUDIT_DIR, SITE_LOGS_DIR, entry_row, verify_path
from common.errors import AuditError
from common.signing import fingerprint, public_key_text, sign, write_public_key
from server.audit import COORDINATOR, CoordinatorAudit
from server.strategy_utils import UpdateReceipt
from tests.audit_runs import RUN, TASK, AuditedRun, reseal_all, write_audited_run
from tests.audit_runs import flat_output as _text
from tests.audit_runs import invoke_audit as _invoke

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
ACTOR = "coordinator"
PLACEHOLDER = "@@odd-value@@"


def _log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl", ACTOR, KEY)


def _six_entries(tmp_path: Path) -> AuditLog:
    """log-opened plus five events: entries 0..5."""
    log = _log(tmp_path)
    for number in range(1, 6):
        log.append("step", n=number)
    assert len(read_lines(log.path)) == 6
    return log


def _snapshot(log: AuditLog) -> tuple[bytes, bytes | None]:
    head = log.head_path.read_bytes() if log.head_path.exists() else None
    return log.path.read_bytes(), head


@pytest.fixture
def run(tmp_path: Path) -> AuditedRun:
    return write_audited_run(tmp_path / "run")


# --------------------------------------------- 1. a damaged log is never extended ---


def test_a_log_cut_behind_its_head_is_not_extended(tmp_path: Path) -> None:
    log = _six_entries(tmp_path)
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:-2]))  # the head still names entry 5
    before = _snapshot(log)

    with pytest.raises(AuditError, match="cut or altered"):
        log.append("after-the-cut", n=6)

    assert _snapshot(log) == before
    assert len(read_lines(log.path)) == 4


def test_a_log_without_its_head_is_not_extended(tmp_path: Path) -> None:
    log = _six_entries(tmp_path)
    log.head_path.unlink()
    before = _snapshot(log)

    with pytest.raises(AuditError, match="no readable signed head"):
        log.append("headless", n=6)

    assert _snapshot(log) == before
    assert not log.head_path.exists()


def test_a_head_one_entry_behind_is_a_crash_and_the_log_goes_on(tmp_path: Path) -> None:
    """A crash between writing entry 5 and its head leaves the head at entry 4."""
    log = _log(tmp_path)
    for number in range(1, 5):
        log.append("step", n=number)
    saved_head = log.head_path.read_bytes()
    assert read_head(log.head_path)["seq"] == 4
    log.append("step", n=5)
    log.head_path.write_bytes(saved_head)

    entry = log.append("after-the-crash", n=6)

    assert entry["seq"] == 6
    assert read_head(log.head_path)["seq"] == 6
    verification = verify_log(log.path, KEY.public_key())
    assert verification.ok, verification.findings
    assert verification.entries == 7


# ------------------------------------------------ 2. pure-ASCII lines, "\n" only ---


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_a_line_separator_in_site_text_stays_inside_its_line(
    tmp_path: Path, separator: str
) -> None:
    log = _log(tmp_path)
    site = f"evil{separator}x"
    log.append("site-joined", site=site, reason=f"a{separator}b")
    log.append("round-started", round=1, sites=[site])

    raw = log.path.read_bytes()
    raw.decode("ascii")  # pure ASCII: no raw separator character is on disk
    assert raw.count(b"\n") == 3
    assert len(read_lines(log.path)) == 3
    verification = verify_log(log.path, KEY.public_key())
    assert verification.ok, verification.findings
    assert verification.entries == 3
    assert read_entries(log.path)[1]["data"]["site"] == site


def test_read_lines_splits_at_newlines_only(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_text("a\u2028b\nc\u2029d\u0085e\nf\x0bg\x0ch\x1ci\x1dj\x1ek\n", encoding="utf-8")
    assert read_lines(path) == ["a\u2028b", "c\u2029d\u0085e", "f\x0bg\x0ch\x1ci\x1dj\x1ek"]


# ------------------------------------------- 3. crafted lines are findings, not crashes ---


def _body(seq: int, event: str, data: dict[str, Any], prev: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "time": "2030-01-01T00:00:00.000Z",
        "actor": ACTOR,
        "event": event,
        "data": data,
        "prev": prev,
    }


def _craft(key: Ed25519PrivateKey, seq: int, prev: str, fragment: str) -> tuple[str, str]:
    """A line whose data holds the raw JSON ``fragment``, hashed (over the canonical
    text with the fragment in place) and signed with ``key``: only the value is odd."""
    body = _body(seq, "odd", {"value": PLACEHOLDER}, prev)
    placeholder = json.dumps(PLACEHOLDER)
    text = canonical(body).decode("utf-8").replace(placeholder, fragment)
    digest = sha256_hex(text.encode("utf-8"))
    entry = {**body, "hash": digest, "signature": sign(key, digest.encode("ascii"))}
    line = json.dumps(entry, sort_keys=True).replace(placeholder, fragment)
    return line, digest


def _honest_lines(
    key: Ed25519PrivateKey, count: int, replace: dict[int, str] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """``count`` chained, signed lines (the opening first) and their head; the entry at
    index i in ``replace`` is a crafted one whose data is the given raw JSON value."""
    replace = replace or {}
    lines: list[str] = []
    prev = GENESIS_PREV
    first = ""
    last: dict[str, Any] = {}
    for seq in range(count):
        if seq in replace:
            line, digest = _craft(key, seq, prev, replace[seq])
            lines.append(line)
            prev = digest
            continue
        if seq == 0:
            event, data = LOG_OPENED, {"party": ACTOR, **opening_data(key)}
        else:
            event, data = "step", {"n": seq}
        last = seal(key, **_body(seq, event, data, prev))
        first = first or last["hash"]
        lines.append(json.dumps(last, sort_keys=True))
        prev = last["hash"]
    head = sign_head(key, log=first, seq=last["seq"], digest=last["hash"], time=last["time"])
    return lines, head


def test_honest_crafted_lines_verify() -> None:
    lines, head = _honest_lines(KEY, 5)
    verification = verify_lines(lines, KEY.public_key(), head)
    assert verification.ok, verification.findings
    # And the crafting itself is sound: a plain value hashed this way verifies too.
    lines, head = _honest_lines(KEY, 5, {2: "1.5"})
    verification = verify_lines(lines, KEY.public_key(), head)
    assert verification.ok, verification.findings


@pytest.mark.parametrize(
    "fragment",
    ["1e400", '"\\ud800"', "-1e999"],
    ids=["huge-number", "lone-surrogate", "huge-negative"],
)
def test_a_signed_entry_with_a_value_no_writer_produces_is_a_finding(fragment: str) -> None:
    lines, head = _honest_lines(KEY, 5, {2: fragment})
    assert fragment in lines[2]

    verification = verify_lines(lines, KEY.public_key(), head)  # must not raise

    assert not verification.ok
    assert {finding.line for finding in verification.findings} == {3}
    assert "no writer produces" in verification.findings[0].problem


def test_a_deeply_nested_line_is_a_finding() -> None:
    lines, head = _honest_lines(KEY, 5)
    lines[2] = "[" * 100_000

    verification = verify_lines(lines, KEY.public_key(), head)

    assert not verification.ok
    assert 3 in {finding.line for finding in verification.findings}
    assert all(finding.line in (0, 3) for finding in verification.findings)


def test_a_duplicate_data_field_is_a_finding() -> None:
    """JSON readers disagree on which of two 'data' fields counts: neither is taken."""
    lines, head = _honest_lines(KEY, 5)
    assert lines[2].startswith('{"actor"')
    lines[2] = '{"data": {"n": 999}, ' + lines[2][1:]  # the sealed 'data' comes later
    assert json.loads(lines[2])["data"] == {"n": 2}  # a plain reader sees the sealed one

    verification = verify_lines(lines, KEY.public_key(), head)

    assert not verification.ok
    assert 3 in {finding.line for finding in verification.findings}
    assert any("data" in finding.problem for finding in verification.findings)


def test_a_deeply_nested_head_reads_as_an_empty_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.head.json"
    path.write_text("[" * 100_000, encoding="utf-8")
    assert read_head(path) == {}
    path.write_text('{"a": ' * 100_000, encoding="utf-8")
    assert read_head(path) == {}


# ---------------------------------------------- 4. the opening's key fingerprint ---


def test_an_opening_whose_fingerprint_is_not_its_key_is_a_finding() -> None:
    lines, _ = _honest_lines(KEY, 4)
    entries = [json.loads(line) for line in lines]
    opening = entries[0]["data"]
    assert opening["public_key"] == public_key_text(KEY.public_key())
    entries[0]["data"] = {**opening, "key": fingerprint(OTHER.public_key())}
    sealed, head = reseal_all(entries, KEY, reopen=False)
    lines = [json.dumps(entry, sort_keys=True) for entry in sealed]

    for pinned in (None, KEY.public_key()):
        verification = verify_lines(lines, pinned, head)
        assert not verification.ok
        assert verification.findings[0].line == 1
        assert "fingerprint" in verification.findings[0].problem


# ------------------------------------------------ 5. log text is never rich markup ---

MARKUP_REJECTED = "bad [/x] reason"
MARKUP_REFUSED = "[conceal]hidden[/conceal]"


def _with_markup_reasons(run: AuditedRun) -> None:
    """Honestly signed: bank-a trains rounds 4 and 5; the coordinator rejects round 4's
    update and records round 5 as refused, both with reasons that look like markup."""
    coordinator = CoordinatorAudit(AuditLog(run.coordinator_log, COORDINATOR, run.coordinator_key))
    site = AuditLog(run.site_logs["bank-a"], "bank-a", run.site_keys["bank-a"])
    for server_round in (4, 5):
        digest = f"{server_round}" * 64
        epsilon = 3.0 + server_round / 10
        site.append(
            "training-done",
            run=RUN,
            round=server_round,
            update_sha256=digest,
            epsilon_after=epsilon,
        )
        if server_round == 4:
            coordinator.update_received(
                4,
                "bank-a",
                UpdateReceipt(digest, 200.0, epsilon),
                accepted=False,
                reason=MARKUP_REJECTED,
            )
        else:
            coordinator.site_excluded(5, "bank-a", "train", "refused", MARKUP_REFUSED)


def test_show_prints_markup_in_a_reason_as_text(run: AuditedRun) -> None:
    _with_markup_reasons(run)
    assert verify_path(run.run_dir)[0].verification.ok

    result = _invoke("show", str(run.run_dir))

    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert MARKUP_REJECTED in text
    assert MARKUP_REFUSED in text


def test_reconcile_prints_markup_in_a_reason_as_text(run: AuditedRun) -> None:
    _with_markup_reasons(run)

    result = _invoke("reconcile", str(run.coordinator_log), str(run.site_logs["bank-a"]))

    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 0, result.output  # notes only: it still reconciles
    text = _text(result)
    assert "reconciled" in text
    assert MARKUP_REJECTED in text
    assert MARKUP_REFUSED in text


def test_reconcile_with_a_problem_still_exits_1_with_markup_in_the_log(run: AuditedRun) -> None:
    _with_markup_reasons(run)
    site = AuditLog(run.site_logs["bank-a"], "bank-a", run.site_keys["bank-a"])
    site.append("training-done", run=RUN, round=6, update_sha256="[/y]" * 16, epsilon_after=4.0)

    result = _invoke("reconcile", str(run.coordinator_log), str(run.site_logs["bank-a"]))

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    text = _text(result)
    assert "DOES NOT RECONCILE" in text
    assert "[/y][/y][/" in text
    assert MARKUP_REFUSED in text


# ------------------------------- 6. odd values do not break reconcile or the report ---


def test_reconcile_survives_odd_training_done_entries(run: AuditedRun) -> None:
    coordinator = CoordinatorAudit(AuditLog(run.coordinator_log, COORDINATOR, run.coordinator_key))
    site = AuditLog(run.site_logs["bank-a"], "bank-a", run.site_keys["bank-a"])
    site.append("training-done", run=RUN, round=4, epsilon_after=3.0)  # no update hash
    site.append("training-done", run=RUN, round=5, update_sha256="5" * 64, epsilon_after="x")
    site.append("training-done", run=RUN, round=6, epsilon_after="x")  # excluded, no hash
    coordinator.site_excluded(6, "bank-a", "train", "failed", "no reply")
    site.append("training-done", run=RUN, round=7, update_sha256="7" * 64, epsilon_after="x")
    coordinator.update_received(
        7, "bank-a", UpdateReceipt("7" * 64, 200.0, 3.5), accepted=True, norm=0.5
    )
    assert verify_log(run.site_logs["bank-a"]).ok

    result = reconcile(read_entries(run.coordinator_log), read_entries(run.site_logs["bank-a"]))

    assert not result.ok
    problems = " | ".join(result.problems)
    assert "round 4" in problems and "(none)" in problems
    assert "round 5" in problems and "ε x" in problems
    assert "round 7" in problems
    assert any(note.startswith("round 6") for note in result.notes)


def _rewrite_coordinator(
    run: AuditedRun, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> None:
    """The coordinator's log with its entries changed, re-chained and signed by the
    coordinator's own key: odd values, but honestly signed."""
    entries = change(read_entries(run.coordinator_log))
    for seq, entry in enumerate(entries):
        entry["seq"] = seq
    sealed, head = reseal_all(entries, run.coordinator_key)
    run.coordinator_log.write_text(
        "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in sealed), encoding="utf-8"
    )
    head_path(run.coordinator_log).write_text(json.dumps(head), encoding="utf-8")


def _set(event: str, **data: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    def change(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for entry in entries:
            if entry["event"] == event:
                entry["data"].update(data)
        return entries

    return change


def _no_sites_list(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in entries:
        if "sites" in entry["data"]:
            entry["data"]["sites"] = 7
    return entries


def _without_run_started(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["event"] != "run-started"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set("run-started", planned_rounds="many"), "many"),
        (_set("run-finished", accuracy="high"), "accuracy 0.000"),
        (_set("evaluation", accuracy="high", loss=None), "accuracy n/a"),
        (_no_sites_list, "0 sites"),
        (_without_run_started, "cannot reconcile"),
    ],
    ids=["planned-rounds-many", "accuracy-high", "evaluation-odd", "sites-not-a-list", "no-start"],
)
def test_the_report_survives_odd_coordinator_entries(
    run: AuditedRun, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], expected: str
) -> None:
    _rewrite_coordinator(run, change)
    assert verify_path(run.run_dir)[0].verification.ok  # honestly signed, just odd

    started = time.monotonic()
    html = render_report(run.run_dir)

    assert time.monotonic() - started < 30
    assert html.startswith("<!DOCTYPE html>") and html.endswith("</html>")
    assert expected in html


def _limited_render(run_dir: str) -> None:
    """In a forked child: render with a cap on memory, so a runaway loop fails fast."""
    with open("/proc/self/status", encoding="ascii") as status:
        data_kib = next(int(line.split()[1]) for line in status if line.startswith("VmData:"))
    limit = data_kib * 1024 + 2 * 1024**3
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    html = render_report(Path(run_dir))
    if not html.endswith("</html>"):
        os._exit(3)


def test_the_report_of_a_billion_planned_rounds_is_quick(run: AuditedRun) -> None:
    _rewrite_coordinator(run, _set("run-started", planned_rounds=10**9))

    child = multiprocessing.get_context("fork").Process(
        target=_limited_render, args=(str(run.run_dir),)
    )
    started = time.monotonic()
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("render_report did not finish within 60 s")
    assert child.exitcode == 0, f"render_report failed in the child (exit {child.exitcode})"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("event", ["evaluation", "evaluation-done"])
def test_entry_row_of_an_evaluation_without_figures(event: str) -> None:
    entry = {
        "seq": 9,
        "time": "2030-01-01T00:00:00.000Z",
        "actor": "coordinator" if event == "evaluation" else "bank-a",
        "event": event,
        "data": {"round": 2, "accuracy": None, "loss": 0.5},
    }
    row = entry_row(entry)
    assert row["detail"] == "accuracy n/a, loss 0.500"
    assert row["round"] == "2"
    entry["data"] = {"round": 2, "accuracy": None, "loss": None}
    assert entry_row(entry)["detail"] == "accuracy n/a, loss n/a"


# -------------------------------------------------- 7. an unpinned key is said so ---


def test_verify_without_key_notes_that_no_key_was_pinned(run: AuditedRun) -> None:
    result = _invoke("verify", str(run.run_dir))
    assert result.exit_code == 0, result.output
    assert "no --key given" in _text(result)

    public = run.run_dir / "keys" / "coordinator.pub"
    pinned = _invoke("verify", str(run.run_dir), "--key", str(public))
    assert pinned.exit_code == 0, pinned.output
    assert "no --key given" not in _text(pinned)


def test_the_report_says_when_no_key_was_pinned(run: AuditedRun) -> None:
    assert "No key was pinned" in render_report(run.run_dir)
    pinned = render_report(run.run_dir, run.coordinator_key.public_key())
    assert "No key was pinned" not in pinned
    assert "All 3 audit logs intact" in pinned


# -------------------------------------- 8. a site log nobody vouches for fails ---


def test_a_site_log_no_coordinator_log_vouches_for_is_not_ok(run: AuditedRun) -> None:
    stranger = Ed25519PrivateKey.generate()
    path = run.run_dir / AUDIT_DIR / SITE_LOGS_DIR / "bank-c.jsonl"
    log = AuditLog(path, "bank-c", stranger)
    log.append("run-joined", run=RUN, task=TASK, audit_key=fingerprint(stranger.public_key()))
    log.append("policy-decision", run=RUN, round=1, phase="train", decision="accepted")
    assert verify_log(path).ok  # intact on its own

    reports = {report.path: report for report in verify_path(run.run_dir)}

    assert not reports[path].verification.ok
    problems = " ".join(str(finding) for finding in reports[path].verification.findings)
    assert "nothing vouches for who signed" in problems
    assert "no verified coordinator log" in reports[path].key_source
    others = [report for other, report in reports.items() if other != path]
    assert len(others) == 3 and all(report.verification.ok for report in others)


def test_a_coordinator_pub_for_another_key_vouches_for_nobody(run: AuditedRun) -> None:
    """Pinning the wrong coordinator key leaves every site log unvouched too."""
    write_public_key(run.run_dir / "keys" / "coordinator.pub", OTHER.public_key())
    reports = verify_path(run.run_dir)
    assert all(not report.verification.ok for report in reports)
    site_findings = [str(f) for r in reports[1:] for f in r.verification.findings]
    assert site_findings and all("nothing vouches" in f for f in site_findings)


# ------------------------------------------------------- found while writing these ---


def test_a_forged_lagging_head_does_not_pass_for_a_crash(tmp_path: Path) -> None:
    """The one-behind allowance is for the genuine head of the previous entry only:
    cut the last entry and write a head one behind with a made-up hash."""
    log = _log(tmp_path)
    for number in range(1, 5):
        log.append("step", n=number)
    lines = log.path.read_bytes().split(b"\n")[:-1]
    log.path.write_bytes(b"\n".join(lines[:-1]) + b"\n")  # entries 0-3 remain
    forged = read_head(log.head_path)
    assert forged is not None
    forged.update(seq=2, hash="0" * 64)
    log.head_path.write_text(json.dumps(forged))
    before = _snapshot(log)

    with pytest.raises(AuditError, match="cut or altered"):
        log.append("after", n=5)
    assert _snapshot(log) == before


def test_a_deeply_nested_line_breaks_no_review_command(run: AuditedRun) -> None:
    path = run.site_logs["bank-b"]
    path.write_text(path.read_text() + "[" * 100_000 + "\n")

    assert all(entry.get("seq") is not None for entry in read_entries(path))
    reports = {r.path: r for r in verify_path(run.run_dir)}
    assert not reports[path].verification.ok
    assert _invoke("show", str(run.run_dir)).exit_code == 0
    assert "NOT intact" in render_report(run.run_dir)


def test_huge_numbers_and_odd_data_in_a_signed_site_log_break_no_review_command(
    run: AuditedRun,
) -> None:
    log = AuditLog(run.site_logs["bank-a"], "bank-a", run.site_keys["bank-a"])
    log.append("training-done", run=RUN, round=9, epsilon_after=10**400, epsilon_budget=10**400)
    log.append("evaluation-done", run=RUN, round=9, accuracy=10**400, loss=None)

    rows = [entry_row(e) for e in read_entries(run.site_logs["bank-a"])[-2:]]
    assert rows[0]["epsilon"] == "" and rows[1]["detail"] == "accuracy n/a, loss n/a"
    assert _invoke("show", str(run.run_dir), "--site", "bank-a").exit_code == 0
    html = render_report(run.run_dir)
    assert "bank-a" in html
