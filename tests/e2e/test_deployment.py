"""The deployment, end to end with fedlora's commands: `fedlora pki` makes the keys
(each site makes its own and hands over only public keys), `fedlora coordinator start`
runs a real flower-superlink over TLS with node authentication, each site runs a real
flower-supernode through `fedlora site run`, and `fedlora coordinator run` drives the
runs with `flwr run`. Two hospitals and one bank on loopback.

The tests share one deployment and run in order: a full run, refused nodes, a SuperNode
killed in round 1, and a SuperLink killed mid-run and resumed.
"""

from __future__ import annotations

import csv
import json
import socket
import ssl
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from common.adapters import adapter_sha256
from common.artifact import verify_artifact
from common.audit.log import read_entries
from common.audit.review import verify_path
from common.config import DPSettings, load_federation_config, load_site_config
from common.signing import load_public_key
from server.checkpoint import CheckpointStore
from simulations.runner import prepare
from simulations.scenario import Scenario
from tests.e2e.fedlora_deployment import (
    FEDLORA,
    FedloraDeployment,
    alive,
    children,
    fedlora,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

IMAGING = "dicom-classification"
TABULAR = "tabular-classification"
SCENARIO = {
    "name": "deployment",
    "seed": 5,
    "image_size": 16,
    "imaging_backbone": {"hidden_size": 64, "layers": 2, "patch_size": 4},
    "tasks": {
        IMAGING: {
            "rounds": 2,
            "batch_size": 16,
            "learning_rate": 0.3,
            "min_sites": 2,
            "dp": {"epsilon_per_run": 4.0},
        },
        TABULAR: {
            "rounds": 2,
            "batch_size": 32,
            "learning_rate": 0.1,
            "min_sites": 1,
            "dp": {"epsilon_per_run": 4.0},
        },
    },
    "sites": [
        {"id": "hospital-a", "kind": "hospital", "patients": 110, "epsilon": 100.0},
        {"id": "hospital-b", "kind": "hospital", "patients": 100, "epsilon": 100.0},
        {"id": "bank-a", "kind": "bank", "customers": 160, "epsilon": 100.0},
    ],
}
SITES = ("hospital-a", "hospital-b", "bank-a")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Data, base models and site configs (a simulation's preparation), then the PKI the
    deployment way: the coordinator's CA, and keys each site made for itself."""
    root = tmp_path_factory.mktemp("deployment")
    prepared = prepare(Scenario.model_validate(SCENARIO), root / "setup", root / "data")
    certs = root / "certs"
    deployment = FedloraDeployment(root / "processes", certs)
    deployment.root.mkdir()
    done = fedlora("pki", "init", "--certs", str(certs), "--address", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    configs: dict[str, Path] = {}
    for task, paths in prepared.site_configs.items():
        for path in paths:
            keys = root / "site-keys" / path.stem
            made = fedlora("pki", "site-keys", str(keys))
            assert made.returncode == 0, made.stderr
            added = fedlora(
                "pki", "add-site", path.stem, "--certs", str(certs),
                "--superlink", deployment.superlink,
                "--node-public-key", str(keys / "node.pub"),
                "--audit-public-key", str(keys / "audit.pub"),
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            assert not (certs / "bundles" / path.stem / "node.key").exists()
            document = path.read_text() + tomli_w.dumps(
                {
                    "connection": {
                        "superlink": deployment.superlink,
                        "ca_certificate": str(certs / "bundles" / path.stem / "ca.pem"),
                        "node_key": str(keys / "node.key"),
                    }
                }
            )
            path.write_text(document)
            configs[path.stem] = path
            assert load_site_config(path).site.task == task
    return {
        "root": root,
        "deployment": deployment,
        "configs": configs,
        "federations": root / "setup" / "federation",
        # The coordinator key the sites pinned when they were configured.
        "signing_key": root / "setup" / "keys" / "coordinator.key",
    }


@pytest.fixture(scope="module")
def running(setup: dict[str, Any]) -> Iterator[FedloraDeployment]:
    deployment: FedloraDeployment = setup["deployment"]
    try:
        deployment.start_coordinator()
        for site, config in setup["configs"].items():
            deployment.start_site(site, config)
        wait_until(
            lambda: deployment.superlink_log().count("Activated node_id") >= len(SITES),
            120,
            "three SuperNodes to authenticate:\n" + deployment.logs(),
        )
        yield deployment
    finally:
        deployment.stop_all()


def _federation(setup: dict[str, Any], task: str, name: str, **changes: Any) -> Path:
    """A variant of the scenario's federation config for one test."""
    federation = load_federation_config(setup["federations"] / f"{task}.toml")
    document = federation.model_copy(update=changes).model_dump(mode="json", exclude_none=True)
    path = setup["root"] / f"{name}.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def _run_command(
    setup: dict[str, Any], deployment: FedloraDeployment, *arguments: str
) -> list[str]:
    return [
        FEDLORA, "coordinator", "run", *arguments,
        "--certs", str(deployment.certs),
        "--state-dir", str(deployment.state_dir),
        "--signing-key", str(setup["signing_key"]),
    ]  # fmt: skip


def _coordinator_log(run_dir: Path, task: str) -> list[dict[str, Any]]:
    return read_entries(run_dir / "audit" / f"coordinator-{task}.jsonl")


def _site_log(setup: dict[str, Any], site: str) -> list[dict[str, Any]]:
    config = load_site_config(setup["configs"][site])
    path = config.site.state_dir / "audit.jsonl"
    return read_entries(path) if path.exists() else []


def test_the_superlink_speaks_tls_under_the_federation_ca(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    context = ssl.create_default_context(cafile=str(running.certs / "ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # Every site's node key is registered, and each SuperNode authenticated with it.
    assert running.superlink_log().count("Activated node_id") >= len(SITES)
    assert "Created node_id" in running.superlink_log()


def test_two_hospitals_and_a_bank_complete_a_two_round_run(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    run_dir = setup["root"] / "run-a"
    command = _run_command(
        setup,
        running,
        str(setup["federations"] / f"{IMAGING}.toml"),
        str(setup["federations"] / f"{TABULAR}.toml"),
        "--out",
        str(run_dir),
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:] + running.logs()

    # The same kind of run directory as a simulation.
    summary = json.loads((run_dir / "summary.json").read_text())
    for task, sites in ((IMAGING, ["hospital-a", "hospital-b"]), (TABULAR, ["bank-a"])):
        entry = summary["tasks"][task]
        assert entry["rounds_completed"] == 2, entry
        assert entry["sites"] == sites
        assert entry["artifact"]["verified"], entry["artifact"]
        assert sorted(entry["artifact"]["installed"]) == sites
        assert (run_dir / "plots" / f"{task}.png").stat().st_size > 0
        assert (run_dir / "adapters" / task / "adapter_model.safetensors").exists()
        verify_artifact(
            run_dir / "artifacts" / task, load_public_key(run_dir / "keys" / "coordinator.pub")
        )
    for site in SITES:
        assert summary["sites"][site]["rounds_trained"] == 2
        assert summary["sites"][site]["kind"] == site.split("-")[0]
    assert summary["audit"]["intact"] and summary["audit"]["logs"] == 2
    assert (run_dir / "metrics.csv").read_text().count("accepted") >= 6
    assert all(report.verification.ok for report in verify_path(run_dir))
    assert "fedlora deployment" in done.stdout


def test_an_unregistered_key_and_a_foreign_ca_are_refused(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    root: Path = setup["root"]
    stranger_keys = root / "stranger-keys"
    assert fedlora("pki", "site-keys", str(stranger_keys)).returncode == 0
    foreign = root / "foreign-certs"
    assert fedlora("pki", "init", "--certs", str(foreign), "--address", "127.0.0.1").returncode == 0

    def attempt(name: str, **connection: str) -> subprocess.CompletedProcess[str]:
        document = tomllib.loads(setup["configs"]["bank-a"].read_text())
        document["site"]["state_dir"] = str(root / f"{name}-state")
        path = root / f"{name}.toml"
        path.write_text(tomli_w.dumps(document))
        arguments = [f"--{key.replace('_', '-')}={value}" for key, value in connection.items()]
        return subprocess.run(
            [FEDLORA, "site", "run", str(path), *arguments],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    stranger = attempt("stranger", node_key=str(stranger_keys / "node.key"))
    assert stranger.returncode == 3, stranger.stderr[-3000:]
    assert "does not know this site's node key" in stranger.stderr
    assert "No SuperNode found with the given public key" in running.superlink_log()

    impostor = attempt("impostor", ca_certificate=str(foreign / "ca.pem"))
    assert impostor.returncode == 3, impostor.stderr[-3000:]
    assert "does not vouch for" in impostor.stderr
    assert "unable to get local issuer certificate" in impostor.stderr
    assert not (root / "impostor-state" / "supernode.log").exists()  # never connected


def test_a_supernode_killed_in_round_one_rejoins_a_later_round(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    run_dir = setup["root"] / "run-b"
    federation = _federation(
        setup, IMAGING, "killed-node", rounds=6, min_sites=1, round_timeout=40.0
    )
    before = len(_site_log(setup, "hospital-a"))
    log = (setup["root"] / "run-b.out").open("w")
    process = subprocess.Popen(
        _run_command(setup, running, str(federation), "--out", str(run_dir)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # hospital-a has accepted round 1 and is training it: kill its SuperNode.
        def training_round_one() -> bool:
            return any(
                e["event"] == "policy-decision"
                and e["data"].get("round") == 1
                and e["data"].get("phase") == "train"
                and e["data"].get("decision") == "accepted"
                for e in _site_log(setup, "hospital-a")[before:]
            )

        wait_until(training_round_one, 300, "hospital-a to start round 1:\n" + running.logs())
        killed = running.kill_child("hospital-a")
        assert process.wait(timeout=900) == 0, (setup["root"] / "run-b.out").read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert not alive(killed)
    # The site daemon started its SuperNode again, which authenticated again.
    assert "starting it again" in running.tail("hospital-a", 20000)
    rows = [r for r in _metrics(run_dir) if r["site"] == "hospital-a" and r["phase"] == "train"]
    first = [r for r in rows if r["round"] == "1"]
    assert first and first[0]["status"] != "accepted", rows
    assert any(r["status"] == "accepted" and int(r["round"]) > 1 for r in rows), rows
    result = json.loads((run_dir / "tasks" / f"{IMAGING}.json").read_text())
    assert result["rounds_completed"] == 6


def test_a_superlink_killed_mid_run_comes_back_and_the_run_resumes(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    run_dir = setup["root"] / "run-c"
    federation = _federation(
        setup,
        IMAGING,
        "restarted-link",
        rounds=3,
        min_sites=1,
        dp=DPSettings(max_grad_norm=1.0, noise_multiplier=1.0, epsilon_per_run=40.0),
    )
    log = (setup["root"] / "run-c.out").open("w")
    first = subprocess.Popen(
        _run_command(setup, running, str(federation), "--out", str(run_dir)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    state = CheckpointStore(run_dir / "checkpoints" / IMAGING)
    try:
        wait_until(
            lambda: state.state_path.exists() and state.load_state().completed_round >= 1,
            600,
            "round 1 to be checkpointed:\n" + running.logs(),
        )
        running.kill_child("coordinator")
        assert running.processes["coordinator"].wait(timeout=60) != 0
        assert first.wait(timeout=180) != 0
    finally:
        if first.poll() is None:
            first.kill()
    out = (setup["root"] / "run-c.out").read_text()
    assert f"--resume {run_dir}" in out
    checkpoint = state.load_state()

    daemons = {site: children(running.processes[site].pid) for site in SITES}
    running.start_coordinator()
    # The SuperNodes come back by themselves: no site daemon was touched.
    wait_until(
        lambda: running.online_nodes() >= len(SITES),
        300,
        "the SuperNodes to reconnect:\n" + running.logs(),
    )
    resumed = subprocess.run(
        _run_command(setup, running, "--resume", str(run_dir)),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:] + running.logs()

    entries = _coordinator_log(run_dir, IMAGING)
    (event,) = [e["data"] for e in entries if e["event"] == "run-resumed"]
    assert event["from_round"] == checkpoint.completed_round
    # The resumed global adapter is bit-identical to the checkpoint it resumed from.
    saved = state.load(checkpoint.adapter_round)
    assert event["adapter_sha256"] == adapter_sha256(saved) == checkpoint.adapter_sha256
    started = next(e["data"] for e in entries if e["event"] == "run-started")
    assert event["run_id"] == started["run"]
    rounds = sorted({e["data"]["round"] for e in entries if e["event"] == "aggregation-done"})
    assert rounds[-1] == 3
    assert entries[-1]["event"] == "run-finished"
    result = json.loads((run_dir / "tasks" / f"{IMAGING}.json").read_text())
    assert result["rounds_completed"] >= 2 and result["rounds_planned"] == 3
    # Both hospitals trained after the restart, through the same SuperNode processes.
    for site in ("hospital-a", "hospital-b"):
        assert any(
            r["site"] == site
            and r["phase"] == "train"
            and r["status"] == "accepted"
            and int(r["round"]) > checkpoint.completed_round
            for r in _metrics(run_dir)
        ), site
    assert {site: children(running.processes[site].pid) for site in SITES} == daemons
    assert (run_dir / "summary.json").exists()
    assert all(report.verification.ok for report in verify_path(run_dir))
    # The sites kept one privacy plan for the run across the two Flower runs.
    for site in ("hospital-a", "hospital-b"):
        planned = [e for e in _site_log(setup, site) if e["event"] == "run-planned"]
        assert [e["data"]["run"] for e in planned].count(started["run"]) == 1


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_site_daemons_stop_cleanly_on_sigterm(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    daemons = {name: children(running.processes[name].pid) for name in SITES}
    for name in SITES:
        assert running.stop(name) == 0, running.tail(name)
        assert "stopped" in running.tail(name, 500)
    for name, pids in daemons.items():
        assert pids and not any(alive(pid) for pid in pids), name
