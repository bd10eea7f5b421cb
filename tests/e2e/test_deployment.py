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
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fastapi.routing import APIRoute
from flwr.supercore.routers.runtime.router import create_runtime_router
from flwr.superlink.routers.control.router import router as control

from common.adapters import adapter_sha256
from common.artifact import verify_artifact
from common.audit.log import read_entries
from common.audit.review import site_keys, verify_path
from common.config import DPSettings, RollbackGuard, load_federation_config, load_site_config
from common.signing import fingerprint, load_public_key
from server.checkpoint import CheckpointStore
from simulations.runner import prepare
from simulations.scenario import Scenario
from tests.e2e.deployment import BIN, PROJECT_ROOT
from tests.e2e.fedlora_deployment import (
    FEDLORA,
    FedloraDeployment,
    alive,
    children,
    fedlora,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SOCKET_WATCH = Path(__file__).parent / "socket_watch"

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


def _tabular_base_from_the_banks_schema(root: Path, bank_configs: list[Path]) -> None:
    """The tabular base made as the README's step 0 says (`fedlora model init` from a
    bank's [data] schema), named by the banks' configs and the task's federation."""
    base = root / "models" / TABULAR
    made = fedlora("model", "init", TABULAR, "--site", str(bank_configs[0]), "--out", str(base))
    assert made.returncode == 0, made.stderr
    assert f'base_model = "{base}"' in made.stdout and "SHA-256: " in made.stdout
    federation = root / "setup" / "federation" / f"{TABULAR}.toml"
    for path in [*bank_configs, federation]:
        document = tomllib.loads(path.read_text())
        document.get("site", document)["base_model"] = str(base)
        path.write_text(tomli_w.dumps(document))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Data, base models and site configs (a simulation's preparation), then the PKI the
    deployment way: the coordinator's CA, and keys each site made for itself."""
    root = tmp_path_factory.mktemp("deployment")
    prepared = prepare(Scenario.model_validate(SCENARIO), root / "setup", root / "data")
    _tabular_base_from_the_banks_schema(root, prepared.site_configs[TABULAR])
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
            bundle = certs / "bundles" / path.stem
            assert not (bundle / "node.key").exists()
            # The site config as the README has the operator write it: the template's
            # settings with signing_key set, then the bundle's connection.toml appended
            # with its node_key line filled in.
            document = tomllib.loads(path.read_text())
            del document["site"]["coordinator_key"]  # the bundle's is the one to trust
            document["site"]["signing_key"] = str(keys / "audit-key.pem")
            connection = (bundle / "connection.toml").read_text()
            placeholder = '# node_key = "/path/to/node.key"'
            assert placeholder in connection
            filled = connection.replace(
                placeholder, f"node_key = {json.dumps(str(keys / 'node.key'))}"
            )
            path.write_text(tomli_w.dumps(document) + "\n" + filled)
            configs[path.stem] = path
            assert load_site_config(path).site.task == task
    # The coordinator publishes the release it runs; each site reviews it and pins it.
    release = _publish(root / "release", certs)
    for path in configs.values():
        _pin(path, release)
    return {
        "root": root,
        "deployment": deployment,
        "configs": configs,
        "federations": root / "setup" / "federation",
        "release": release,
    }


def _publish(folder: Path, certs: Path, *app: str) -> Path:
    """`fedlora coordinator release` of this app (or ``--app DIR``): its release.json."""
    done = fedlora("coordinator", "release", "--certs", str(certs), "--out", str(folder), *app)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder / "release.json"


def _pin(site_config: Path, release: Path) -> list[str]:
    """What a site operator does after review: `fedlora site release … --release`, then
    the [policy] line it prints goes into the site config. Returns the pins."""
    shown = fedlora("site", "release", str(site_config), "--release", str(release))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "signature valid" in shown.stdout
    line = next(text.strip() for text in shown.stdout.splitlines() if "client_releases =" in text)
    pins = list(tomllib.loads(line)["client_releases"])
    document = tomllib.loads(site_config.read_text())
    document.setdefault("policy", {})["client_releases"] = pins
    site_config.write_text(tomli_w.dumps(document))
    return pins


@pytest.fixture(scope="module")
def watched(setup: dict[str, Any]) -> Iterator[dict[str, Path]]:
    """Every process of the deployment runs with a HOME of its own and the socket watch
    (tests/e2e/socket_watch): what any of them looks up or dials off loopback is
    recorded, and what onnxruntime's telemetry would queue lands in that HOME."""
    root: Path = setup["root"]
    paths = {"home": root / "home", "sockets": root / "sockets.log"}
    paths["home"].mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(paths["home"]))
        patch.setenv("FEDLORA_SOCKET_WATCH", str(paths["sockets"]))
        patch.setenv(
            "PYTHONPATH",
            os.pathsep.join(filter(None, [str(SOCKET_WATCH), os.environ.get("PYTHONPATH")])),
        )
        yield paths


@pytest.fixture(scope="module")
def running(setup: dict[str, Any], watched: dict[str, Path]) -> Iterator[FedloraDeployment]:
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


def _outsider_cli(root: Path, deployment: FedloraDeployment) -> dict[str, str]:
    """Mallory's Flower CLI: pointed at the address the sites dial, trusting the public
    ca.pem, holding no key of the federation."""
    home = root / "mallory-home"
    home.mkdir(exist_ok=True)
    connection = {
        "address": deployment.superlink,
        "root-certificates": str(deployment.certs / "ca.pem"),
    }
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "target", "target": connection}})
    )
    return {**os.environ, "FLWR_HOME": str(home)}


def _evil_app(folder: Path, markers: Path) -> Path:
    """A Flower app whose ServerApp and ClientApp would each leave a marker file (and,
    in the attack this replays, read the site's data and keys)."""
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
                "project": {"name": "evilapp", "version": "1.0.0", "dependencies": []},
                "tool": {
                    "flwr": {
                        "app": {
                            "publisher": "mallory",
                            "components": {"serverapp": "evil:server", "clientapp": "evil:client"},
                            "config": {},
                        }
                    }
                },
            }
        )
    )
    (folder / "evil.py").write_text(
        "import os, pathlib\n"
        "from flwr.clientapp import ClientApp\n"
        "from flwr.serverapp import ServerApp\n"
        f"MARKERS = pathlib.Path({str(markers)!r})\n"
        "(MARKERS / f'imported-{os.getpid()}').write_text('evil code ran')\n"
        "server = ServerApp()\n"
        "client = ClientApp()\n"
    )
    return folder


def test_an_outsider_holding_the_ca_certificate_can_neither_register_nor_run(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    """The attack of the perimeter issue, replayed at the address the sites dial."""
    root: Path = setup["root"]
    environment = _outsider_cli(root, running)
    keys = root / "mallory-keys"
    assert fedlora("pki", "site-keys", str(keys)).returncode == 0
    markers = root / "markers"
    markers.mkdir()
    nodes_before = running.superlink_log().count("Created node_id")

    registered = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(keys / "node.pub"), "target",
         "--name", "hospital-a", "--format", "json"],
        capture_output=True, text=True, env=environment, timeout=120, check=False,
    )  # fmt: skip
    assert '"success": true' not in registered.stdout, registered.stdout
    assert "registered successfully" not in registered.stdout + registered.stderr

    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", str(_evil_app(root / "evilapp", markers)), "target"],
        capture_output=True, text=True, env=environment, timeout=180, check=False,
    )  # fmt: skip
    assert submitted.returncode != 0, submitted.stdout[-2000:]

    # Every Control and Runtime route, asked directly: nginx answers 404 itself, and the
    # SuperLink never sees the request.
    routes = [
        route.path
        for router in (control, create_runtime_router("SuperLink"))
        for route in router.routes
        if isinstance(route, APIRoute)
    ]
    assert len(routes) > 20
    context = ssl.create_default_context(cafile=str(running.certs / "ca.pem"))
    for path in [*routes, "/docs", "/openapi.json", "/health", "/v1/fleet/../control/start-run"]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", running.port, context=context, timeout=10
        )
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        response = connection.getresponse()
        assert response.status == 404, path
        assert b"nginx" in response.read(), path
        connection.close()

    time.sleep(5)  # what a run would have started by now
    assert not any(markers.iterdir()), sorted(markers.iterdir())
    assert running.superlink_log().count("Created node_id") == nodes_before
    assert "mallory" not in running.superlink_log()


def test_a_site_name_belongs_to_the_key_registered_under_it(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    """Mallory is a registered site (added while the SuperLink runs, with `coordinator
    register`) whose daemon claims to be hospital-a: it is rejected and audited, and
    the real hospital-a trains, its own audit key the one the coordinator pins."""
    root: Path = setup["root"]
    keys = root / "site-keys" / "mallory"
    assert fedlora("pki", "site-keys", str(keys)).returncode == 0
    added = fedlora(
        "pki", "add-site", "mallory", "--certs", str(running.certs),
        "--superlink", running.superlink,
        "--node-public-key", str(keys / "node.pub"),
        "--audit-public-key", str(keys / "audit.pub"),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    registered = fedlora(
        "coordinator", "register", "--certs", str(running.certs),
        "--state-dir", str(running.state_dir),
    )  # fmt: skip
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "mallory: registered" in registered.stdout
    assert "hospital-a: already registered" in registered.stdout

    document = tomllib.loads(setup["configs"]["hospital-a"].read_text())
    assert document["site"]["id"] == "hospital-a"  # the name mallory claims
    document["site"]["state_dir"] = str(root / "mallory-state")
    document["site"]["signing_key"] = str(keys / "audit-key.pem")
    document["connection"]["node_key"] = str(keys / "node.key")
    impostor = root / "mallory.toml"
    impostor.write_text(tomli_w.dumps(document))
    activated = running.superlink_log().count("Activated node_id")
    running.start_site("mallory", impostor)
    try:
        wait_until(
            lambda: running.superlink_log().count("Activated node_id") > activated,
            120,
            "mallory's SuperNode to authenticate:\n" + running.logs(),
        )
        run_dir = root / "run-impostor"
        federation = _federation(setup, IMAGING, "impostor", rounds=1, min_sites=1)
        done = subprocess.run(
            _run_command(setup, running, str(federation), "--out", str(run_dir)),
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:] + running.logs()
    finally:
        assert running.stop("mallory") == 0, running.tail("mallory")

    rows = _metrics(run_dir)
    rejected = [r for r in rows if r["site"] == "mallory"]
    assert rejected and {r["status"] for r in rejected} == {"rejected"}, rows
    assert "node registered as mallory claims to be hospital-a" in rejected[0]["reason"]
    assert any(
        r["site"] == "hospital-a" and r["phase"] == "train" and r["status"] == "accepted"
        for r in rows
    ), rows
    entries = _coordinator_log(run_dir, IMAGING)
    assert any(e["event"] == "site-excluded" and e["data"]["site"] == "mallory" for e in entries), [
        e["event"] for e in entries
    ]
    pinned = site_keys(entries)
    assert pinned["hospital-a"] == fingerprint(
        load_public_key(root / "site-keys" / "hospital-a" / "audit.pub")
    )
    assert "mallory" not in pinned
    # Nothing of hospital-a's ran under mallory's key: its ledger was never charged.
    mallory_log = root / "mallory-state" / "audit.jsonl"
    logged = read_entries(mallory_log) if mallory_log.exists() else []
    assert not any(e["event"] == "training-done" for e in logged), logged


def _changed_app(folder: Path, markers: Path) -> Path:
    """A copy of this app whose client code differs from the pinned release: its
    client/app.py would leave a marker file as soon as anything imported it."""
    folder.mkdir()
    for part in ("pyproject.toml", "common", "client", "server", "simulations"):
        source = PROJECT_ROOT / part
        if source.is_dir():
            shutil.copytree(source, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / part)
    app = folder / "client" / "app.py"
    app.write_text(
        app.read_text()
        + f"\n__import__('pathlib').Path({str(markers)!r}, 'bundled-client-ran').touch()\n"
    )
    return folder


def test_a_site_runs_only_the_client_code_it_pinned(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    """A run of client code that differs from the pinned release is refused at the
    site (audited, reported to the coordinator with the bundle's hash) and nothing of
    it runs there; once the site reviews and pins the new release, the same run
    trains, and still runs the site's own installed client code."""
    root: Path = setup["root"]
    markers = root / "release-markers"
    markers.mkdir()
    changed = _changed_app(root / "app-v2", markers)
    federation = _federation(setup, TABULAR, "pinned", rounds=1, min_sites=1)
    bank = setup["configs"]["bank-a"]

    def run(name: str) -> list[dict[str, str]]:
        done = subprocess.run(
            _run_command(setup, running, str(federation), "--out", str(root / name),
                         "--app", str(changed)),
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert (root / name / "metrics.csv").exists(), done.stdout[-3000:] + done.stderr[-3000:]
        return [r for r in _metrics(root / name) if r["site"] == "bank-a"]

    rows = run("run-unpinned")
    v2 = _publish(root / "release-v2", running.certs, "--app", str(changed))
    bundle = json.loads(v2.read_text())["fab_sha256"]
    assert rows and {r["status"] for r in rows} == {"refused"}, rows
    assert any(bundle in r["reason"] and "not a release this site pinned" in r["reason"]
               for r in rows), rows  # fmt: skip
    events = _site_log(setup, "bank-a")
    assert {e["data"]["fab_sha256"] for e in events if e["event"] == "code-refused"} == {bundle}
    assert "refused a run's client code" in running.tail("bank-a", 200_000)
    assert not any(markers.iterdir())

    # The upgrade: the coordinator publishes the new release, the site reviews and pins it.
    pins = _pin(bank, v2)
    assert bundle in pins and len(pins) == 2
    rows = run("run-pinned")
    assert any(r["phase"] == "train" and r["status"] == "accepted" for r in rows), rows
    assert not any(markers.iterdir()), "the bundle's client code ran at the site"
    changes = [
        e["data"] for e in _site_log(setup, "bank-a") if e["event"] == "client-releases-pinned"
    ]
    assert changes[-1]["added"] == [bundle] and changes[-1]["removed"] == []


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
    # Round 1 ends when the SuperLink declares the killed node unavailable (no heartbeat:
    # about 65 s here) or at the round timeout. The timeout must leave a healthy site's
    # round room on a loaded 2-core machine (its first round starts the app: 20-60 s),
    # or a round with no reply in time is a failed round, not the rejoin under test.
    # The rollback guard is off: on 40-odd held-out images per site its accuracy swings
    # are noise, and which adapter is kept is not what this test is about.
    federation = _federation(
        setup,
        IMAGING,
        "killed-node",
        rounds=4,
        min_sites=1,
        round_timeout=150.0,
        rollback=RollbackGuard(enabled=False),
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
        killed = running.kill_children("hospital-a")
        assert process.wait(timeout=900) == 0, (setup["root"] / "run-b.out").read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert killed and not any(alive(pid) for pid in killed)
    # The site daemon started its SuperNode again, which authenticated again.
    assert "starting it again" in running.tail("hospital-a", 20000)
    rows = [r for r in _metrics(run_dir) if r["site"] == "hospital-a" and r["phase"] == "train"]
    first = [r for r in rows if r["round"] == "1"]
    assert first and first[0]["status"] != "accepted", rows
    assert any(r["status"] == "accepted" and int(r["round"]) > 1 for r in rows), rows
    result = json.loads((run_dir / "tasks" / f"{IMAGING}.json").read_text())
    assert result["rounds_completed"] == 4, _metrics_table(run_dir)


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
        running.kill_children("coordinator")
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


def _metrics_table(run_dir: Path) -> str:
    """The run's metrics one short line per row, for a failure message pytest would
    otherwise truncate."""
    return "\n".join(
        " ".join((r["round"], r["site"], r["phase"], r["status"], r["reason"][:100]))
        for r in _metrics(run_dir)
    )


def test_nothing_phoned_home(
    setup: dict[str, Any], running: FedloraDeployment, watched: dict[str, Path]
) -> None:
    """After every run above (both tasks, artifacts exported, checked and installed at
    the sites): no process of the deployment looked up or dialled anything off this
    machine's loopback, and onnxruntime queued no telemetry."""
    watched_programs = {
        line.split()[1] for line in Path(f"{watched['sockets']}.processes").read_text().splitlines()
    }
    every_kind = {
        "fedlora",
        "flower-superlink",
        "flower-supernode",
        "fedlora-server-superexec",
        "fedlora-superexec",
        "flwr-serverapp",
    }
    assert every_kind <= watched_programs, watched_programs
    # The sites never ran Flower's own ClientApp process (the bundle's code), nor a
    # process per task: every task ran inside the site's long-lived fedlora-superexec.
    assert "flwr-clientapp" not in watched_programs, watched_programs
    assert "fedlora-clientapp" not in watched_programs, watched_programs
    recorded = watched["sockets"].read_text() if watched["sockets"].exists() else ""
    assert recorded == "", recorded
    assert not (watched["home"] / ".cache" / "Microsoft").exists()


def test_site_daemons_stop_cleanly_on_sigterm(
    setup: dict[str, Any], running: FedloraDeployment
) -> None:
    daemons = {name: children(running.processes[name].pid) for name in SITES}
    for name in SITES:
        assert running.stop(name) == 0, running.tail(name)
        assert "stopped" in running.tail(name, 500)
    for name, pids in daemons.items():
        assert pids and not any(alive(pid) for pid in pids), name
