"""Ed25519 keys for the audit trail (and, later, the artifact): load, create, sign, check.

Private keys are PKCS#8 PEM files written with mode 0600; public keys are
SubjectPublicKeyInfo PEM. A key is named by its fingerprint (the SHA-256 of its raw 32
bytes), which is what logs and reports show instead of anything about its holder.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import SigningError
from common.files import write_private_file

PRIVATE_KEY_MODE = 0o600


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: Ed25519PublicKey) -> str:
    return "ed25519:" + hashlib.sha256(_raw(public_key)).hexdigest()


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The public key as base64 of its raw bytes: short enough to sit in a log entry."""
    return base64.b64encode(_raw(public_key)).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SigningError(f"not an Ed25519 public key: {exc}") from None


def sign(private_key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(private_key.sign(message)).decode("ascii")


def signature_valid(public_key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def write_private_key(path: Path, private_key: Ed25519PrivateKey) -> None:
    """Create ``path`` (mode 0600) holding ``private_key``; FileExistsError if it exists.

    The key is written to a temporary file and linked into place, so another process
    never reads a half-written key.
    """
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)


def write_public_key(path: Path, public_key: Ed25519PublicKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SigningError(f"signing key {path} does not exist") from None
    except (ValueError, TypeError) as exc:
        raise SigningError(f"signing key {path} is not a readable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing key {path} is not an Ed25519 key")
    if path.stat().st_mode & 0o077:
        raise SigningError(f"signing key {path} is readable by other users; run `chmod 600 {path}`")
    return key


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, created on first use (a site or a simulation run)."""
    if not path.exists():
        # Another process of the same party may create it first; then that key is used.
        with contextlib.suppress(FileExistsError):
            write_private_key(path, Ed25519PrivateKey.generate())
    return load_private_key(path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key from a PEM file, or the public half of a PEM private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SigningError(f"{path} is not a PEM Ed25519 public or private key") from None
        key = private.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 key")
    return key
