"""The keys a site holds: its node-authentication key (ECDSA, OpenSSH format, what
``flower-supernode`` reads and ``flwr supernode register`` registers) and its Ed25519
audit key; made, loaded and checked here.

Keys are checked on loading as Flower will check them (format, curve, file mode), so a
key that would fail at registration or at the SuperNode's start is refused here, with
the file's name and what to do instead.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import signing
from common.errors import ConfigError, SigningError
from common.files import write_atomically, write_private_file
from common.pki_layout import AUDIT_PUB, NODE_PUB, SITES

logger = logging.getLogger(__name__)

# The curves Flower accepts for node authentication (flwr's uses_nist_ec_curve).
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
NODE_CURVE = ec.SECP384R1


def refuse_existing(paths: Sequence[Path], hint: str) -> None:
    """Refuse, naming every one of ``paths`` that exists: a key is never overwritten by
    accident."""
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}; {hint}")


def openssh_public(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The one-line OpenSSH form, as ``node.pub`` holds it."""
    return public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def node_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's ``SHA256:…`` fingerprint, as ``ssh-keygen -lf node.pub`` prints it, so a
    coordinator and a site operator can compare keys over the phone."""
    blob = base64.b64decode(openssh_public(public_key).split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def _check_node_curve(key: ec.EllipticCurvePublicKey, path: Path, what: str) -> None:
    if not isinstance(key.curve, NIST_CURVES):
        raise ConfigError(
            f"{what} {path} uses the curve {key.curve.name}, which Flower does not accept; "
            "use a NIST curve (the keys `fedlora pki site-keys` writes use P-384)"
        )


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _read_public_key_file(path: Path, what: str, expected: str) -> bytes:
    """The bytes of a public key a site sent; a private key sent by mistake is refused."""
    data = _read_key_file(path, what)
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"{path} is a private key; the site must keep it and send only its {expected}"
        )
    return data


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A SuperNode's public key, checked as ``flwr supernode register`` checks it: an
    OpenSSH EC key on a NIST curve (so a bad key is refused here, not at registration)."""
    data = _read_public_key_file(
        path, "node public key", f"{NODE_PUB} (the line starting 'ecdsa-sha2-nistp384 ')"
    )
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it looks like PEM)" if data.lstrip().startswith(b"-----BEGIN") else ""
        raise ConfigError(
            f"node public key {path} is not an OpenSSH public key{hint}: expected one line "
            "starting 'ecdsa-sha2-nistp384 AAAA', as `fedlora pki site-keys` writes it"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"node public key {path} is a {key.__class__.__name__.removesuffix('PublicKey')} "
            "key; Flower node authentication needs an EC (ecdsa-sha2-nistp…) key, such as "
            "the one `fedlora pki site-keys` writes"
        )
    _check_node_curve(key, path, "node public key")
    return key


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode's private key, checked as ``flower-supernode`` checks it (an unencrypted
    OpenSSH EC key) and, like every fedlora private key, not readable by other users."""
    data = _read_key_file(path, "node key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:  # encrypted: flower-supernode cannot ask for a passphrase
        raise ConfigError(
            f"node key {path} is protected by a passphrase, which flower-supernode cannot "
            "enter; it needs an unencrypted key (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"node key {path} is not an OpenSSH private key "
            "('-----BEGIN OPENSSH PRIVATE KEY-----'), as `fedlora pki site-keys` writes it"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"node key {path} is not an EC key; Flower node authentication needs an "
            "ecdsa-sha2-nistp… key, such as the one `fedlora pki site-keys` writes"
        )
    _check_node_curve(key.public_key(), path, "node key")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"node key {path} is readable by other users; run `chmod 600 {path}`")
    return key


def write_node_key_pair(private_path: Path, public_path: Path) -> None:
    """Create a P-384 node key pair: the private key in OpenSSH format (mode 0600) for
    ``flower-supernode``, the public key as one OpenSSH line for ``flwr supernode register``.
    Refuses to overwrite either file: a node key replaced by mistake locks the site out."""
    refuse_existing([private_path, public_path], "move the old node key pair away first")
    key = ec.generate_private_key(NODE_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    try:
        write_private_file(private_path, private)
    except FileExistsError:
        raise ConfigError(f"refusing to overwrite {private_path}: it appeared meanwhile") from None
    write_atomically(public_path, openssh_public(key.public_key()).decode("ascii") + "\n")
    logger.debug("wrote node key pair %s, %s", private_path, public_path)


def registered_node_keys(certs: Path) -> dict[str, Path]:
    """Site name -> ``sites/NAME/node.pub`` for every site ``add-site`` registered, sorted."""
    sites = certs / SITES
    if not sites.is_dir():
        return {}
    found: dict[str, Path] = {}
    for folder in sorted(sites.iterdir()):
        if not folder.is_dir():
            continue
        public = folder / NODE_PUB
        if public.is_file():
            found[folder.name] = public
        else:
            logger.warning(
                "site folder %s has no %s; it is not a registered site", folder, NODE_PUB
            )
    return found


def load_audit_public_key(path: Path) -> Ed25519PublicKey:
    """A site's audit key as sent to the coordinator: a PEM Ed25519 *public* key."""
    _read_public_key_file(path, "audit public key", AUDIT_PUB)
    try:
        return signing.load_public_key(path)
    except SigningError as exc:
        raise ConfigError(
            f"audit public key {path} is not usable ({exc}); expected a PEM Ed25519 public "
            "key, as `fedlora pki site-keys` writes it"
        ) from None


def write_ed25519_pair(private_path: Path, public_path: Path, *, replace: bool) -> None:
    """A new Ed25519 signing key pair: the private key 0600 from its first byte."""
    if replace:
        private_path.unlink(missing_ok=True)
    key = Ed25519PrivateKey.generate()
    try:
        signing.write_private_key(private_path, key)
    except FileExistsError:
        raise ConfigError(f"refusing to overwrite {private_path}: it appeared meanwhile") from None
    signing.write_public_key(public_path, key.public_key())
