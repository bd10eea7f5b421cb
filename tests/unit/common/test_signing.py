"""Ed25519 key files and signatures: modes, refusals, key kinds, concurrent creation."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import FedloraError, SigningError
from common.signing import (
    fingerprint,
    load_or_create_private_key,
    load_private_key,
    load_public_key,
    public_key_from_text,
    public_key_text,
    sign,
    signature_valid,
    write_private_key,
    write_public_key,
)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _pem_private(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ------------------------------------------------------------------ fingerprints ---


def test_fingerprint_is_sha256_of_the_raw_public_key() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    assert fingerprint(public) == "ed25519:" + hashlib.sha256(_raw_public(public)).hexdigest()


def test_fingerprints_of_different_keys_differ() -> None:
    first = Ed25519PrivateKey.generate().public_key()
    second = Ed25519PrivateKey.generate().public_key()
    assert fingerprint(first) != fingerprint(second)


def test_public_key_text_round_trips() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    text = public_key_text(public)
    assert base64.b64decode(text) == _raw_public(public)
    assert _raw_public(public_key_from_text(text)) == _raw_public(public)


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        base64.b64encode(b"\x01" * 31).decode(),  # one byte short
        base64.b64encode(b"\x01" * 33).decode(),  # one byte long
        "",
    ],
)
def test_public_key_from_text_rejects_garbage(text: str) -> None:
    with pytest.raises(SigningError, match="not an Ed25519 public key"):
        public_key_from_text(text)


# -------------------------------------------------------------------- signatures ---


def test_signature_by_the_key_is_valid() -> None:
    key = Ed25519PrivateKey.generate()
    assert signature_valid(key.public_key(), b"message", sign(key, b"message"))


def test_signature_of_another_message_is_invalid() -> None:
    key = Ed25519PrivateKey.generate()
    assert not signature_valid(key.public_key(), b"message!", sign(key, b"message"))


def test_signature_by_another_key_is_invalid() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    assert not signature_valid(key.public_key(), b"message", sign(other, b"message"))


@pytest.mark.parametrize(
    "signature",
    [
        "%%% not base64 %%%",
        "YWJj=",  # bad padding
        base64.b64encode(b"\x00" * 64).decode(),  # well-formed, wrong
        base64.b64encode(b"\x00" * 10).decode(),  # wrong length
        "",
        "é" * 8,  # not ASCII
    ],
)
def test_garbage_signature_is_invalid_not_an_error(signature: str) -> None:
    key = Ed25519PrivateKey.generate()
    assert not signature_valid(key.public_key(), b"message", signature)


# --------------------------------------------------------------- private key files ---


def test_private_key_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "nested" / "site.key"
    write_private_key(path, key)
    assert _mode(path) == 0o600
    assert _raw_private(load_private_key(path)) == _raw_private(key)
    # no temporary file is left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["site.key"]


def test_private_key_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        write_private_key(tmp_path / "site.key", Ed25519PrivateKey.generate())
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "site.key") == 0o600


def test_private_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(path, Ed25519PrivateKey.generate())
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_private_key(path, Ed25519PrivateKey.generate())
    assert path.read_bytes() == before
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_group_or_world_readable_key_is_refused_with_chmod_hint(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site.key"
    write_private_key(path, Ed25519PrivateKey.generate())
    path.chmod(mode)
    with pytest.raises(SigningError, match=r"chmod 600") as caught:
        load_private_key(path)
    assert str(path) in str(caught.value)
    assert "readable by other users" in str(caught.value)


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(path, Ed25519PrivateKey.generate())
    path.chmod(0o400)
    assert isinstance(load_private_key(path), Ed25519PrivateKey)


def test_missing_private_key_is_a_signing_error(tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="does not exist"):
        load_private_key(tmp_path / "absent.key")


def test_garbage_private_key_is_a_signing_error(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(SigningError, match="not a readable PEM private key"):
        load_private_key(path)


def test_non_ed25519_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(_pem_private(ec.generate_private_key(ec.SECP256R1())))
    path.chmod(0o600)
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        load_private_key(path)


def test_signing_error_is_a_fedlora_error() -> None:
    assert issubclass(SigningError, FedloraError)


def test_load_or_create_creates_once_and_returns_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.key"
    first = load_or_create_private_key(path)
    assert path.exists()
    assert _mode(path) == 0o600
    content = path.read_bytes()
    second = load_or_create_private_key(path)
    assert _raw_private(first) == _raw_private(second)
    assert path.read_bytes() == content


def test_load_or_create_uses_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    assert _raw_private(load_or_create_private_key(path)) == _raw_private(key)


def test_load_or_create_still_refuses_a_readable_key(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_private_key(path, Ed25519PrivateKey.generate())
    path.chmod(0o644)
    with pytest.raises(SigningError, match="chmod 600"):
        load_or_create_private_key(path)


# ---------------------------------------------------------------- public key files ---


def test_load_public_key_reads_a_public_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "site.pub"
    write_public_key(path, key.public_key())
    assert path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert _raw_public(load_public_key(path)) == _raw_public(key.public_key())


def test_load_public_key_reads_the_public_half_of_a_private_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "site.key"
    write_private_key(path, key)
    loaded = load_public_key(path)
    assert isinstance(loaded, Ed25519PublicKey)
    assert _raw_public(loaded) == _raw_public(key.public_key())


@pytest.mark.parametrize(
    "make_pem",
    [
        pytest.param(
            lambda: _pem_public(ec.generate_private_key(ec.SECP256R1()).public_key()),
            id="ec-public",
        ),
        pytest.param(
            lambda: _pem_private(ec.generate_private_key(ec.SECP256R1())), id="ec-private"
        ),
        pytest.param(
            lambda: _pem_public(
                rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
            ),
            id="rsa-public",
        ),
        pytest.param(
            lambda: _pem_private(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            id="rsa-private",
        ),
    ],
)
def test_load_public_key_rejects_other_key_kinds(tmp_path: Path, make_pem: object) -> None:
    path = tmp_path / "other.pem"
    path.write_bytes(make_pem())  # type: ignore[operator]
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        load_public_key(path)


def test_load_public_key_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_text("hello\n")
    with pytest.raises(SigningError, match="not a PEM Ed25519 public or private key"):
        load_public_key(path)


def test_load_public_key_of_a_missing_file_is_a_signing_error(tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="cannot read key"):
        load_public_key(tmp_path / "absent.pub")


# -------------------------------------------------------------------- concurrency ---

WORKERS = 6


def _create_in_child(path: str, out: str, barrier: object) -> None:
    barrier.wait(timeout=30)  # type: ignore[attr-defined]
    key = load_or_create_private_key(Path(path))
    Path(out).write_bytes(_raw_private(key))


def test_concurrent_processes_all_end_up_with_the_same_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    path = tmp_path / "keys" / "site.key"
    outputs = [tmp_path / f"out-{i}" for i in range(WORKERS)]
    processes = [
        context.Process(target=_create_in_child, args=(str(path), str(out), barrier))
        for out in outputs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * WORKERS
    keys = {out.read_bytes() for out in outputs}
    assert len(keys) == 1
    assert keys == {_raw_private(load_private_key(path))}
    assert _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["site.key"]
