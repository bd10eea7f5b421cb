"""The coordinator's perimeter: what a site (or anyone) can reach from the network.

Flower's SuperLink serves its Fleet API (the SuperNodes' calls), its Control API (run
submission, node registration) and its Runtime API (the ServerApp's calls) from one
HTTP app on one host and port, and the open-source Control API has no authentication.
So fedlora binds the SuperLink to loopback and puts nginx in front of it on the
address the sites dial. nginx terminates TLS with the SuperLink's certificate and
forwards exactly the Fleet API's routes (POST only) to the SuperLink, over TLS again
and pinned to the federation's CA, each as the one path it matched (nginx sends its own
normalised path, never the client's raw one) and with a body limit fit for what the
route carries; every other path is answered 404 by nginx itself.
Registration and runs are only possible from the coordinator's own machine.

The configuration is a pure function of the settings, tested without nginx.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

FLEET_PREFIX = "/v1/fleet/"
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
"""Flower 1.42's Fleet API (flwr/superlink/routers/fleet/router.py): the only paths
the sites need. A test compares this list with Flower's router."""
UPSTREAM_NAME = "localhost"
"""The name nginx checks in the SuperLink's certificate (every certificate `fedlora
pki init` makes carries it)."""
MAX_BODY = "1m"
"""Largest request nginx forwards on the Fleet routes that carry no model data."""
MAX_OBJECT_BODY = "512m"
"""Largest push-object request (one object of a message: an update's arrays); the
strategy checks each update's real size. The SuperLink reads a body before it checks
who sent it, so every other route is kept small."""
CONNECTIONS_PER_CLIENT = 32
BODY_TIMEOUT_SECONDS = 120
"""A client that stops sending its body for this long is cut off (slow-body attacks)."""
IDLE_TIMEOUT_SECONDS = 3600
"""A Fleet call may wait long (a pull of a large object on a slow link)."""


@dataclass(frozen=True)
class Perimeter:
    """nginx on ``host:port`` for the sites, the SuperLink on ``127.0.0.1:upstream_port``."""

    host: str
    port: int
    upstream_port: int
    certificate: Path
    private_key: Path
    ca_certificate: Path
    state_dir: Path

    def __post_init__(self) -> None:
        if self.port == self.upstream_port:
            raise ConfigError(
                f"the SuperLink's own port ({self.upstream_port}) must differ from the "
                f"port the sites reach ({self.port})"
            )

    @property
    def prefix(self) -> Path:
        return self.state_dir / "nginx"

    @property
    def config_file(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def access_log(self) -> Path:
        """One line per request the sites made (method, path, status, duration)."""
        return self.prefix / "access.log"

    def command(self) -> list[str]:
        """nginx in the foreground with its own prefix, so it touches nothing of the
        system's nginx (its default error log included)."""
        return [
            nginx_executable(),
            "-p",
            str(self.prefix),
            "-c",
            str(self.config_file),
            "-e",
            "stderr",
        ]

    def write_config(self) -> Path:
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "temp").mkdir(exist_ok=True)
        self.config_file.write_text(nginx_config(self))
        return self.config_file


def nginx_executable() -> str:
    """nginx from the system (Debian's package puts it in /usr/sbin, which an ordinary
    user's PATH may lack)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ConfigError(
            "nginx is not installed: the coordinator serves the sites through it "
            "(Debian/Ubuntu: apt-get install nginx-light)"
        )
    return found


def listen_address(host: str, port: int) -> str:
    """An nginx ``listen`` address: IPv6 literals in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a name: nginx resolves it once at start
    return f"{host}:{port}"


def nginx_config(perimeter: Perimeter) -> str:
    """The whole nginx.conf: one TLS server that forwards the Fleet API and nothing else."""
    upstream = f"https://127.0.0.1:{perimeter.upstream_port}"
    temp = perimeter.prefix / "temp"
    locations = "\n".join(
        f"""\
        location = {FLEET_PREFIX}{route} {{
            limit_except POST {{ deny all; }}
            client_max_body_size {MAX_OBJECT_BODY if route == "push-object" else MAX_BODY};
            proxy_pass {upstream}{FLEET_PREFIX}{route};
        }}"""
        for route in FLEET_ROUTES
    )
    return f"""\
# Written by `fedlora coordinator start`; rewritten at every start.
daemon off;
worker_processes 1;
pid {perimeter.prefix / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    server_tokens off;
    log_format fedlora '$time_iso8601 $remote_addr "$request" $status $request_time';
    access_log {perimeter.access_log} fedlora;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_max_body_size {MAX_BODY};
    client_body_timeout {BODY_TIMEOUT_SECONDS}s;
    limit_conn_zone $binary_remote_addr zone=per_client:1m;
    limit_conn per_client {CONNECTIONS_PER_CLIENT};
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Host {UPSTREAM_NAME};
    proxy_set_header Connection "";
    proxy_read_timeout {IDLE_TIMEOUT_SECONDS}s;
    proxy_send_timeout {IDLE_TIMEOUT_SECONDS}s;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {perimeter.ca_certificate};
    proxy_ssl_name {UPSTREAM_NAME};
    proxy_ssl_server_name on;
    server {{
        listen {listen_address(perimeter.host, perimeter.port)} ssl;
        ssl_certificate {perimeter.certificate};
        ssl_certificate_key {perimeter.private_key};
        ssl_protocols TLSv1.2 TLSv1.3;
{locations}
        location / {{
            return 404;
        }}
    }}
}}
"""
