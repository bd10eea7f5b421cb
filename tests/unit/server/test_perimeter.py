"""server/perimeter.py: the nginx configuration that lets the sites reach the Fleet API
and nothing else, checked as text and by nginx itself (`nginx -t`), and against Flower's
own Fleet router so that a Flower upgrade cannot silently add or rename a route."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from common import pki
from common.errors import ConfigError
from server.perimeter import FLEET_PREFIX, FLEET_ROUTES, Perimeter, listen_address, nginx_config


def _perimeter(tmp_path: Path, host: str = "127.0.0.1") -> Perimeter:
    certs = tmp_path / "certs"
    return Perimeter(
        host=host,
        port=9092,
        upstream_port=9093,
        certificate=certs / pki.SUPERLINK_CERT,
        private_key=certs / pki.SUPERLINK_KEY,
        ca_certificate=certs / pki.CA_CERT,
        state_dir=tmp_path / "state",
    )


def test_the_fleet_routes_are_flowers() -> None:
    from flwr.superlink.routers.fleet.router import router

    flower = {route.path for route in router.routes if isinstance(route, APIRoute)}
    assert flower == {FLEET_PREFIX + route for route in FLEET_ROUTES}
    assert all(route.methods == {"POST"} for route in router.routes if isinstance(route, APIRoute))


def test_only_the_fleet_routes_are_forwarded(tmp_path: Path) -> None:
    text = nginx_config(_perimeter(tmp_path))
    forwarded = re.findall(r"location = (\S+) \{\s*limit_except POST", text)
    assert forwarded == [FLEET_PREFIX + route for route in FLEET_ROUTES]
    # Each route is forwarded as the one path it matched: nginx sends its normalised
    # path, never the client's raw one (no "/v1/control/..%2F..%2Ffleet/get-run").
    passed = re.findall(r"location = (\S+) \{[^}]*\}[^}]*proxy_pass (\S+);", text)
    assert passed == [(path, f"https://127.0.0.1:9093{path}") for path in forwarded]
    # Only push-object may carry a large body: the SuperLink reads a body before it
    # checks who sent it.
    limits = dict(re.findall(r"location = (\S+) \{[^}]*\}\s*client_max_body_size (\S+);", text))
    assert limits.pop(FLEET_PREFIX + "push-object") == "512m"
    assert set(limits.values()) == {"1m"}
    assert "limit_conn per_client" in text and "client_body_timeout" in text
    assert "proxy_set_header Host localhost;" in text
    # Everything else is answered by nginx: no prefix location that could match
    # /v1/control or /v1/runtime, and the catch-all returns 404.
    locations = re.findall(r"location (\S+)", text)
    assert set(locations) == {"=", "/"}
    assert re.search(r"location / \{\s*return 404;\s*\}", text)
    # The hop to the SuperLink is TLS pinned to the federation's CA.
    assert "proxy_ssl_verify on;" in text
    assert f"proxy_ssl_trusted_certificate {tmp_path / 'certs' / pki.CA_CERT};" in text
    assert "listen 127.0.0.1:9092 ssl;" in text


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1:9092"),
        ("0.0.0.0", "0.0.0.0:9092"),
        ("::1", "[::1]:9092"),
        ("::", "[::]:9092"),
        ("fl.example.org", "fl.example.org:9092"),
    ],
)
def test_listen_address(host: str, expected: str) -> None:
    assert listen_address(host, 9092) == expected


def test_the_two_ports_must_differ(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must differ"):
        Perimeter(
            host="127.0.0.1",
            port=9092,
            upstream_port=9092,
            certificate=tmp_path / "a",
            private_key=tmp_path / "b",
            ca_certificate=tmp_path / "c",
            state_dir=tmp_path,
        )


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "certs", ["127.0.0.1"])
    perimeter = _perimeter(tmp_path)
    perimeter.write_config()
    checked = subprocess.run(
        [*perimeter.command(), "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
