"""The federation's keys and certificates, made by the coordinator (and, for a site's own
keys, at the site).

A deployment needs three kinds of trust, each with its own key:

* TLS: the SuperLink proves who it is with a certificate from the federation's own CA,
  which every site pins (``ca.pem``), so no public CA is involved.
* Node authentication: each SuperNode signs its requests with an EC key in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` reads); the coordinator
  registers the public half with ``flwr supernode register``.
* Audit and artifacts: the coordinator and each site sign with Ed25519 keys
  (:mod:`common.signing`).

The folder layout (``certs/`` by default) is fixed, because other code reads it::

    CERTS/                      mode 0700
      ca.pem, ca.key            the federation CA (private key 0600)
      superlink.pem, .key       the SuperLink's TLS certificate and key
      coordinator.key, .pub     the coordinator's Ed25519 signing key pair
      sites/NAME/node.pub       a site's node-authentication public key (OpenSSH)
      sites/NAME/audit.pub      a site's Ed25519 audit public key (PEM), when known
      bundles/NAME/             what the coordinator hands to the site operator

Private keys are created with mode 0600 from the first byte and never overwritten in
place: another process sees the old key or the new one, whole.

This module holds the three operations (``init``, ``add-site``, ``site-keys``); what
they are made of lives beside it, one job a module: :mod:`common.pki_layout` (the
folder's names), :mod:`common.pki_names` (addresses and site names),
:mod:`common.pki_keys` (node and audit keys), :mod:`common.pki_certificates` (the CA
and the TLS certificate) and :mod:`common.pki_bundle` (the bundle's texts). Every name
other modules use is re-exported here, so they import ``common.pki`` alone.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common import signing
from common.errors import ConfigError
from common.files import write_atomically, write_private_file
from common.pki_bundle import PLACEHOLDER_NODE_KEY, connection_toml, readme_text
from common.pki_certificates import (
    CA_DAYS,
    CLOCK_SKEW,
    build_ca,
    build_server_certificate,
    certificate_expiry,
    certificate_sans,
    check_certificate_chain,
    general_name_text,
    load_certificate,
    pem_certificate,
    pem_private_key,
    utc_now,
)
from common.pki_keys import (
    NIST_CURVES,
    NODE_CURVE,
    load_audit_public_key,
    load_node_private_key,
    load_node_public_key,
    node_key_fingerprint,
    openssh_public,
    refuse_existing,
    registered_node_keys,
    write_ed25519_pair,
    write_node_key_pair,
)
from common.pki_layout import (
    AUDIT_KEY,
    AUDIT_PUB,
    BUNDLES,
    CA_CERT,
    CA_KEY,
    CERTS_MODE,
    CONNECTION,
    COORDINATOR_KEY,
    COORDINATOR_PUB,
    NODE_KEY,
    NODE_PUB,
    PRIVATE_KEY_MODE,
    README,
    SITES,
    SUPERLINK_CERT,
    SUPERLINK_KEY,
)
from common.pki_names import address_name, check_site_name, parse_superlink

__all__ = [
    "AUDIT_KEY",
    "AUDIT_PUB",
    "BUNDLES",
    "CA_CERT",
    "CA_DAYS",
    "CA_KEY",
    "CERTS_MODE",
    "CLOCK_SKEW",
    "CONNECTION",
    "COORDINATOR_KEY",
    "COORDINATOR_PUB",
    "DEFAULT_ADDRESSES",
    "NIST_CURVES",
    "NODE_CURVE",
    "NODE_KEY",
    "NODE_PUB",
    "PLACEHOLDER_NODE_KEY",
    "PRIVATE_KEY_MODE",
    "README",
    "SITES",
    "SUPERLINK_CERT",
    "SUPERLINK_KEY",
    "add_site",
    "certificate_expiry",
    "certificate_sans",
    "check_certificate_chain",
    "check_site_name",
    "init_pki",
    "load_certificate",
    "load_node_private_key",
    "load_node_public_key",
    "make_site_keys",
    "node_key_fingerprint",
    "parse_superlink",
    "registered_node_keys",
    "write_node_key_pair",
]

logger = logging.getLogger(__name__)

DEFAULT_ADDRESSES = ("localhost", "127.0.0.1", "::1")


# ------------------------------------------------------------------------- init ---


def _prepare_certs_folder(certs: Path) -> None:
    certs.mkdir(parents=True, exist_ok=True, mode=CERTS_MODE)
    os.chmod(certs, CERTS_MODE)  # mkdir's mode is masked by the umask; an old folder kept 0755


def init_pki(certs: Path, addresses: Sequence[str], days: int = 365, force: bool = False) -> None:
    """Create the CA, the SuperLink's TLS certificate (valid for ``addresses``) and the
    coordinator's Ed25519 key pair. Refuses if any of them exists, unless ``force``:
    a new CA invalidates every bundle already handed out."""
    if not 1 <= days <= CA_DAYS:
        raise ConfigError(
            f"--days {days}: the SuperLink certificate must be valid for 1 to {CA_DAYS} days "
            "(not longer than the CA)"
        )
    if isinstance(addresses, str):  # one address, not a sequence of one-letter names
        addresses = [addresses]
    names: list[x509.GeneralName] = []
    # The coordinator's own commands reach the SuperLink on loopback: always valid there.
    for address in [*addresses, *DEFAULT_ADDRESSES]:
        name = address_name(address)
        if name not in names:
            names.append(name)
    outputs = [CA_CERT, CA_KEY, SUPERLINK_CERT, SUPERLINK_KEY, COORDINATOR_KEY, COORDINATOR_PUB]
    existing = [name for name in outputs if (certs / name).exists()]
    if existing and not force:
        raise ConfigError(
            f"{certs} already holds a PKI ({', '.join(existing)}); use --force to replace "
            "it, which invalidates every bundle handed out"
        )
    _prepare_certs_folder(certs)
    now = utc_now()
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = build_ca(ca_key, now)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = build_server_certificate(server_key, ca, ca_key, names, days, now)
    # ca.pem goes last: its presence is what marks a finished `init`.
    write_private_file(certs / CA_KEY, pem_private_key(ca_key), replace=force)
    write_private_file(certs / SUPERLINK_KEY, pem_private_key(server_key), replace=force)
    write_atomically(certs / SUPERLINK_CERT, pem_certificate(server))
    write_ed25519_pair(certs / COORDINATOR_KEY, certs / COORDINATOR_PUB, replace=force)
    write_atomically(certs / CA_CERT, pem_certificate(ca))
    logger.debug(
        "created the PKI in %s: CA until %s, SuperLink certificate for %s until %s",
        certs,
        ca.not_valid_after_utc.date(),
        ", ".join(general_name_text(name) for name in names),
        server.not_valid_after_utc.date(),
    )


# --------------------------------------------------------------------- add-site ---


def _refuse_a_key_of_another_site(
    certs: Path, name: str, node_key: ec.EllipticCurvePublicKey, given: Path
) -> None:
    """Every site needs its own node key: refuse one registered for another site."""
    fingerprint = node_key_fingerprint(node_key)
    for other, path in registered_node_keys(certs).items():
        try:
            known = node_key_fingerprint(load_node_public_key(path))
        except ConfigError as exc:
            logger.warning("cannot compare with site %s: %s", other, exc)
            continue
        if other != name and known == fingerprint:
            raise ConfigError(
                f"node key {given} ({fingerprint}) is already registered for "
                f"site {other}; every site needs its own node key"
            )


def add_site(
    certs: Path,
    name: str,
    superlink: str,
    node_public_key: Path | None = None,
    audit_public_key: Path | None = None,
    force: bool = False,
) -> Path:
    """Register site ``name`` and write its bundle; returns the bundle folder.

    With ``node_public_key`` (the preferred flow) the site made its own keys and the
    bundle holds no private key. Without it, the coordinator makes the site's node and
    audit key pairs into the bundle, which must then travel like a password.
    """
    check_site_name(name)
    parse_superlink(superlink)
    ca_path = certs / CA_CERT
    if not ca_path.is_file():
        raise ConfigError(f"no CA at {ca_path}: run `fedlora pki init --certs {certs}` first")
    if audit_public_key is not None and node_public_key is None:
        raise ConfigError(
            "an audit public key needs the site's node public key too (the site writes both "
            "with `fedlora pki site-keys`)"
        )
    certs = certs.absolute()
    site_dir, bundle = certs / SITES / name, certs / BUNDLES / name
    if not force and (site_dir.exists() or bundle.exists()):
        raise ConfigError(
            f"site {name} is already registered ({site_dir}, {bundle}); use --force to "
            "replace its keys and bundle"
        )
    # Read everything before deleting anything: the given keys may sit in the old bundle.
    node_key = load_node_public_key(node_public_key) if node_public_key is not None else None
    audit_key = load_audit_public_key(audit_public_key) if audit_public_key is not None else None
    if node_key is not None and node_public_key is not None:
        _refuse_a_key_of_another_site(certs, name, node_key, node_public_key)
    ca_pem = ca_path.read_text(encoding="ascii")
    coordinator_pub = certs / COORDINATOR_PUB
    coordinator = signing.load_public_key(coordinator_pub)
    for folder in (site_dir, bundle):
        if folder.exists():
            shutil.rmtree(folder)
            logger.debug("removed the old %s", folder)
    bundle.mkdir(parents=True, mode=CERTS_MODE)
    site_dir.mkdir(parents=True)
    generated = node_key is None
    if node_key is None:
        write_node_key_pair(bundle / NODE_KEY, bundle / NODE_PUB)
        node_key = load_node_public_key(bundle / NODE_PUB)
        write_ed25519_pair(bundle / AUDIT_KEY, bundle / AUDIT_PUB, replace=False)
        audit_key = signing.load_public_key(bundle / AUDIT_PUB)
        shutil.copyfile(bundle / NODE_PUB, site_dir / NODE_PUB)
        shutil.copyfile(bundle / AUDIT_PUB, site_dir / AUDIT_PUB)
    else:
        write_atomically(site_dir / NODE_PUB, openssh_public(node_key).decode("ascii") + "\n")
        if audit_key is not None:
            signing.write_public_key(site_dir / AUDIT_PUB, audit_key)
    write_atomically(bundle / CA_CERT, ca_pem)
    signing.write_public_key(bundle / COORDINATOR_PUB, coordinator)
    connection = connection_toml(
        name, bundle, superlink, generated=generated, audit_known=audit_key is not None
    )
    write_atomically(bundle / CONNECTION, connection)
    fingerprints = (node_key_fingerprint(node_key), signing.fingerprint(coordinator))
    write_atomically(
        bundle / README, readme_text(name, superlink, bundle, *fingerprints, generated)
    )
    logger.debug(
        "registered site %s (node key %s)%s; bundle in %s",
        name,
        node_key_fingerprint(node_key),
        ", with the private keys it generated" if generated else "",
        bundle,
    )
    return bundle


# ------------------------------------------------------------------- site-keys ---


def make_site_keys(directory: Path) -> None:
    """At the site: create the node key pair and the audit key pair in ``directory``, so
    no private key ever leaves the site. Refuses to overwrite any of the four files."""
    outputs = [directory / name for name in (NODE_KEY, NODE_PUB, AUDIT_KEY, AUDIT_PUB)]
    refuse_existing(outputs, "these keys exist already (send their .pub files, or move them away)")
    directory.mkdir(parents=True, exist_ok=True, mode=CERTS_MODE)
    write_node_key_pair(directory / NODE_KEY, directory / NODE_PUB)
    write_ed25519_pair(directory / AUDIT_KEY, directory / AUDIT_PUB, replace=False)
    logger.debug("wrote the site's node and audit key pairs in %s", directory)
