"""A deployment run leaves the same audit trail as a simulation: real flower-superlink
and flower-supernode processes on loopback, `flwr run` of this project's app, and the
coordinator's and sites' signed logs checked afterwards.

(TLS and SuperNode authentication belong to the deployment issue; this run is on
loopback without them.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from common.artifact import verify_artifact
from common.audit.log import read_entries, verify_log
from common.audit.reconcile import reconcile
from common.audit.review import site_keys, verify_path
from common.config import load_site_config
from common.signing import load_public_key
from simulations.runner import prepare
from simulations.scenario import Scenario
from tests.e2e.deployment import deployment

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TASK = "tabular-classification"
SCENARIO = {
    "name": "deployment",
    "seed": 11,
    "tasks": {TASK: {"rounds": 2, "batch_size": 32, "learning_rate": 0.1}},
    "sites": [
        {"id": "bank-north", "kind": "bank", "customers": 160},
        {"id": "bank-south", "kind": "bank", "customers": 140, "format": "parquet"},
    ],
}


def test_a_deployment_run_leaves_verifiable_logs_at_coordinator_and_sites(
    tmp_path: Path,
) -> None:
    prepared = prepare(Scenario.model_validate(SCENARIO), tmp_path / "setup", tmp_path / "data")
    run_dir = tmp_path / "coordinator-run"
    with deployment(tmp_path / "processes") as engine:
        engine.start_superlink()
        for path in prepared.site_configs[TASK]:
            engine.start_supernode(path.stem, path)
        result = engine.run(
            {
                "federation-config": str(tmp_path / "setup" / "federation" / f"{TASK}.toml"),
                "run-dir": str(run_dir),
                # The coordinator key the sites pinned when they were configured.
                "signing-key": str(tmp_path / "setup" / "keys" / "coordinator.key"),
            }
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr + engine.logs()

    # The coordinator's log, in the run directory, verifies against the run's key.
    (report,) = verify_path(run_dir)
    assert report.verification.ok, report.verification.findings
    coordinator = read_entries(report.path)
    started = next(e["data"] for e in coordinator if e["event"] == "run-started")
    assert sorted(started["sites"]) == ["bank-north", "bank-south"]
    assert [e["event"] for e in coordinator][-1] == "run-finished"
    vouched = site_keys(coordinator)

    # Each site's log stays at the site; it is signed by the key the coordinator recorded,
    # records the same run, and reconciles with the coordinator's log.
    for path in prepared.site_configs[TASK]:
        config = load_site_config(path)
        log = config.site.state_dir / "audit.jsonl"
        verification = verify_log(log)
        assert verification.ok, verification.findings
        assert verification.key == vouched[config.site.id]
        entries = read_entries(log)
        joined = next(e["data"] for e in entries if e["event"] == "run-joined")
        assert joined["run"] == started["run"]
        outcome = reconcile(coordinator, entries)
        assert outcome.ok and outcome.matched == 2, outcome.problems
        # The artifact reached the site through the SuperNode, was checked and installed.
        installed = verify_artifact(
            config.site.installed_artifacts / TASK,
            load_public_key(run_dir / "keys/coordinator.pub"),
        )
        released = (run_dir / "artifacts" / TASK / "manifest.json").read_bytes()
        assert installed.manifest_sha256 == hashlib.sha256(released).hexdigest()
        assert {"artifact-checked", "artifact-installed"} <= {e["event"] for e in entries}
