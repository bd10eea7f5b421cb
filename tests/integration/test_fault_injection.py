"""Fault injection on Flower's Simulation Engine: every behaviour a site can be given.

Two honest banks train with faulty ones beside them. Each run must complete from the
honest banks, show every faulty site's exclusion (with its reason) in metrics.csv,
summary.json and the console log, and aggregate exactly what a run of the honest banks
alone aggregates (same sites, same examples) with accuracy within DP noise.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner

from client.site import SALT_FILE
from common.audit.log import read_entries
from common.audit.reconcile import reconcile
from common.audit.review import verify_path
from common.cli import cli
from server.introductions import FIRST_WAIT

pytestmark = pytest.mark.slow

TASK = "tabular-classification"
HONEST = [
    {"id": "bank-a", "kind": "bank", "customers": 200},
    {"id": "bank-b", "kind": "bank", "customers": 160, "format": "parquet"},
]
CORRUPTING = {
    "nan": "non-finite values",
    "inf": "non-finite values",
    "wrong-shape": "shape",
    "missing-keys": "missing tensors",
    "scaled": "update norm",
    "oversized": "payload of",
    "error": "injected fault",
    "crash": "process died during training",
}


@dataclass(frozen=True)
class Run:
    directory: Path
    output: str
    summary: dict[str, Any]
    rows: list[dict[str, str]]


def _simulate(root: Path, name: str, sites: list[dict[str, Any]], **task: Any) -> Run:
    document = {
        "name": name,
        "seed": 5,
        "tasks": {TASK: {"rounds": 2, "batch_size": 32, "learning_rate": 0.1, **task}},
        "sites": sites,
    }
    scenario = root / f"{name}.toml"
    scenario.write_text(tomli_w.dumps(document))
    data = root / f"{name}-data"
    for site in sites:  # fixed person-key salts: the same held-out people in every run
        state = data / "sites" / site["id"] / "state"
        state.mkdir(parents=True)
        (state / SALT_FILE).write_bytes(hashlib.sha256(site["id"].encode()).digest())
    run_dir = root / f"{name}-run"
    result = CliRunner().invoke(
        cli,
        ["simulate", str(scenario), "--out", str(run_dir), "--data-dir", str(data)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((run_dir / "summary.json").read_text())
    return Run(run_dir, result.output, summary, rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def honest_run(root: Path) -> Run:
    return _simulate(root, "honest", HONEST)


@pytest.fixture(scope="module")
def corrupted_run(root: Path) -> Run:
    faulty = [
        {"id": f"bank-{kind}", "kind": "bank", "customers": 120, "behaviour": {"kind": kind}}
        for kind in CORRUPTING
    ]
    return _simulate(root, "corrupted", HONEST + faulty)


@pytest.fixture(scope="module")
def straggler_run(root: Path) -> Run:
    slow = {
        "id": "bank-slow",
        "kind": "bank",
        "customers": 120,
        "behaviour": {"kind": "slow", "delay": 30},
    }
    return _simulate(root, "straggler", [*HONEST, slow], round_timeout=20)


def _train_rows(run: Run, site: str) -> list[dict[str, str]]:
    return [row for row in run.rows if row["site"] == site and row["phase"] == "train"]


def _honest_accuracy(run: Run) -> float:
    final = [
        float(row["accuracy"])
        for row in run.rows
        if row["phase"] == "evaluate"
        and row["round"] == "2"
        and row["site"] in ("bank-a", "bank-b")
    ]
    assert len(final) == 2
    return sum(final) / 2


def _assert_matches_honest_run(run: Run, honest: Run) -> None:
    task = run.summary["tasks"][TASK]
    assert task["rounds_completed"] == 2
    assert task["failed_rounds"] == []
    for server_round in ("1", "2"):
        accepted = {
            row["site"]
            for row in run.rows
            if row["phase"] == "train"
            and row["status"] == "accepted"
            and row["round"] == server_round
        }
        assert accepted == {"bank-a", "bank-b"}
    aggregated = [r["examples"] for r in _train_rows(run, "all")]
    assert aggregated == [r["examples"] for r in _train_rows(honest, "all")]
    assert abs(_honest_accuracy(run) - _honest_accuracy(honest)) <= 0.15


@pytest.mark.parametrize("kind", sorted(CORRUPTING))
def test_each_faulty_site_is_excluded_with_its_reason(
    corrupted_run: Run, honest_run: Run, kind: str
) -> None:
    site = f"bank-{kind}"
    rows = _train_rows(corrupted_run, site)
    assert [row["round"] for row in rows] == ["1", "2"]
    expected_status = "failed" if kind in ("error", "crash") else "rejected"
    for row in rows:
        assert row["status"] == expected_status
        assert CORRUPTING[kind] in row["reason"]
        assert "\n" not in row["reason"]
    assert corrupted_run.summary["sites"][site]["updates_excluded"] == 2
    assert site in corrupted_run.output  # the console log names the site


def test_corrupted_run_completes_from_the_honest_sites(corrupted_run: Run, honest_run: Run) -> None:
    _assert_matches_honest_run(corrupted_run, honest_run)
    excluded = corrupted_run.summary["tasks"][TASK]["excluded_updates"]
    assert excluded == {"refused": 0, "rejected": 12, "failed": 4, "timed-out": 0}


def test_a_crashed_site_spends_no_budget_on_the_update_it_never_sent(corrupted_run: Run) -> None:
    assert corrupted_run.summary["sites"]["bank-crash"]["epsilon_spent"] == 0.0
    assert corrupted_run.summary["sites"]["bank-error"]["epsilon_spent"] == 0.0
    # A site whose update was rejected did train: its ledger says so.
    assert corrupted_run.summary["sites"]["bank-nan"]["epsilon_spent"] > 0


def test_a_straggler_is_recorded_as_timed_out_and_skipped(
    straggler_run: Run, honest_run: Run
) -> None:
    rows = _train_rows(straggler_run, "bank-slow")
    assert [(row["round"], row["status"]) for row in rows] == [
        ("1", "timed-out"),
        ("2", "timed-out"),
    ]
    assert "no reply within 20 s" in rows[0]["reason"]
    assert "timed-out" in straggler_run.output
    _assert_matches_honest_run(straggler_run, honest_run)


def _coordinator_entries(run: Run) -> list[dict[str, Any]]:
    return read_entries(run.directory / "audit" / f"coordinator-{TASK}.jsonl")


def test_every_rejected_update_and_failure_is_audited(corrupted_run: Run) -> None:
    """A malformed update is rejected *and* audited (hash, reported numbers, reason),
    and the trail of a run full of faults still verifies."""
    reports = verify_path(corrupted_run.directory)
    assert len(reports) == 1 + len(HONEST) + len(CORRUPTING)
    assert all(r.verification.ok for r in reports), [
        f"{r.path.name}: {r.verification.first_problem}" for r in reports if not r.verification.ok
    ]
    entries = _coordinator_entries(corrupted_run)
    received = [e["data"] for e in entries if e["event"] == "update-received"]
    excluded = [e["data"] for e in entries if e["event"] == "site-excluded"]
    for kind, reason in CORRUPTING.items():
        site = f"bank-{kind}"
        if kind in ("error", "crash"):
            failures = [d for d in excluded if d["site"] == site and d["phase"] == "train"]
            assert [d["status"] for d in failures] == ["failed", "failed"]
            assert all(reason in d["reason"] for d in failures)
            continue
        updates = [d for d in received if d["site"] == site]
        assert [(d["round"], d["status"]) for d in updates] == [(1, "rejected"), (2, "rejected")]
        assert all(reason in d["reason"] and d["update_sha256"] for d in updates)
    accepted = {(d["round"], d["site"]) for d in received if d["status"] == "accepted"}
    assert accepted == {(r, s) for r in (1, 2) for s in ("bank-a", "bank-b")}


def test_reconcile_shows_what_the_faults_did_to_the_updates(corrupted_run: Run) -> None:
    """The site logged the update it trained; the fault changed it on the way out, so
    the coordinator rejected a different update: a note, since nothing was aggregated.
    An honest site reconciles exactly."""
    coordinator = _coordinator_entries(corrupted_run)
    honest = reconcile(coordinator, read_entries(_site_log(corrupted_run, "bank-a")))
    assert honest.ok and honest.matched == 2 and not honest.notes
    scaled = reconcile(coordinator, read_entries(_site_log(corrupted_run, "bank-scaled")))
    assert scaled.ok and scaled.matched == 0
    assert len(scaled.notes) == 2 and all("rejected" in note for note in scaled.notes)
    crashed = reconcile(coordinator, read_entries(_site_log(corrupted_run, "bank-crash")))
    assert crashed.ok and crashed.matched == 0  # it never logged an update sent


def test_a_straggler_is_audited_as_timed_out(straggler_run: Run) -> None:
    entries = _coordinator_entries(straggler_run)
    timed_out = [
        e["data"]
        for e in entries
        if e["event"] == "site-excluded" and e["data"]["site"] == "bank-slow"
    ]
    assert [(d["round"], d["status"]) for d in timed_out if d["phase"] == "train"] == [
        (1, "timed-out"),
        (2, "timed-out"),
    ]
    # The straggler did train and log its update; it arrived after the round closed.
    late = reconcile(entries, read_entries(_site_log(straggler_run, "bank-slow")))
    assert late.ok
    assert any("timed-out" in note for note in late.notes)


def _site_log(run: Run, site: str) -> Path:
    return run.directory / "audit" / "sites" / f"{site}.jsonl"


@pytest.fixture(scope="module")
def late_introduction_run(root: Path) -> Run:
    """A site that answers the coordinator's introduction after the run's first wait for
    it (server/introductions.py's FIRST_WAIT): busy, or on a loaded machine."""
    late = {
        "id": "bank-late",
        "kind": "bank",
        "customers": 120,
        "behaviour": {"kind": "slow-introduction", "delay": FIRST_WAIT + 5},
    }
    return _simulate(root, "late", [*HONEST, late], round_timeout=120)


def test_a_site_slow_to_introduce_itself_is_introduced_when_it_answers(
    late_introduction_run: Run,
) -> None:
    run = late_introduction_run
    task = run.summary["tasks"][TASK]
    assert task["rounds_completed"] == 2
    assert task["excluded_updates"] == {"refused": 0, "rejected": 0, "failed": 0, "timed-out": 0}
    assert {row["site"] for row in run.rows if row["status"] == "accepted"} == {
        "bank-a",
        "bank-b",
        "bank-late",
    }
    entries = _coordinator_entries(run)
    joined = [e["data"]["site"] for e in entries if e["event"] == "site-joined"]
    assert sorted(joined) == ["bank-a", "bank-b", "bank-late"]
    # It answered after the run's start was recorded; its audit key is in the log all
    # the same, so its own log is vouched for (in a deployment with a site registry it
    # takes no round before it shows that key: server/identity.py).
    events = [(e["event"], e["data"].get("site")) for e in entries]
    assert events.index(("site-joined", "bank-late")) > events.index(("run-started", None))
    reports = verify_path(run.directory)
    assert all(r.verification.ok for r in reports)
    late = reconcile(entries, read_entries(_site_log(run, "bank-late")))
    assert late.ok and late.matched == 2
    assert "audit trail: 4 signed logs verified intact" in run.output
