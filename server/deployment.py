"""The coordinator's side of a deployment: the SuperLink's command line, registering the
sites' node keys with it, and ``flwr run`` of this app against it. Flower does the work;
this module prepares its arguments and reads what it says."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from common import pki, signing
from common.config import FederationConfig, load_federation_config
from common.errors import ConfigError, FedloraError, SigningError
from common.files import write_atomically
from common.processes import executable, flower_environment, run_daemon
from common.superexec import superexec_command
from server.identity import REGISTRY_AUDIT_KEY
from server.perimeter import Perimeter

logger = logging.getLogger(__name__)

APP_ROOT = Path(__file__).resolve().parents[1]
"""The Flower app (pyproject.toml with [tool.flwr.app]) that ``flwr run`` ships."""
LOOPBACK = "127.0.0.1"
CONNECTION = "fedlora"
"""The name of the SuperLink connection in the coordinator's Flower CLI config."""


class DeploymentError(FedloraError):
    """A Flower process of the deployment did not do what it was asked."""


@dataclass(frozen=True)
class Coordinator:
    """Where the coordinator keeps things: the PKI folder and its own state folder
    (the SuperLink's database and log, the Flower CLI's config)."""

    certs: Path
    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def superlink_log(self) -> Path:
        return self.state_dir / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    def check_pki(self) -> None:
        for name in (pki.CA_CERT, pki.SUPERLINK_CERT, pki.SUPERLINK_KEY):
            if not (self.certs / name).exists():
                raise ConfigError(
                    f"{self.certs / name} is missing: run `fedlora pki init --certs {self.certs}`"
                )
        pki.check_certificate_chain(self.certs / pki.SUPERLINK_CERT, self.certs / pki.CA_CERT)

    @property
    def secret_dir(self) -> Path:
        return self.state_dir / "secrets"

    def superlink_command(self, port: int, secret: Path) -> list[str]:
        """flower-superlink on loopback only (the sites reach it through the perimeter),
        over TLS, SuperNodes authenticated by registered keys, state kept across
        restarts, app runs served to the SuperExec that holds ``secret`` alone, and no
        dependency installs at run time."""
        return [
            executable("flower-superlink"),
            "--ssl-ca-certfile",
            str(self.certs / pki.CA_CERT),
            "--ssl-certfile",
            str(self.certs / pki.SUPERLINK_CERT),
            "--ssl-keyfile",
            str(self.certs / pki.SUPERLINK_KEY),
            "--enable-supernode-auth",
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(secret),
            "--host",
            LOOPBACK,
            "--port",
            str(port),
        ]

    def superexec_command(self, port: int, secret: Path) -> list[str]:
        """The SuperExec that runs the ServerApp (ServerApp tasks only): it is handed the
        CA certificate (to pin the SuperLink) and the shared secret, no private key."""
        return superexec_command(
            f"{LOOPBACK}:{port}",
            secret,
            self.certs / pki.CA_CERT,
            program="fedlora-server-superexec",
        )

    def perimeter(self, host: str, port: int, upstream_port: int) -> Perimeter:
        return Perimeter(
            host=host,
            port=port,
            upstream_port=upstream_port,
            certificate=self.certs / pki.SUPERLINK_CERT,
            private_key=self.certs / pki.SUPERLINK_KEY,
            ca_certificate=self.certs / pki.CA_CERT,
            state_dir=self.state_dir,
        )

    def write_cli_config(self, address: str) -> Path:
        """The Flower CLI's connection to our SuperLink (for registration and runs)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        document = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {
                    "address": address,
                    "root-certificates": str((self.certs / pki.CA_CERT).resolve()),
                },
            }
        }
        path = self.flwr_home / "config.toml"
        path.write_text(tomli_w.dumps(document))
        return path

    def cli_environment(self) -> dict[str, str]:
        return flower_environment({"FLWR_HOME": str(self.flwr_home.resolve())})

    def register_sites(self) -> dict[str, str]:
        """Register every site under certs/sites with the SuperLink; a key registered
        before (the database keeps it) is left as it is. Returns site -> outcome."""
        outcomes: dict[str, str] = {}
        for site, public_key in pki.registered_node_keys(self.certs).items():
            completed = subprocess.run(
                [
                    executable("flwr"),
                    "supernode",
                    "register",
                    str(public_key),
                    CONNECTION,
                    "--name",
                    site,
                    "--format",
                    "json",
                ],
                capture_output=True,
                text=True,
                env=self.cli_environment(),
                check=False,
                timeout=120,
            )
            outcomes[site] = _registration_outcome(completed.stdout)
            logger.info("site %s: node key %s", site, outcomes[site])
        return outcomes


def write_site_registry(certs: Path, target: Path) -> Path:
    """Write ``target``: the site registry a run checks introductions against (the
    ``site-registry`` run config), ``{site: {"audit_key": fingerprint}}`` for every site
    registered under ``certs/sites``; a site without ``audit.pub`` gets no audit key."""
    registry: dict[str, dict[str, str]] = {}
    for site, node_key in pki.registered_node_keys(certs).items():
        audit_pub = node_key.parent / pki.AUDIT_PUB
        registry[site] = {}
        if not audit_pub.exists():
            logger.warning("site %s has no %s: its audit key is not checked", site, audit_pub)
            continue
        try:
            fingerprint = signing.fingerprint(signing.load_public_key(audit_pub))
        except SigningError as exc:
            raise ConfigError(f"site {site}'s audit key is unusable: {exc}") from None
        registry[site][REGISTRY_AUDIT_KEY] = fingerprint
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return target


def _json_reply(stdout: str) -> dict[str, object]:
    """The JSON object a Flower CLI command printed with ``--format json``, after any
    other text it printed first."""
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(stdout) if char == "{"):
        try:
            reply, _ = decoder.raw_decode(stdout, start)
        except ValueError:
            continue
        if isinstance(reply, dict) and "success" in reply:
            return reply
    raise ValueError("no JSON reply")


def _registration_outcome(stdout: str) -> str:
    try:
        reply = _json_reply(stdout)
    except ValueError as exc:
        raise DeploymentError(f"flwr supernode register answered: {stdout.strip()}") from exc
    if reply.get("success"):
        return f"registered (node {reply.get('node-id')})"
    message = str(reply.get("error-message", ""))
    if "already in use" in message:
        return "already registered"
    raise DeploymentError(f"the SuperLink refused a node key: {message.strip()}")


def wait_for_port(
    host: str, port: int, timeout: float, alive: Callable[[], bool], what: str
) -> None:
    """Until ``what`` accepts connections on ``host:port``; DeploymentError if its
    processes die first or it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() < deadline:
        if not alive():
            raise DeploymentError(f"{what} exited while starting; see its log")
        try:
            with socket.create_connection((probe_host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise DeploymentError(f"{what} did not listen on port {port} within {timeout:g} s")


# ----------------------------------------------------------------------- runs ---


def stage_federation(source: Path, run_dir: Path) -> tuple[FederationConfig, Path]:
    """Copy a federation config into the run directory (base model path made absolute),
    so the run, and a resume of it, keeps its own settings."""
    federation = load_federation_config(source)
    target = run_dir / "federation" / f"{federation.task}.toml"
    if target.exists():
        raise ConfigError(f"{run_dir} already holds a {federation.task} run")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(tomli_w.dumps(federation.model_dump(mode="json", exclude_none=True)))
    return federation, target


def staged_federations(run_dir: Path) -> dict[str, Path]:
    """The run's tasks and their configs, as staged when the run started."""
    found = {path.stem: path for path in sorted((run_dir / "federation").glob("*.toml"))}
    if not found:
        raise ConfigError(f"{run_dir} holds no federation/*.toml: it is not a run directory")
    return found


def flwr_run(
    coordinator: Coordinator,
    run_config: dict[str, str],
    log_file: Path,
    on_line: Callable[[str], None],
    app: Path = APP_ROOT,
) -> int:
    """``flwr run`` of the app in ``app`` (this installed copy's by default) against
    the SuperLink, following its logs."""
    overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
    command = [
        executable("flwr"),
        "run",
        str(app),
        CONNECTION,
        "--stream",
        "--run-config",
        overrides,
    ]
    return run_daemon(command, log_file, coordinator.cli_environment(), on_line=on_line)
