"""The site registry: `write_site_registry` (server/deployment.py) writes the sites' audit
keys from certs/sites, the ServerApp reads it back (``site-registry`` in the run config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, RecordDict

from common import pki
from common.errors import ConfigError
from common.signing import fingerprint, write_public_key
from server.app import site_registry_path
from server.deployment import write_site_registry
from server.identity import load_site_registry


def _site(certs: Path, name: str, *, audit: bool = True) -> str | None:
    """Register ``name`` as `fedlora pki add-site` leaves it: node.pub, audit.pub when known."""
    folder = certs / pki.SITES / name
    folder.mkdir(parents=True)
    (folder / pki.NODE_PUB).write_text("ecdsa-sha2-nistp384 AAAA… (not read here)\n")
    if not audit:
        return None
    key = Ed25519PrivateKey.generate().public_key()
    write_public_key(folder / pki.AUDIT_PUB, key)
    return fingerprint(key)


def test_the_registry_holds_each_sites_audit_key_and_reads_back(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    key_a = _site(certs, "hospital-a")
    key_bank = _site(certs, "bank-a")
    _site(certs, "hospital-b", audit=False)  # registered with its node key only
    (certs / pki.SITES / "stray").mkdir()  # no node.pub: not a registered site

    target = write_site_registry(certs, tmp_path / "run" / "site-registry.json")

    assert target == tmp_path / "run" / "site-registry.json"
    assert json.loads(target.read_text()) == {
        "bank-a": {"audit_key": key_bank},
        "hospital-a": {"audit_key": key_a},
        "hospital-b": {},
    }
    assert load_site_registry(target) == {"bank-a": key_bank, "hospital-a": key_a}


def test_a_registry_of_no_sites(tmp_path: Path) -> None:
    target = write_site_registry(tmp_path / "certs", tmp_path / "registry.json")
    assert json.loads(target.read_text()) == {}
    assert load_site_registry(target) == {}


def test_an_unusable_audit_key_is_an_error_not_a_site_left_unchecked(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    _site(certs, "hospital-a", audit=False)
    (certs / pki.SITES / "hospital-a" / pki.AUDIT_PUB).write_text("not a key\n")
    with pytest.raises(ConfigError, match="site hospital-a's audit key is unusable"):
        write_site_registry(certs, tmp_path / "registry.json")
    assert not (tmp_path / "registry.json").exists()


def test_a_missing_or_unreadable_registry_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_registry(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_site_registry(broken)


def _context(run_config: dict[str, str]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_the_server_app_reads_the_registry_path_from_the_run_config(tmp_path: Path) -> None:
    path = tmp_path / "site-registry.json"
    assert site_registry_path(_context({"site-registry": str(path)})) == path
    assert site_registry_path(_context({"site-registry": ""})) is None  # a simulation
    assert site_registry_path(_context({})) is None
