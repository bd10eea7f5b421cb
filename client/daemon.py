"""``fedlora site run``: the site's long-lived client daemon.

It checks everything it can before it connects (config, data, privacy ledger, keys,
and that the SuperLink's certificate chains to the federation's CA), then runs Flower's
``flower-supernode`` with the CA certificate, the node key and a node config naming the
site config. Flower reconnects by itself while the SuperNode runs; when the SuperNode
exits for a passing reason (the SuperLink unreachable at start) it is started again,
and when it was refused (unregistered key, wrong CA) the daemon stops and says why.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.preflight import preflight
from client.site import Site
from common import pki
from common.config import SiteConfig, SiteConnection
from common.errors import ConfigError, FedloraError
from common.processes import Daemon, executable, flower_environment, run_daemons
from common.superexec import superexec_command

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SUPEREXEC = "fedlora-superexec"

NOT_ACTIVATED = "Failed to activate SuperNode"
ACCEPTED = "SuperNode ID:"
"""What flower-supernode prints once the SuperLink accepted its node key."""
REFUSALS = {
    NOT_ACTIVATED: (
        "the SuperLink does not know this site's node key: send node.pub to the "
        "coordinator (fedlora pki add-site … --node-public-key node.pub)"
    ),
    "CERTIFICATE_VERIFY_FAILED": (
        "the SuperLink's TLS certificate is not signed by connection.ca_certificate"
    ),
}
"""What flower-supernode prints when it is refused, and what the operator should do."""
RESTART_DELAYS = (5.0, 10.0, 30.0, 60.0)
HELD_RETRY_SECONDS = 10.0
HELD_RETRY_LIMIT = 18
"""About three minutes: a held connection clears after two missed heartbeats (~60 s)."""


class NodeRefusedError(FedloraError):
    """The federation refused this site's node (or the site refused the SuperLink)."""


@dataclass(frozen=True)
class SupernodeSettings:
    config_path: Path
    connection: SiteConnection
    local_port: int
    log_file: Path
    superexec_secret: Path

    def environment(self) -> dict[str, str]:
        """Flower's own files (the installed app) stay in the site's private state."""
        return flower_environment({"FLWR_HOME": str(self.log_file.parent / "flower")})

    def command(self) -> list[str]:
        """The SuperNode in process isolation: it starts no app process itself, and
        serves the runs' tasks on its Runtime API (127.0.0.1:local_port) only to the
        SuperExec holding the site's secret. No --allow-runtime-dependency-installation:
        sites are air-gapped."""
        return [
            executable("flower-supernode"),
            "--root-certificates",
            str(self.connection.ca_certificate),
            "--superlink",
            self.connection.superlink,
            "--auth-supernode-private-key",
            str(self.connection.node_key),
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(self.superexec_secret),
            "--host",
            LOOPBACK,
            "--port",
            str(self.local_port),
            "--node-config",
            f"site-config={json.dumps(str(self.config_path))}",
        ]

    def superexec_command(self) -> list[str]:
        """The site's SuperExec (client/launcher.py): it takes ClientApp tasks only and
        runs each through fedlora's launcher, which refuses a bundle the site did not
        pin and runs the installed client code (plain HTTP on loopback, every request
        signed with the secret)."""
        return superexec_command(
            f"{LOOPBACK}:{self.local_port}", self.superexec_secret, program=SUPEREXEC
        )

    def daemons(self, on_line: Callable[[str], None]) -> list[Daemon]:
        """The SuperNode and its SuperExec; the launcher's refusals show too."""
        return [
            Daemon(self.command(), self.log_file, on_line),
            Daemon(self.superexec_command(), self.log_file.with_name("superexec.log"), on_line),
        ]


def check_ready(config: SiteConfig) -> list[str]:
    """Everything that would make the site refuse every round, found before it connects:
    the pre-flight of every round (client/preflight.py) and a deployment's own needs."""
    try:
        site = Site(config)
    except (FedloraError, OSError) as exc:
        return [str(exc)]
    return [str(problem) for problem in preflight(site, "serve").problems]


def check_connection(connection: SiteConnection, timeout: float = 10.0) -> bool:
    """Load the keys and shake hands with the SuperLink under the federation's CA.
    Returns False when the SuperLink cannot be reached yet (Flower will keep trying);
    raises when it can be reached but is not the one the CA vouches for."""
    for path, what in ((connection.ca_certificate, "connection.ca_certificate"),):
        if not path.is_file():
            raise ConfigError(f"{what}: {path} does not exist")
    pki.load_node_private_key(connection.node_key)
    pki.load_certificate(connection.ca_certificate)
    host, port = pki.parse_superlink(connection.superlink)
    context = ssl.create_default_context(cafile=str(connection.ca_certificate))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as exc:
        raise NodeRefusedError(
            f"the SuperLink at {connection.superlink} presented a certificate that "
            f"connection.ca_certificate does not vouch for ({exc.verify_message}); "
            "check the address and the CA certificate from the coordinator's bundle"
        ) from exc
    except ssl.SSLError as exc:
        raise NodeRefusedError(
            f"the SuperLink at {connection.superlink} did not complete a TLS handshake "
            f"({exc.reason or exc}); is it running with TLS (fedlora coordinator start)?"
        ) from exc
    except OSError as exc:
        logger.warning(
            "the SuperLink at %s is not reachable yet (%s); the SuperNode will keep trying",
            connection.superlink,
            exc.strerror or type(exc).__name__,
        )
        return False


def run_supernode(
    settings: SupernodeSettings,
    on_line: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run flower-supernode until it is stopped (exit 0) or refused (NodeRefusedError);
    start it again when it gave up for any other reason.

    A node key the SuperLink does not accept is a refusal, unless this daemon's node was
    accepted before: after a crash the SuperLink keeps counting the old connection as
    live until it misses heartbeats, and refuses the same key meanwhile (retried for
    about three minutes)."""
    attempt = 0
    accepted_before = False
    held_retries = 0
    while True:
        seen: list[str] = []

        def follow(line: str, seen: list[str] = seen) -> None:
            if ACCEPTED in line:
                seen.append(ACCEPTED)
            seen.extend(marker for marker in REFUSALS if marker in line)
            on_line(line)

        code = run_daemons(settings.daemons(follow), settings.environment())
        if code == 0:
            return 0
        if ACCEPTED in seen:
            accepted_before, attempt, held_retries = True, 0, 0
        refusals = [marker for marker in seen if marker in REFUSALS]
        held = refusals[:1] == [NOT_ACTIVATED] and accepted_before
        held_retries = held_retries + 1 if held else 0
        if refusals and not (held and held_retries <= HELD_RETRY_LIMIT):
            raise NodeRefusedError(
                f"the SuperNode was refused: {REFUSALS[refusals[0]]} (log: {settings.log_file})"
            )
        # A held connection clears within a minute or two: look again often.
        delay = (
            HELD_RETRY_SECONDS
            if refusals
            else RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
        )
        logger.warning(
            "flower-supernode exited with code %d%s; starting it again in %g s",
            code,
            " (the SuperLink still holds this node's previous connection)" if refusals else "",
            delay,
        )
        sleep(delay)
        attempt += 1
