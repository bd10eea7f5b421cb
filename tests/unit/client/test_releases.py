"""client/releases.py and `fedlora site release`: the pins a site records, the bundles
it refused, and what a published release would change."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import release_cli
from client.audit import SiteAudit
from client.cli import site
from client.releases import last_pins, pin_change, record_pins, refused_bundles
from common.config import load_site_config
from common.errors import ConfigError
from common.release import make_release, write_release
from common.signing import write_public_key
from tests.conftest import write_site_config

A, B, C = "a" * 64, "b" * 64, "c" * 64


def test_pin_change() -> None:
    assert pin_change([A, B], [B, A]) is None
    first = pin_change(None, [A])
    assert first is not None and (first.added, first.removed) == ([A], [])
    upgrade = pin_change([A], [B])
    assert upgrade is not None and (upgrade.added, upgrade.removed) == ([B], [A])
    assert pin_change(None, []) is not None  # the first record, even of no pin


def test_last_pins_and_refusals_from_events() -> None:
    events = [
        {"event": "client-releases-pinned", "pinned": [A]},
        {"event": "code-refused", "fab_sha256": C, "run": "1"},
        {"event": "client-releases-pinned", "pinned": [A, B]},
        {"event": "code-refused", "fab_sha256": C, "run": "2"},
        {"event": "code-refused", "fab_sha256": B, "run": "3"},
    ]
    assert last_pins(events) == [A, B]
    assert last_pins([]) is None
    assert refused_bundles(events) == [
        {"fab_sha256": B, "run": "3", "times": 1},
        {"fab_sha256": C, "run": "2", "times": 2},
    ]


def _config(tmp_path: Path, scenario: Any, workspace: Path, **site: Any) -> Path:
    path = write_site_config(scenario, workspace, "bank-a", tmp_path)
    document = tomllib.loads(path.read_text())
    document["policy"] = {**document.get("policy", {}), "client_releases": [A]}
    document["site"].update(site)
    path.write_text(tomli_w.dumps(document))
    return path


def test_record_pins_enters_each_change_once(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path
) -> None:
    audit = SiteAudit(load_site_config(_config(tmp_path, small_scenario, untrained_workspace)))
    assert record_pins(audit, [A]) is not None
    assert record_pins(audit, [A]) is None
    assert record_pins(audit, [A, B]) is not None
    recorded = [e for e in audit.events() if e["event"] == "client-releases-pinned"]
    assert [(e["added"], e["removed"]) for e in recorded] == [([A], []), ([B], [])]


def test_site_release_shows_the_line_that_pins_a_release(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Ed25519PrivateKey.generate()
    write_public_key(tmp_path / "coordinator.pub", key.public_key())
    config = _config(
        tmp_path,
        small_scenario,
        untrained_workspace,
        coordinator_key=str(tmp_path / "coordinator.pub"),
    )
    release = make_release(b"bundle", key)
    path = write_release(tmp_path / "release", release, key)
    monkeypatch.setattr(release_cli, "installed_release", lambda: release.fab_sha256)

    shown = CliRunner().invoke(site, ["release", str(config), "--release", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "signature valid" in shown.output
    assert f'client_releases = ["{A}", "{release.fab_sha256}"]' in shown.output
    assert "NOT pinned" in shown.output  # the installed code is that release, not pinned yet

    as_json = CliRunner().invoke(site, ["release", str(config), "--release", str(path), "--json"])
    report = json.loads(as_json.output)
    assert report["pinned"] == [A]
    assert report["release"]["pinned"] is False and report["release"]["matches_installed"]


def test_site_release_refuses_a_release_another_key_signed(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_public_key(tmp_path / "coordinator.pub", Ed25519PrivateKey.generate().public_key())
    config = _config(
        tmp_path,
        small_scenario,
        untrained_workspace,
        coordinator_key=str(tmp_path / "coordinator.pub"),
    )
    other = Ed25519PrivateKey.generate()
    path = write_release(tmp_path / "release", make_release(b"bundle", other), other)
    monkeypatch.setattr(release_cli, "installed_release", lambda: None)
    with pytest.raises(Exception, match="not signed by the coordinator key"):
        release_cli.release_report(config, path)


def test_site_release_without_a_pinned_coordinator_key(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, small_scenario, untrained_workspace)
    document = tomllib.loads(config.read_text())
    document["site"].pop("coordinator_key", None)
    config.write_text(tomli_w.dumps(document))
    monkeypatch.setattr(release_cli, "installed_release", lambda: None)
    with pytest.raises(ConfigError, match="pins no coordinator key"):
        release_cli.release_report(config, tmp_path / "release.json")


def test_client_releases_must_be_hashes(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path
) -> None:
    config = _config(tmp_path, small_scenario, untrained_workspace)
    document = tomllib.loads(config.read_text())
    document["policy"]["client_releases"] = ["v0.1.0"]
    config.write_text(tomli_w.dumps(document))
    with pytest.raises(ConfigError, match="not a release hash"):
        load_site_config(config)


def test_site_run_refuses_to_start_with_no_release_pinned(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path
) -> None:
    from client.daemon import check_ready

    config = _config(tmp_path, small_scenario, untrained_workspace)
    pinned = [p for p in check_ready(load_site_config(config)) if "client_releases" in p]
    assert pinned == []
    document = tomllib.loads(config.read_text())
    document["policy"]["client_releases"] = []
    config.write_text(tomli_w.dumps(document))
    (problem,) = [p for p in check_ready(load_site_config(config)) if "client_releases" in p]
    assert "fedlora site release" in problem
