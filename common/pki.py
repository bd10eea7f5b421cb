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
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import signing
from common.errors import ConfigError, SigningError
from common.files import PRIVATE_FILE_MODE, write_atomically, write_private_file

logger = logging.getLogger(__name__)

PRIVATE_KEY_MODE = PRIVATE_FILE_MODE
CERTS_MODE = 0o700

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.pem"
SUPERLINK_KEY = "superlink.key"
COORDINATOR_KEY = "coordinator.key"
COORDINATOR_PUB = "coordinator.pub"
SITES = "sites"
BUNDLES = "bundles"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
AUDIT_KEY = "audit-key.pem"
AUDIT_PUB = "audit.pub"
CONNECTION = "connection.toml"
README = "README.txt"
PLACEHOLDER_NODE_KEY = "/path/to/node.key"
"""What connection.toml's commented node_key line holds until the site fills it in."""

DEFAULT_ADDRESSES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
# Certificates start a few minutes in the past, so a site whose clock runs slightly
# behind the coordinator's does not reject a certificate made a moment ago.
CLOCK_SKEW = timedelta(minutes=5)

# The site id pattern of common.config.SiteIdentity: a site is named the same everywhere.
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# The curves Flower accepts for node authentication (flwr's uses_nist_ec_curve).
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
NODE_CURVE = ec.SECP384R1


# ------------------------------------------------------------------------ writing ---


def _refuse_existing(paths: Sequence[Path], hint: str) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}; {hint}")


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_certificate(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


# ---------------------------------------------------------------- node keys (ECDSA) ---


def _openssh_public(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def node_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key's ``SHA256:…`` fingerprint, as ``ssh-keygen -lf node.pub`` prints it, so a
    coordinator and a site operator can compare keys over the phone."""
    blob = base64.b64decode(_openssh_public(public_key).split()[1])
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
    _refuse_existing([private_path, public_path], "move the old node key pair away first")
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
    write_atomically(public_path, _openssh_public(key.public_key()).decode("ascii") + "\n")
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


# ---------------------------------------------------------------- Ed25519 (audit) ---


def _load_audit_public_key(path: Path) -> Ed25519PublicKey:
    """A site's audit key as sent to the coordinator: a PEM Ed25519 *public* key."""
    _read_public_key_file(path, "audit public key", AUDIT_PUB)
    try:
        return signing.load_public_key(path)
    except SigningError as exc:
        raise ConfigError(
            f"audit public key {path} is not usable ({exc}); expected a PEM Ed25519 public "
            "key, as `fedlora pki site-keys` writes it"
        ) from None


def _write_ed25519_pair(private_path: Path, public_path: Path, *, replace: bool) -> None:
    if replace:
        private_path.unlink(missing_ok=True)
    key = Ed25519PrivateKey.generate()
    try:
        signing.write_private_key(private_path, key)
    except FileExistsError:
        raise ConfigError(f"refusing to overwrite {private_path}: it appeared meanwhile") from None
    signing.write_public_key(public_path, key.public_key())


# ------------------------------------------------------------------- certificates ---


def _address_name(address: str) -> x509.GeneralName:
    """An ``--address`` as a SAN: an IP address, or a DNS name (ASCII, no port)."""
    value = address.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.lower()
    labels = name.split(".")
    if ":" in name:
        raise ConfigError(
            f"address {address!r} is neither an IP address nor a host name; give the "
            "SuperLink's host name or IP without a port"
        )
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"address {address!r} is not a valid host name (letters, digits, '-' and '.'; "
            "write internationalised names in their xn-- form)"
        )
    return x509.DNSName(name)


def _general_name_text(name: x509.GeneralName) -> str:
    return str(name.value)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _build_ca(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
            # A per-CA suffix, so two federations' CAs are never mistaken for each other.
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"fedlora federation CA {secrets.token_hex(4)}"
            ),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def _build_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[x509.GeneralName],
    days: int,
    now: datetime,
) -> x509.Certificate:
    common_name = _general_name_text(names[0])
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora")]
    if len(common_name) <= 64:  # the X.509 limit; the SANs carry the names anyway
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate, or a ConfigError that names the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"certificate {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None


def certificate_sans(path: Path) -> list[str]:
    """The names (DNS names and IP addresses) a certificate is valid for, in its order."""
    certificate = load_certificate(path)
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [_general_name_text(name) for name in extension.value]


def _check_validity(certificate: x509.Certificate, path: Path, now: datetime) -> None:
    if now > certificate.not_valid_after_utc:
        raise ConfigError(
            f"certificate {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now < certificate.not_valid_before_utc:
        raise ConfigError(
            f"certificate {path} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this machine's clock "
            "right?)"
        )


def check_certificate_chain(cert: Path, ca: Path) -> None:
    """Raise ConfigError unless ``cert`` was signed by the CA in ``ca`` and both are
    valid now: what a site's TLS handshake would otherwise reject, less helpfully."""
    certificate = load_certificate(cert)
    authority = load_certificate(ca)
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise ConfigError(
            f"certificate {cert} was not signed by the CA in {ca}; issue it again with "
            "`fedlora pki init --force`, or hand out the CA that signed it"
        ) from None
    now = _utc_now()
    _check_validity(authority, ca, now)
    _check_validity(certificate, cert, now)


def certificate_expiry(path: Path) -> datetime:
    """When the certificate stops being valid (UTC)."""
    return load_certificate(path).not_valid_after_utc


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
        name = _address_name(address)
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
    now = _utc_now()
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _build_ca(ca_key, now)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _build_server_certificate(server_key, ca, ca_key, names, days, now)
    # ca.pem goes last: its presence is what marks a finished `init`.
    write_private_file(certs / CA_KEY, _pem_private(ca_key), replace=force)
    write_private_file(certs / SUPERLINK_KEY, _pem_private(server_key), replace=force)
    write_atomically(certs / SUPERLINK_CERT, _pem_certificate(server))
    _write_ed25519_pair(certs / COORDINATOR_KEY, certs / COORDINATOR_PUB, replace=force)
    write_atomically(certs / CA_CERT, _pem_certificate(ca))
    logger.debug(
        "created the PKI in %s: CA until %s, SuperLink certificate for %s until %s",
        certs,
        ca.not_valid_after_utc.date(),
        ", ".join(_general_name_text(name) for name in names),
        server.not_valid_after_utc.date(),
    )


# --------------------------------------------------------------------- add-site ---


def check_site_name(name: str) -> None:
    """Site names are the site ids of the site configs (and folder names here)."""
    if not SITE_NAME.match(name):
        raise ConfigError(
            f"site name {name!r} is not valid: use 2 to 63 lowercase letters, digits and "
            "'-', starting with a letter or digit (the site.id of the site's config)"
        )


def parse_superlink(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as the sites' ``flower-supernode --superlink`` takes it."""
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d+)", value)
    if bracketed:
        host, port_text = bracketed.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--superlink {value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, _, port_text = value.rpartition(":")
        if not host or not port_text.isdigit():
            raise ConfigError(
                f"--superlink {value!r} is not HOST:PORT (for example superlink.example.org:9092 "
                "or [2001:db8::1]:9092)"
            )
        if ":" in host:
            raise ConfigError(f"--superlink {value!r}: write an IPv6 address in brackets, [{host}]")
        _address_name(host)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"--superlink {value!r}: the port must be between 1 and 65535")
    return host, port


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX for the rest).
    return json.dumps(value, ensure_ascii=True)


def _own_keys_note(bundle: Path, *, generated: bool, audit_known: bool) -> list[str]:
    """connection.toml's note on the site's own keys. The audit key is a [site] setting,
    so it is told in words, before the [connection] header: a line uncommented there
    would not land in [site] (and prose does not parse as a key)."""
    if generated:
        return [
            "# This bundle also holds this site's private keys, made by the coordinator:",
            f"# node_key below is its {NODE_KEY}. The audit-log key belongs in the [site]",
            "# table, not here: in [site] (sites/template.toml has the line), set",
            f"#     signing_key to {_toml_string(str(bundle / AUDIT_KEY))}",
        ]
    own = "# - node_key: uncomment the last line of this file and set it to DIR/node.key;"
    if audit_known:
        audit = [
            "# - the audit-log key belongs in the [site] table, not here: in [site]",
            "#   (sites/template.toml has the line), set signing_key to DIR/audit-key.pem.",
        ]
    else:
        audit = [
            "# - no audit key of yours is on file at the coordinator: the site signs its",
            "#   audit log with site.signing_key, or the key it makes as",
            "#   <state_dir>/audit-key.pem when that is unset.",
        ]
    return ["# Your own keys, from `fedlora pki site-keys DIR`, stay at your site:", own, *audit]


def _connection_toml(
    name: str, bundle: Path, superlink: str, *, generated: bool, audit_known: bool
) -> str:
    """The site config's ``[connection]`` table, to append to the end of the file as is:
    every active line is valid there, and the only setting of another table (the
    site's audit key) is described in a note, not given as a line to uncomment."""
    lines = [
        f"# fedlora connection settings for site {name}, from the coordinator.",
        "# Append this whole file to the end of the site config (after its last table):",
        f"#     cat {CONNECTION} >> SITE.toml",
        "# The paths are where the coordinator wrote this bundle: change them if the",
        "# files move.",
        "#",
        *_own_keys_note(bundle, generated=generated, audit_known=audit_known),
        "",
        "[connection]",
        "# The SuperLink's address, HOST:PORT; its TLS certificate is valid for HOST.",
        f"superlink = {_toml_string(superlink)}",
        "# The federation's CA certificate: the SuperLink's certificate must chain to it.",
        f"ca_certificate = {_toml_string(str(bundle / CA_CERT))}",
        "# The coordinator's Ed25519 public key: the site installs only artifacts it",
        "# signed. It counts as site.coordinator_key: do not set that one too.",
        f"coordinator_key = {_toml_string(str(bundle / COORDINATOR_PUB))}",
        "# This site's node-authentication private key (OpenSSH, mode 0600).",
    ]
    if generated:
        lines.append(f"node_key = {_toml_string(str(bundle / NODE_KEY))}")
    else:
        lines += [
            "# Uncomment, and point it at the node.key `fedlora pki site-keys` wrote:",
            f"# node_key = {_toml_string(PLACEHOLDER_NODE_KEY)}",
        ]
    return "\n".join(lines) + "\n"


def _readme_steps(bundle: Path, generated: bool) -> str:
    """The site operator's steps, from the template to the running daemon."""
    if generated:
        keys = (
            f"set signing_key in its [site] table to\n     {bundle / AUDIT_KEY}\n"
            "   (node_key is set already)"
        )
    else:
        keys = (
            "uncomment node_key at its end and point it at the node.key of\n"
            "   `fedlora pki site-keys`; set signing_key in its [site] table to the\n"
            "   audit-key.pem next to it"
        )
    return f"""\
1. Write the site config from sites/template.toml (data, privacy budget, policy;
   leave its [connection] lines and site.coordinator_key commented).
2. Append {CONNECTION} to its end:
     cat {bundle / CONNECTION} >> SITE.toml
   It sets the [connection] table: the SuperLink, this CA, the coordinator's key.
3. In SITE.toml, {keys}.
4. Review the release the coordinator sent (release.json and release.json.sig) and
   pin it: this checks its signature with the coordinator's key and prints the
   client_releases line for the [policy] table (the site runs no other bundle):
     fedlora site release SITE.toml --release release.json
5. Check the site against the run the coordinator plans (its federation config),
   then start the daemon (or the systemd unit fedlora-site@):
     fedlora site check SITE.toml --federation FEDERATION.toml
     fedlora site run SITE.toml"""


def _readme(
    name: str,
    superlink: str,
    bundle: Path,
    node_fingerprint: str,
    coordinator: str,
    generated: bool,
) -> str:
    files = [
        (CA_CERT, "the federation's CA; the SuperLink's TLS certificate chains to it"),
        (COORDINATOR_PUB, "the coordinator's Ed25519 key; the site installs only artifacts"),
        ("", "signed by it"),
        (CONNECTION, "the [connection] table: append it to the end of the site config"),
    ]
    if generated:
        files += [
            (NODE_KEY, "this site's node-authentication PRIVATE key (mode 0600)"),
            (NODE_PUB, "its public half, registered at the SuperLink"),
            (AUDIT_KEY, "this site's audit-log signing PRIVATE key (mode 0600)"),
            (AUDIT_PUB, "its public half, on file at the coordinator"),
        ]
        keys = (
            "The coordinator made these private keys and they travelled to you: keep them\n"
            "only on the machine that runs the SuperNode, and delete every other copy."
        )
        node_key = str(bundle / NODE_KEY)
    else:
        keys = (
            "Your private keys (node.key, audit-key.pem) stay where `fedlora pki site-keys`\n"
            "wrote them; this bundle holds no private key."
        )
        node_key = PLACEHOLDER_NODE_KEY
    listing = "\n".join(f"  {file:<17}{what}" for file, what in files)
    return f"""\
fedlora connection bundle for site {name}

{listing}

{keys}

{_readme_steps(bundle, generated)}

The paths in {CONNECTION} are where the coordinator wrote this bundle
({bundle}); change them if you keep the files elsewhere.

SuperLink:                {superlink}
Registered node key:      {node_fingerprint}
Coordinator signing key:  {coordinator}
Compare both fingerprints with the coordinator over another channel (the phone);
`ssh-keygen -lf node.pub` prints the node key's.

`fedlora site run` connects with the settings of {CONNECTION}; by hand, that is:

  flower-supernode --superlink {superlink} \\
      --root-certificates {bundle / CA_CERT} \\
      --auth-supernode-private-key {node_key}
"""


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
    audit_key = _load_audit_public_key(audit_public_key) if audit_public_key is not None else None
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
        _write_ed25519_pair(bundle / AUDIT_KEY, bundle / AUDIT_PUB, replace=False)
        audit_key = signing.load_public_key(bundle / AUDIT_PUB)
        shutil.copyfile(bundle / NODE_PUB, site_dir / NODE_PUB)
        shutil.copyfile(bundle / AUDIT_PUB, site_dir / AUDIT_PUB)
    else:
        write_atomically(site_dir / NODE_PUB, _openssh_public(node_key).decode("ascii") + "\n")
        if audit_key is not None:
            signing.write_public_key(site_dir / AUDIT_PUB, audit_key)
    write_atomically(bundle / CA_CERT, ca_pem)
    signing.write_public_key(bundle / COORDINATOR_PUB, coordinator)
    connection = _connection_toml(
        name, bundle, superlink, generated=generated, audit_known=audit_key is not None
    )
    write_atomically(bundle / CONNECTION, connection)
    fingerprints = (node_key_fingerprint(node_key), signing.fingerprint(coordinator))
    write_atomically(bundle / README, _readme(name, superlink, bundle, *fingerprints, generated))
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
    _refuse_existing(outputs, "these keys exist already (send their .pub files, or move them away)")
    directory.mkdir(parents=True, exist_ok=True, mode=CERTS_MODE)
    write_node_key_pair(directory / NODE_KEY, directory / NODE_PUB)
    _write_ed25519_pair(directory / AUDIT_KEY, directory / AUDIT_PUB, replace=False)
    logger.debug("wrote the site's node and audit key pairs in %s", directory)
