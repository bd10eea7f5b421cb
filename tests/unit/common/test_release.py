"""common/release.py: a release record is signed by the coordinator's key and checked
against the key a site pins; anything else about it is refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.release import (
    Release,
    ReleaseError,
    fab_sha256,
    load_release,
    make_release,
    write_release,
)

FAB = b"PK\x03\x04 bundle bytes"


def _published(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey, Release]:
    key = Ed25519PrivateKey.generate()
    release = make_release(FAB, key)
    return write_release(tmp_path / "release", release, key), key, release


def test_a_release_round_trips_with_the_signers_key(tmp_path: Path) -> None:
    path, key, release = _published(tmp_path)
    loaded = load_release(path, key.public_key())
    assert loaded == release
    assert loaded.fab_sha256 == fab_sha256(FAB) and loaded.fab_bytes == len(FAB)


def test_another_key_is_refused(tmp_path: Path) -> None:
    path, _, _ = _published(tmp_path)
    with pytest.raises(ReleaseError, match="not signed by the coordinator key"):
        load_release(path, Ed25519PrivateKey.generate().public_key())


def test_an_edited_hash_is_refused(tmp_path: Path) -> None:
    path, key, _ = _published(tmp_path)
    document = json.loads(path.read_text())
    document["fab_sha256"] = "0" * 64
    path.write_text(json.dumps(document))
    with pytest.raises(ReleaseError, match="not signed"):
        load_release(path, key.public_key())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.with_name("release.json.sig").unlink(), "release.json.sig is missing"),
        (lambda p: p.write_text("{not json"), "not JSON"),
        (lambda p: p.write_text("[1, 2]"), "not a release record"),
        (lambda p: p.write_text(json.dumps({"app": "fedlora"})), "required"),
        (lambda p: p.write_bytes(b"x" * 70_000), "larger than"),
    ],
    ids=["no-signature", "not-json", "not-an-object", "fields-missing", "huge"],
)
def test_a_damaged_release_names_its_problem(tmp_path: Path, damage: object, message: str) -> None:
    path, key, _ = _published(tmp_path)
    damage(path)  # type: ignore[operator]
    with pytest.raises(ReleaseError, match=message):
        load_release(path, key.public_key())


@pytest.mark.slow  # hashes the whole checkout, virtualenv included, twice
def test_the_release_bundle_is_the_one_flwr_run_builds() -> None:
    """The hash a coordinator publishes is the hash of what its `flwr run` submits
    (Flower's build_fab_from_disk, which walks the whole checkout, virtualenv too)."""
    from flwr.cli.build import build_fab_from_disk

    from common.release import build_fab

    root = Path(__file__).resolve().parents[3]
    assert fab_sha256(build_fab(root)) == fab_sha256(build_fab_from_disk(root))
