"""The end-of-run summary a researcher reads first: narrow, complete, and explicit about
every excluded update and injected fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from server.run_report import print_summary


def _summary() -> dict[str, Any]:
    task = {
        "aggregator": "trimmed-mean",
        "rounds_completed": 10,
        "rounds_planned": 10,
        "final": {"accuracy": 0.8654, "loss": 0.582},
        "sites": ["bank-1", "bank-5"],
        "excluded_updates": {"refused": 1, "rejected": 2, "failed": 0, "timed-out": 1},
        "rollbacks": [{"round": 4, "kept_round": 3, "reason": "…"}],
        "artifact": {
            "verified": True,
            "checked": True,
            "directory": "artifacts/tabular-classification",
            "int8_bytes": 66_000,
            "fp32_bytes": 100_000,
            "metrics": {"fp32": {"accuracy": 0.8654}, "int8": {"accuracy": 0.8641}},
            "installed": ["bank-1"],
            "check_failures": {},
            "install_failures": {"bank-5": "bad-signature: manifest.sig is not valid"},
        },
    }
    site = {
        "examples": 968,
        "rounds_trained": 10,
        "rounds_refused": 0,
        "updates_excluded": 0,
        "epsilon_spent": 8.0,
        "epsilon_budget": 80.0,
        "delta": 1e-5,
        "behaviour": None,
    }
    faulty = {
        **site,
        "updates_excluded": 3,
        "behaviour": {"kind": "scaled", "factor": 1000.0, "delay": 0.0, "from_round": 3},
    }
    return {
        "scenario": "robustness",
        "wall_seconds": 78.0,
        "tasks": {"tabular-classification": task},
        "sites": {"bank-1": site, "bank-5": faulty},
        "audit": {"logs": 3, "intact": True, "problems": [], "report": "audit/report.html"},
    }


def test_summary_fits_80_columns_and_names_exclusions_and_faults() -> None:
    console = Console(width=80, record=True)
    print_summary(_summary(), Path("runs/x"), console)
    text = console.export_text()
    assert "…" not in text  # nothing truncated at 80 columns
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "trimmed-mean" in text and "0.865" in text and "10/10" in text
    assert "injected faults: bank-5 (scaled ×1000 from round 3)" in text
    assert "tabular-classification: 1 refused, 2 rejected, 1 timed-out" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert rows["excluded"].split("│")[2].strip() == "3"  # rejected + failed + timed out
    assert rows["rollbacks"].split("│")[2].strip() == "1"
    assert "audit trail: 3 signed logs verified intact" in text


def test_a_broken_audit_trail_is_named_in_the_summary() -> None:
    summary = _summary()
    summary["audit"] = {
        "logs": 3,
        "intact": False,
        "problems": ["bank-5.jsonl: line 4: entry 3 was edited"],
        "report": "audit/report.html",
    }
    console = Console(width=80, record=True)
    print_summary(summary, Path("runs/x"), console)
    text = " ".join(console.export_text().split())
    assert "audit trail: NOT intact" in text and "bank-5.jsonl: line 4" in text
    assert "verified intact" not in text


def test_an_honest_run_prints_no_fault_or_exclusion_lines() -> None:
    summary = _summary()
    summary["tasks"]["tabular-classification"]["excluded_updates"] = dict.fromkeys(
        ("refused", "rejected", "failed", "timed-out"), 0
    )
    summary["sites"]["bank-5"]["behaviour"] = None
    console = Console(width=80, record=True)
    print_summary(summary, Path("runs/x"), console)
    text = console.export_text()
    assert "injected faults" not in text
    assert "tabular-classification:" not in text


def test_the_artifact_rows_and_the_sites_that_did_not_take_it() -> None:
    console = Console(width=80, record=True)
    print_summary(_summary(), Path("runs/x"), console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert rows["artifact"].split("│")[2].strip() == "verified"
    assert rows["size int8/fp32"].split("│")[2].strip() == "0.66"
    assert rows["acc fp32→int8"].split("│")[2].strip() == "0.865→0.864"
    assert rows["installed at"].split("│")[2].strip() == "1/2 sites"
    assert "tabular-classification artifact: runs/x/artifacts/tabular-classification" in text
    assert "bank-5 did not take the artifact: bad-signature" in " ".join(text.split())


def test_an_artifact_that_was_not_released_says_why() -> None:
    summary = _summary()
    summary["tasks"]["tabular-classification"]["artifact"] = {
        "verified": False,
        "problem": "not released (no site could check it)",
        "installed": [],
        "check_failures": {"bank-1": "no-trusted-key: site bank-1 has no coordinator_key"},
        "install_failures": {},
    }
    console = Console(width=80, record=True)
    print_summary(summary, Path("runs/x"), console)
    text = " ".join(console.export_text().split())
    assert "artifact │ not released" in text
    assert "tabular-classification artifact: not released (no site could check it)" in text
    assert "bank-1 did not take the artifact: no-trusted-key" in text
