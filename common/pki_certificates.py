"""The federation's X.509 certificates: its own CA and the SuperLink's TLS certificate,
built, loaded and checked.

Checking a chain and its validity dates here turns what a site's TLS handshake would
reject with an opaque error (a certificate of another CA, an expired one, a clock that
runs behind) into a message that names the file and the fix.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

CA_DAYS = 3650
# Certificates start a few minutes in the past, so a site whose clock runs slightly
# behind the coordinator's does not reject a certificate made a moment ago.
CLOCK_SKEW = timedelta(minutes=5)


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM, as the SuperLink reads its TLS key."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_certificate(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def general_name_text(name: x509.GeneralName) -> str:
    """A SAN as text: the host name or the IP address."""
    return str(name.value)


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_ca(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
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


def build_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[x509.GeneralName],
    days: int,
    now: datetime,
) -> x509.Certificate:
    common_name = general_name_text(names[0])
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
    return [general_name_text(name) for name in extension.value]


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
    now = utc_now()
    _check_validity(authority, ca, now)
    _check_validity(certificate, cert, now)


def certificate_expiry(path: Path) -> datetime:
    """When the certificate stops being valid (UTC)."""
    return load_certificate(path).not_valid_after_utc
