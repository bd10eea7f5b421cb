"""The coordinator's audit key and log: where the key comes from, one log per run and
task, and what the configuration hash commits to."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.log import read_entries, verify_log
from common.audit.review import COORDINATOR_PRIVATE_KEY, COORDINATOR_PUBLIC_KEY
from common.config import FederationConfig
from common.errors import ConfigError, SigningError
from common.signing import fingerprint, load_public_key, write_private_key
from server.audit import CoordinatorAudit, config_sha256, coordinator_log_path
from server.run import coordinator_key, publish_public_key

TASK = "tabular-classification"
OTHER_TASK = "dicom-classification"


def _fingerprint(key: Ed25519PrivateKey) -> str:
    return fingerprint(key.public_key())


# --------------------------------------------------------------- the key ---


def test_a_run_without_a_configured_key_makes_one_in_its_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    key = coordinator_key(run_dir, None)
    publish_public_key(run_dir, key)

    private = run_dir / COORDINATOR_PRIVATE_KEY
    assert private == run_dir / "keys" / "coordinator.key"
    assert private.is_file()
    assert (private.stat().st_mode & 0o777) == 0o600
    public = run_dir / COORDINATOR_PUBLIC_KEY
    assert public == run_dir / "keys" / "coordinator.pub"
    assert fingerprint(load_public_key(public)) == _fingerprint(key)
    assert fingerprint(load_public_key(private)) == _fingerprint(key)


def test_the_made_key_is_reused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = coordinator_key(run_dir, None)
    publish_public_key(run_dir, first)
    private_bytes = (run_dir / COORDINATOR_PRIVATE_KEY).read_bytes()

    second = coordinator_key(run_dir, None)
    publish_public_key(run_dir, second)  # the same key: nothing to refuse

    assert _fingerprint(second) == _fingerprint(first)
    assert (run_dir / COORDINATOR_PRIVATE_KEY).read_bytes() == private_bytes
    assert fingerprint(load_public_key(run_dir / COORDINATOR_PUBLIC_KEY)) == _fingerprint(first)


def test_a_configured_key_that_does_not_exist_is_an_error_and_creates_nothing(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    configured = tmp_path / "secrets" / "coordinator.pem"

    with pytest.raises(SigningError, match="does not exist"):
        coordinator_key(run_dir, configured)

    assert not configured.exists()
    assert not configured.parent.exists()
    assert not run_dir.exists()  # no made-up key, no public key for reviewers


def test_a_configured_key_is_used_and_published(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    configured = tmp_path / "secrets" / "coordinator.pem"
    private = Ed25519PrivateKey.generate()
    write_private_key(configured, private)

    key = coordinator_key(run_dir, configured)
    publish_public_key(run_dir, key)

    assert _fingerprint(key) == _fingerprint(private)
    assert fingerprint(load_public_key(run_dir / COORDINATOR_PUBLIC_KEY)) == _fingerprint(private)
    assert not (run_dir / COORDINATOR_PRIVATE_KEY).exists()


def test_a_run_directory_of_another_coordinator_key_is_refused(tmp_path: Path) -> None:
    """Replacing keys/coordinator.pub would make the logs already there look re-signed."""
    run_dir = tmp_path / "run"
    earlier = Ed25519PrivateKey.generate()
    publish_public_key(run_dir, earlier)
    before = (run_dir / COORDINATOR_PUBLIC_KEY).read_bytes()
    configured = tmp_path / "coordinator.pem"
    write_private_key(configured, Ed25519PrivateKey.generate())

    with pytest.raises(ConfigError, match="another coordinator key"):
        publish_public_key(run_dir, coordinator_key(run_dir, configured))

    assert (run_dir / COORDINATOR_PUBLIC_KEY).read_bytes() == before


# ------------------------------------------------------- one log per run ---


def _federation(task: str = TASK, **overrides: object) -> FederationConfig:
    settings: dict[str, object] = {"task": task, "base_model": Path("/models/base"), "rounds": 3}
    return FederationConfig.model_validate({**settings, **overrides})


def test_a_run_directory_holding_the_task_log_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    audit = CoordinatorAudit.open(tmp_path, TASK, key)
    audit.record("run-started", run="1", task=TASK)
    path = coordinator_log_path(tmp_path, TASK)
    before = path.read_bytes()

    with pytest.raises(ConfigError, match=TASK):
        CoordinatorAudit.open(tmp_path, TASK, key)
    with pytest.raises(ConfigError, match="already holds"):
        CoordinatorAudit.open(tmp_path, TASK, Ed25519PrivateKey.generate())

    assert path.read_bytes() == before


def test_a_second_task_in_the_same_directory_is_accepted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    CoordinatorAudit.open(tmp_path, TASK, key).record("run-started", run="1", task=TASK)

    other = CoordinatorAudit.open(tmp_path, OTHER_TASK, key)
    other.record("run-started", run="1", task=OTHER_TASK)

    for task in (TASK, OTHER_TASK):
        path = coordinator_log_path(tmp_path, task)
        verification = verify_log(path, key.public_key())
        assert verification.ok, verification.findings
        assert [entry["event"] for entry in read_entries(path)] == ["log-opened", "run-started"]
        assert read_entries(path)[1]["data"]["task"] == task


def test_an_empty_log_file_does_not_count_as_a_run(tmp_path: Path) -> None:
    path = coordinator_log_path(tmp_path, TASK)
    path.parent.mkdir(parents=True)
    path.touch()
    key = Ed25519PrivateKey.generate()

    CoordinatorAudit.open(tmp_path, TASK, key).record("run-started", run="1", task=TASK)

    assert verify_log(path, key.public_key()).ok


# ---------------------------------------------------------- config hash ---


def test_the_config_hash_ignores_where_the_base_model_lies() -> None:
    here = _federation()
    there = _federation(base_model=Path("/elsewhere/models/another-name"))
    assert config_sha256(here) == config_sha256(there)


def test_the_config_hash_changes_with_the_rounds() -> None:
    three = _federation()
    assert config_sha256(three) != config_sha256(_federation(rounds=4))
    assert config_sha256(three) == config_sha256(_federation())
    assert len(config_sha256(three)) == 64
