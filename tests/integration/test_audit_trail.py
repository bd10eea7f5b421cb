"""The audit trail a real simulation leaves: verifiable, reconcilable, tied to the
checkpoints, and free of anything that identifies a patient, a customer or a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from client.audit import SITE_AUDIT_LOG
from common.adapters import adapter_sha256
from common.audit.chain import entry_digest, seal
from common.audit.log import read_entries
from common.audit.reconcile import reconcile
from common.audit.review import verify_path
from common.cli import cli
from tests.integration.conftest import CONSOLE_OUTPUT

pytestmark = pytest.mark.slow

TASK_SITES = {
    "dicom-classification": ("hospital-a", "hospital-b"),
    "tabular-classification": ("bank-a", "bank-b"),
}


def _coordinator_log(run_dir: Path, task: str) -> Path:
    return run_dir / "audit" / f"coordinator-{task}.jsonl"


def _site_log(run_dir: Path, site: str) -> Path:
    return run_dir / "audit" / "sites" / f"{site}.jsonl"


def test_every_log_of_the_run_verifies(finished_run: Path) -> None:
    reports = verify_path(finished_run)
    assert sorted(r.path.name for r in reports) == sorted(
        [f"coordinator-{task}.jsonl" for task in TASK_SITES]
        + [f"{site}.jsonl" for sites in TASK_SITES.values() for site in sites]
    )
    assert all(r.verification.ok for r in reports), [
        str(r.verification.first_problem) for r in reports
    ]
    # Site keys are pinned by the coordinator's log, not taken from the site's own log.
    assert all(
        "coordinator recorded" in r.key_source for r in reports if r.path.parent.name == "sites"
    )
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["audit"] == {
        "logs": 6,
        "intact": True,
        "problems": [],
        "report": "audit/report.html",
    }
    result = CliRunner().invoke(cli, ["audit", "verify", str(finished_run)])
    assert result.exit_code == 0, result.output


def test_the_coordinator_log_tells_the_whole_run(finished_run: Path) -> None:
    for task, sites in TASK_SITES.items():
        entries = read_entries(_coordinator_log(finished_run, task))
        events = [e["event"] for e in entries]
        assert events[:2] == ["log-opened", "run-started"]
        assert events[-1] == "run-finished"
        started = entries[1]["data"]
        assert started["task"] == task and started["planned_rounds"] == 2
        assert sorted(started["sites"]) == sorted(sites)
        assert len(started["config_sha256"]) == len(started["base_model_sha256"]) == 64
        assert events.count("site-joined") == 2
        received = [e["data"] for e in entries if e["event"] == "update-received"]
        assert len(received) == 4 and {r["status"] for r in received} == {"accepted"}
        assert all(r["epsilon"] > 0 and r["examples"] > 0 and r["norm"] > 0 for r in received)
        assert events.count("evaluation") == 2
        # The aggregate each round is the checkpointed adapter, bit for bit.
        for aggregated in (e["data"] for e in entries if e["event"] == "aggregation-done"):
            checkpoint = (
                finished_run
                / "checkpoints"
                / task
                / (f"round-{aggregated['round']:04d}.safetensors")
            )
            assert aggregated["adapter_sha256"] == adapter_sha256(load_file(str(checkpoint)))
        # The final adapter is the last round's, or the best's after a rollback.
        finished = entries[-1]["data"]
        summary = json.loads((finished_run / "tasks" / f"{task}.json").read_text())
        assert finished["final_adapter_round"] == summary["final_adapter_round"]
        final_round = f"round-{summary['final_adapter_round']:04d}.safetensors"
        final = load_file(str(finished_run / "checkpoints" / task / final_round))
        assert finished["final_adapter_sha256"] == adapter_sha256(final)


def test_each_site_log_records_its_decisions_data_and_spend(finished_run: Path) -> None:
    for sites in TASK_SITES.values():
        for site in sites:
            entries = read_entries(_site_log(finished_run, site))
            assert {e["actor"] for e in entries} == {site}
            events = [e["event"] for e in entries]
            for event in ("run-joined", "run-planned", "data-summary"):
                assert events.count(event) == 1, (site, event)
            assert events.count("training-done") == 2
            assert events.count("evaluation-done") == 2
            assert events.count("policy-decision") == 4  # train and evaluate, 2 rounds
            done = [e["data"] for e in entries if e["event"] == "training-done"]
            assert done[0]["epsilon_before"] == 0.0
            assert done[1]["epsilon_before"] == pytest.approx(done[0]["epsilon_after"])
            summary = next(e["data"] for e in entries if e["event"] == "data-summary")
            assert summary["records"] > 0 and summary["people"] > 0
            # The run directory holds a copy of the log the site keeps in its state.
            state = finished_run.parent / "data" / "sites" / site / "state" / SITE_AUDIT_LOG
            assert state.read_bytes() == _site_log(finished_run, site).read_bytes()
    summary = next(
        e["data"]
        for e in read_entries(_site_log(finished_run, "hospital-a"))
        if e["event"] == "data-summary"
    )
    assert summary["rejected_records"] == 5  # the corrupt files: counted, never named


def test_reconcile_passes_on_the_run_and_fails_on_an_altered_site_update(
    finished_run: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    for task, sites in TASK_SITES.items():
        coordinator = _coordinator_log(finished_run, task)
        for site in sites:
            result = reconcile(
                read_entries(coordinator), read_entries(_site_log(finished_run, site))
            )
            assert result.ok and result.matched == 2, result.problems
            cli_result = runner.invoke(
                cli, ["audit", "reconcile", str(coordinator), str(_site_log(finished_run, site))]
            )
            assert cli_result.exit_code == 0, cli_result.output

    # The site's operator rewrites the hash of round 2's update in the site's log, and
    # even re-seals the entry and every entry after it with the site's own key.
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    site_log = _site_log(copy, "bank-a")
    key_path = finished_run.parent / "data" / "sites" / "bank-a" / "state" / "audit-key.pem"
    from common.signing import load_private_key

    key = load_private_key(key_path)
    entries = read_entries(site_log)
    target = max(i for i, e in enumerate(entries) if e["event"] == "training-done")
    entries[target]["data"]["update_sha256"] = "0" * 64
    for index in range(target, len(entries)):
        body = {k: entries[index][k] for k in ("seq", "time", "actor", "event", "data")}
        entries[index] = seal(key, **body, prev=entries[index - 1]["hash"])
        assert entries[index]["hash"] == entry_digest(entries[index])
    site_log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = runner.invoke(
        cli,
        [
            "audit",
            "reconcile",
            str(_coordinator_log(copy, "tabular-classification")),
            str(site_log),
        ],
    )
    assert result.exit_code == 1
    assert "round 2" in result.output and "hash" in result.output
    # …and verification catches the rewrite against the signed head.
    verified = runner.invoke(cli, ["audit", "verify", str(site_log)])
    assert verified.exit_code == 1 and "head" in verified.output


def _dicom_identifiers(data_root: Path) -> tuple[set[str], set[str]]:
    """(what the DICOM headers say about patients, the DICOM files' names)."""
    people: set[str] = set()
    files: set[str] = set()
    for site in TASK_SITES["dicom-classification"]:
        data = data_root / "sites" / site / "data"
        for path in data.rglob("*.dcm"):
            files.update((path.name, str(path.relative_to(data))))
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue  # the corrupt files: their names are still collected above
            for keyword in ("PatientName", "PatientID", "AccessionNumber"):
                value = str(getattr(ds, keyword, "") or "")
                if value:
                    people.add(value)
                    people.update(part for part in value.split("^") if len(part) >= 6)
    assert len(people) > 100 and len(files) > 100
    return people, files


def _customer_identifiers(data_root: Path) -> set[str]:
    found: set[str] = set()
    for path in (data_root / "sites").glob("bank-*/data/loans.*"):
        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        found.update(table["customer_id"].astype(str))
        found.update(table["customer_name"].astype(str))
        found.add(path.name)
    assert len(found) > 100
    return found


def test_no_identifier_appears_in_any_log_report_or_output(finished_run: Path) -> None:
    """The DICOM headers carry patient names, IDs and accession numbers and the bank
    tables customer IDs and names: none of them, no data file name and no data path may
    appear in the run directory, the sites' audit logs or what the simulation printed."""
    data_root = finished_run.parent / "data"
    people, files = _dicom_identifiers(data_root)
    identifiers = people | files | _customer_identifiers(data_root)
    identifiers |= {str(data_root / "sites" / s / "data") for s in ("hospital-a", "bank-a")}
    scanned: list[Path] = [
        path
        for path in finished_run.rglob("*")
        if path.is_file() and path.relative_to(finished_run).parts[0] not in ("sites", "federation")
    ]
    scanned += list((data_root / "sites").glob(f"*/state/{SITE_AUDIT_LOG}"))
    scanned.append(finished_run.parent / CONSOLE_OUTPUT)
    assert any(p.name == "report.html" for p in scanned)
    assert any(p.suffix == ".safetensors" for p in scanned)
    needles = [(identifier, identifier.encode("utf-8")) for identifier in identifiers]
    for path in scanned:
        content = path.read_bytes()
        leaked = [text for text, raw in needles if raw in content]
        assert not leaked, f"{path.relative_to(finished_run.parent)} contains {leaked[:5]}"
    # The configs a simulation writes for its sites hold data paths by design, but no
    # person's identifier.
    for path in (finished_run / "sites").glob("*.toml"):
        text = path.read_text()
        assert not [person for person in people if person in text]
