"""`fedlora simulate` ends with a verified, site-checked artifact per task, installed at
every participating site, and both ends of the trail record it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from client.site import Site
from common.artifact import MANIFEST, MODEL_INT8, verify_artifact
from common.audit.log import read_entries
from common.cli import cli
from common.config import load_site_config
from common.inference import OnnxClassifier
from common.signing import load_public_key

pytestmark = pytest.mark.slow

TASK_SITES = {
    "dicom-classification": ("hospital-a", "hospital-b"),
    "tabular-classification": ("bank-a", "bank-b"),
}


def _artifact(run_dir: Path, task: str) -> Path:
    return run_dir / "artifacts" / task


def _key(run_dir: Path) -> Path:
    return run_dir / "keys" / "coordinator.pub"


def test_each_task_ends_with_a_verified_checked_artifact(finished_run: Path) -> None:
    for task, sites in TASK_SITES.items():
        result = CliRunner().invoke(
            cli, ["artifact", "verify", str(_artifact(finished_run, task)), "--trust-run-key"]
        )
        assert result.exit_code == 0, result.output
        verified = verify_artifact(
            _artifact(finished_run, task), load_public_key(_key(finished_run))
        )
        manifest = verified.manifest
        assert manifest.task == task and manifest.metrics is not None
        assert manifest.metrics.sites == sorted(sites)
        summary = json.loads((finished_run / "tasks" / f"{task}.json").read_text())
        assert manifest.base_model_sha256 == summary["base_model_sha256"]
        reported = {s.site: s for s in manifest.sites}
        assert sorted(reported) == sorted(summary["site_privacy"])
        for site, record in summary["site_privacy"].items():
            assert reported[site].epsilon == pytest.approx(record["epsilon"])
            assert reported[site].accountant == "prv"
        assert manifest.training["final_adapter_round"] == summary["final_adapter_round"]
        # int8 really is smaller than the fp32 export of the same model.
        fp32 = finished_run / "exports" / task / "model.fp32.onnx"
        assert manifest.quantization.fp32_onnx_bytes == fp32.stat().st_size
        assert manifest.files[MODEL_INT8].bytes < 0.7 * fp32.stat().st_size


def test_the_manifest_cites_the_coordinator_log_and_the_log_cites_the_manifest(
    finished_run: Path,
) -> None:
    for task in TASK_SITES:
        manifest_bytes = (_artifact(finished_run, task) / MANIFEST).read_bytes()
        manifest = json.loads(manifest_bytes)
        entries = read_entries(finished_run / "audit" / f"coordinator-{task}.jsonl")
        cited = entries[manifest["audit"]["seq"]]
        assert cited["hash"] == manifest["audit"]["hash"]
        assert cited["event"] == "artifact-check-done"
        assert cited["data"]["int8"]["accuracy"] == manifest["metrics"]["int8"]["accuracy"]
        signed = [e["data"] for e in entries if e["event"] == "artifact-signed"]
        assert signed == [
            {
                "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "audit_seq": manifest["audit"]["seq"],
            }
        ]
        events = [e["event"] for e in entries]
        assert events.index("artifact-exported") < events.index("artifact-signed")
        assert events[-1] == "run-finished"
        installed = [e["data"] for e in entries if e["event"] == "artifact-installed"]
        assert sorted(d["site"] for d in installed) == sorted(TASK_SITES[task])
        assert {d["status"] for d in installed} == {"installed"}


def test_every_site_installed_the_same_signed_artifact(finished_run: Path) -> None:
    key = load_public_key(_key(finished_run))
    for task, sites in TASK_SITES.items():
        released = verify_artifact(_artifact(finished_run, task), key)
        for site in sites:
            config = load_site_config(finished_run / "sites" / f"{site}.toml")
            assert config.site.coordinator_key == _key(finished_run)
            installed = config.site.installed_artifacts / task
            copy = verify_artifact(installed, key)
            assert copy.manifest_sha256 == released.manifest_sha256
            assert (installed / "preprocessing.json").is_file()
            events = {
                e["event"]: e["data"]
                for e in read_entries(finished_run / "audit" / "sites" / f"{site}.jsonl")
                if e["event"].startswith("artifact-")
            }
            assert events["artifact-installed"]["manifest_sha256"] == released.manifest_sha256
            assert "artifact-refused" not in events
            # The site checked the unchecked draft: a different manifest, same model.
            checked = events["artifact-checked"]
            assert checked["manifest_sha256"] != released.manifest_sha256
            assert 0.0 <= checked["int8"]["accuracy"] <= 1.0


def test_int8_agrees_with_fp32_on_held_out_records(finished_run: Path) -> None:
    for task, sites in TASK_SITES.items():
        fp32 = OnnxClassifier(finished_run / "exports" / task / "model.fp32.onnx")
        int8 = OnnxClassifier(_artifact(finished_run, task) / MODEL_INT8)
        for site in sites:
            holdout = Site(load_site_config(finished_run / "sites" / f"{site}.toml")).load_data()
            features = holdout.holdout.features
            agreement = np.mean(fp32.logits(features).argmax(1) == int8.logits(features).argmax(1))
            assert agreement >= 0.95, (task, site, agreement)


def test_the_summary_reports_the_artifacts(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    for task, sites in TASK_SITES.items():
        artifact = summary["tasks"][task]["artifact"]
        assert artifact["verified"] and artifact["checked"]
        assert sorted(artifact["installed"]) == sorted(sites)
        assert artifact["int8_bytes"] < artifact["fp32_bytes"]
    console = (finished_run.parent / "console.txt").read_text()
    assert "installed at" in console and "2/2 sites" in console


def test_a_tampered_copy_fails_verification(finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(_artifact(finished_run, "tabular-classification"), copy)
    model = copy / MODEL_INT8
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = CliRunner().invoke(
        cli, ["artifact", "verify", str(copy), "--key", str(_key(finished_run))]
    )
    assert result.exit_code == 1
    assert "hash-mismatch" in result.output


def test_the_manifest_names_no_local_path(finished_run: Path) -> None:
    for task in TASK_SITES:
        text = (_artifact(finished_run, task) / MANIFEST).read_text()
        assert str(finished_run.parent) not in text
        assert "/tmp" not in text and "hospital-a/" not in text
