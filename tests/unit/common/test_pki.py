"""``fedlora pki``: the CA and SuperLink certificate chain (checked by signature and by a
real TLS handshake), key formats exactly as flower-supernode and ``flwr supernode
register`` read them, file modes, bundles, refusals, and the command line."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import stat
import subprocess
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.cli.supernode.register import try_load_public_key

from common import pki, signing
from common.cli import cli
from common.config import SiteConnection, load_site_config
from common.errors import ConfigError
from common.pki_cli import pki as pki_group
from tests.cli_commands import check_commands_exist

# --------------------------------------------------------------------- helpers ---


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify_signed_by(certificate: x509.Certificate, ca_public: ec.EllipticCurvePublicKey) -> None:
    """Raise InvalidSignature unless ``ca_public`` signed ``certificate``."""
    hash_algorithm = certificate.signature_hash_algorithm
    assert hash_algorithm is not None
    ca_public.verify(
        certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(hash_algorithm)
    )


def ca_public_key(certs: Path) -> ec.EllipticCurvePublicKey:
    key = load_cert(certs / "ca.pem").public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def flower_loads_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """What flower-supernode's _try_setup_client_authentication does with the file."""
    key = serialization.load_ssh_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def openssh_line(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def tls_handshake(certs: Path, server_hostname: str) -> None:
    """A TLS 1.2+ handshake in memory between the SuperLink's certificate and a client
    that trusts only ca.pem and checks the host name, as a SuperNode does."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs / "superlink.pem", certs / "superlink.key")
    client_context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=server_hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError("the TLS handshake did not finish")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    pki.init_pki(folder, pki.DEFAULT_ADDRESSES)
    return folder


@pytest.fixture
def site_keys(tmp_path: Path) -> Path:
    folder = tmp_path / "at-the-site"
    pki.make_site_keys(folder)
    return folder


# ------------------------------------------------------------------------ init ---


def test_init_writes_the_layout_with_private_modes(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    folder.mkdir(mode=0o755)  # like the repository's certs/ with its README
    (folder / "README.md").write_text("kept\n")
    folder.chmod(0o755)
    pki.init_pki(folder, ["localhost"])
    assert mode(folder) == 0o700
    assert (folder / "README.md").read_text() == "kept\n"
    for name in ("ca.key", "superlink.key", "coordinator.key"):
        assert mode(folder / name) == 0o600, name
    for name in ("ca.pem", "superlink.pem", "coordinator.pub"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*.tmp"))


def test_the_ca_is_a_ten_year_signing_only_ca(certs: Path) -> None:
    ca = load_cert(certs / "ca.pem")
    assert ca.issuer == ca.subject
    verify_signed_by(ca, ca_public_key(certs))
    assert isinstance(ca_public_key(certs).curve, ec.SECP384R1 | ec.SECP256R1)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3651)
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert ca_key.public_key() == ca.public_key()


def test_the_superlink_certificate_chains_to_the_ca_with_default_names(certs: Path) -> None:
    server = load_cert(certs / "superlink.pem")
    ca = load_cert(certs / "ca.pem")
    assert server.issuer == ca.subject
    verify_signed_by(server, ca_public_key(certs))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert pki.certificate_sans(certs / "superlink.pem") == ["localhost", "127.0.0.1", "::1"]
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=364) < lifetime <= timedelta(days=365)
    server_key = serialization.load_pem_private_key((certs / "superlink.key").read_bytes(), None)
    assert server_key.public_key() == server.public_key()
    pki.check_certificate_chain(certs / "superlink.pem", certs / "ca.pem")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_a_client_trusting_only_the_ca_completes_a_tls_handshake(certs: Path, host: str) -> None:
    tls_handshake(certs, host)


def test_a_tls_client_refuses_a_name_the_certificate_lacks(certs: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(certs, "superlink.example.org")


def test_addresses_become_dns_or_ip_names_and_days_set_the_expiry(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    addresses = ["SuperLink.Example.org", "10.0.0.5", "2001:db8::1", "10.0.0.5", "[::1]"]
    pki.init_pki(folder, addresses, days=30)
    server = load_cert(folder / "superlink.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The given names first, then the loopback ones the coordinator's own commands use.
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert ips == ["10.0.0.5", "2001:db8::1", "::1", "127.0.0.1"]
    common_name = server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "superlink.example.org"
    lifetime = server.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < lifetime <= timedelta(days=30)
    tls_handshake(folder, "superlink.example.org")


@pytest.mark.parametrize(
    "address", ["superlink.example.org:9092", "bad name", "-lead.example", "exämple.org", ""]
)
def test_init_refuses_an_address_that_is_no_host_name(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError, match="address"):
        pki.init_pki(tmp_path / "certs", [address])
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("days", [0, -1, 3651])
def test_init_refuses_days_outside_the_ca_lifetime(tmp_path: Path, days: int) -> None:
    with pytest.raises(ConfigError, match="days"):
        pki.init_pki(tmp_path / "certs", ["localhost"], days=days)


def test_init_twice_is_refused_unless_forced(certs: Path) -> None:
    before = {p.name: p.read_bytes() for p in certs.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a PKI.*--force"):
        pki.init_pki(certs, ["localhost"])
    assert {p.name: p.read_bytes() for p in certs.iterdir() if p.is_file()} == before
    pki.init_pki(certs, ["other.example.org"], force=True)
    for name in ("ca.pem", "ca.key", "superlink.pem", "superlink.key", "coordinator.key"):
        assert (certs / name).read_bytes() != before[name], name
    for name in ("ca.key", "superlink.key", "coordinator.key"):
        assert mode(certs / name) == 0o600, name
    assert pki.certificate_sans(certs / "superlink.pem") == [
        "other.example.org",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
    pki.check_certificate_chain(certs / "superlink.pem", certs / "ca.pem")


def test_init_refuses_to_replace_a_leftover_coordinator_key(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    signing.write_private_key(folder / "coordinator.key", ed25519.Ed25519PrivateKey.generate())
    kept = (folder / "coordinator.key").read_bytes()
    with pytest.raises(ConfigError, match=r"coordinator\.key"):
        pki.init_pki(folder, ["localhost"])
    assert (folder / "coordinator.key").read_bytes() == kept
    assert not (folder / "ca.pem").exists()


def test_the_coordinator_key_pair_is_a_signing_key_pair(certs: Path) -> None:
    private = signing.load_private_key(certs / "coordinator.key")
    public = signing.load_public_key(certs / "coordinator.pub")
    assert signing.signature_valid(public, b"artifact", signing.sign(private, b"artifact"))


# ------------------------------------------------------------- chain checking ---


def _issue(ca_dir: Path, not_before: datetime, not_after: datetime) -> x509.Certificate:
    ca = load_cert(ca_dir / "ca.pem")
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(ca_key, hashes.SHA256())
    )


def test_a_certificate_from_another_ca_does_not_chain(certs: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_pki(other, ["localhost"])
    with pytest.raises(ConfigError, match=r"superlink\.pem was not signed by the CA"):
        pki.check_certificate_chain(other / "superlink.pem", certs / "ca.pem")


def test_an_expired_certificate_is_refused(certs: Path, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    expired = tmp_path / "expired.pem"
    certificate = _issue(certs, now - timedelta(days=10), now - timedelta(days=1))
    expired.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match=r"expired\.pem expired on"):
        pki.check_certificate_chain(expired, certs / "ca.pem")
    future = tmp_path / "future.pem"
    certificate = _issue(certs, now + timedelta(days=1), now + timedelta(days=10))
    future.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not valid before"):
        pki.check_certificate_chain(future, certs / "ca.pem")


def test_unreadable_certificates_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"garbage\.pem is not a PEM certificate"):
        pki.certificate_sans(garbage)
    with pytest.raises(ConfigError, match=r"missing\.pem does not exist"):
        pki.check_certificate_chain(tmp_path / "missing.pem", garbage)


# ------------------------------------------------------------------- node keys ---


def test_site_keys_are_what_flower_and_signing_accept(site_keys: Path) -> None:
    for name in ("node.key", "audit-key.pem"):
        assert mode(site_keys / name) == 0o600, name
    private = flower_loads_private_key(site_keys / "node.key")
    assert isinstance(private.curve, ec.SECP384R1)
    assert (site_keys / "node.pub").read_text().startswith("ecdsa-sha2-nistp384 AAAA")
    # `flwr supernode register` accepts the public key, and it is the private key's half.
    registered = try_load_public_key(site_keys / "node.pub")
    assert serialization.load_pem_public_key(registered) == private.public_key()
    assert pki.load_node_private_key(site_keys / "node.key").public_key() == private.public_key()
    assert pki.load_node_public_key(site_keys / "node.pub") == private.public_key()
    audit_private = signing.load_private_key(site_keys / "audit-key.pem")
    assert signing.load_public_key(site_keys / "audit.pub") == audit_private.public_key()


def test_site_keys_refuse_to_overwrite_anything(site_keys: Path) -> None:
    before = {p.name: p.read_bytes() for p in site_keys.iterdir()}
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*node\.key"):
        pki.make_site_keys(site_keys)
    (site_keys / "node.key").unlink()
    (site_keys / "node.pub").unlink()
    with pytest.raises(ConfigError, match=r"audit-key\.pem"):
        pki.make_site_keys(site_keys)
    assert not (site_keys / "node.key").exists()
    assert {p.name: p.read_bytes() for p in site_keys.iterdir()} == {
        name: data for name, data in before.items() if name.startswith("audit")
    }


def test_write_node_key_pair_refuses_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "node.pub").write_text("old\n")
    with pytest.raises(ConfigError, match=r"node\.pub"):
        pki.write_node_key_pair(tmp_path / "node.key", tmp_path / "node.pub")
    assert not (tmp_path / "node.key").exists()
    assert (tmp_path / "node.pub").read_text() == "old\n"


def test_the_fingerprint_is_the_ssh_keygen_one(site_keys: Path) -> None:
    fingerprint = pki.node_key_fingerprint(pki.load_node_public_key(site_keys / "node.pub"))
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == len("SHA256:") + 43
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(site_keys / "node.pub")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.split()[1] == fingerprint


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP521R1()])
def test_other_nist_curves_are_accepted_as_flower_accepts_them(
    tmp_path: Path, curve: ec.EllipticCurve
) -> None:
    key = ec.generate_private_key(curve)
    public = tmp_path / "node.pub"
    public.write_bytes(openssh_line(key.public_key()) + b" comment@site\n")
    assert pki.load_node_public_key(public) == key.public_key()
    assert serialization.load_pem_public_key(try_load_public_key(public)) == key.public_key()


def _write_bad_public(path: Path, kind: str) -> None:
    if kind == "rsa":
        path.write_bytes(openssh_line(rsa.generate_private_key(65537, 2048).public_key()))
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        path.write_bytes(
            key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    elif kind == "pem":
        path.write_bytes(
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    elif kind == "private":
        pki.write_node_key_pair(path, path.with_suffix(".pubx"))
    else:
        path.write_text("ecdsa-sha2-nistp384 not-base64\n")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("rsa", "is a RSA key; Flower node authentication needs an EC"),
        ("ed25519", "is a Ed25519 key"),
        ("pem", r"is not an OpenSSH public key \(it looks like PEM\)"),
        ("private", "is a private key"),
        ("garbage", "is not an OpenSSH public key"),
    ],
)
def test_bad_node_public_keys_are_refused_by_name(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / f"{kind}.pub"
    _write_bad_public(path, kind)
    with pytest.raises(ConfigError, match=message) as raised:
        pki.load_node_public_key(path)
    assert str(path) in str(raised.value)


def test_a_missing_node_public_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node public key .*nothere\.pub does not exist"):
        pki.load_node_public_key(tmp_path / "nothere.pub")


def test_node_private_keys_flower_cannot_use_are_refused(site_keys: Path, tmp_path: Path) -> None:
    pkcs8 = tmp_path / "pkcs8.key"
    key = ec.generate_private_key(ec.SECP384R1())
    pkcs8.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pkcs8.chmod(0o600)
    with pytest.raises(ConfigError, match=r"pkcs8\.key is not an OpenSSH private key"):
        pki.load_node_private_key(pkcs8)

    if shutil.which("ssh-keygen") is not None:  # cryptography needs bcrypt to encrypt one
        encrypted = tmp_path / "encrypted.key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(encrypted)],
            check=True,
        )
        with pytest.raises(ConfigError, match=r"encrypted\.key is protected by a passphrase"):
            pki.load_node_private_key(encrypted)

    edwards = tmp_path / "ed25519.key"
    edwards.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    edwards.chmod(0o600)
    with pytest.raises(ConfigError, match=r"ed25519\.key is not an EC key"):
        pki.load_node_private_key(edwards)

    (site_keys / "node.key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by other users; run `chmod 600"):
        pki.load_node_private_key(site_keys / "node.key")
    with pytest.raises(ConfigError, match=r"node key .*absent\.key does not exist"):
        pki.load_node_private_key(tmp_path / "absent.key")


# -------------------------------------------------------------------- add-site ---


def _connection(bundle: Path) -> dict[str, str]:
    """The bundle's [connection] table, the only table its connection.toml sets."""
    connection = tomllib.loads((bundle / "connection.toml").read_text())
    assert set(connection) == {"connection"}
    table: dict[str, str] = connection["connection"]
    return table


def test_add_site_with_the_sites_public_keys_ships_no_private_key(
    certs: Path, site_keys: Path
) -> None:
    bundle = pki.add_site(
        certs,
        "hospital-a",
        "localhost:9092",
        node_public_key=site_keys / "node.pub",
        audit_public_key=site_keys / "audit.pub",
    )
    assert bundle == (certs / "bundles" / "hospital-a").absolute()
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.txt",
        "ca.pem",
        "connection.toml",
        "coordinator.pub",
    ]
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in bundle.iterdir())
    registered = certs / "sites" / "hospital-a"
    node_public = pki.load_node_public_key(site_keys / "node.pub")
    assert pki.load_node_public_key(registered / "node.pub") == node_public
    assert serialization.load_pem_public_key(try_load_public_key(registered / "node.pub")) == (
        node_public
    )
    assert signing.load_public_key(registered / "audit.pub") == signing.load_public_key(
        site_keys / "audit.pub"
    )
    assert (bundle / "ca.pem").read_bytes() == (certs / "ca.pem").read_bytes()
    assert signing.load_public_key(bundle / "coordinator.pub") == signing.load_public_key(
        certs / "coordinator.pub"
    )
    connection = _connection(bundle)
    assert connection == {
        "superlink": "localhost:9092",
        "ca_certificate": str(bundle / "ca.pem"),
        "coordinator_key": str(bundle / "coordinator.pub"),
    }
    assert Path(connection["ca_certificate"]).is_absolute()
    # node_key as a commented line to fill in: the site's own key, not in the bundle.
    assert '# node_key = "/path/to/node.key"' in (bundle / "connection.toml").read_text()
    readme = (bundle / "README.txt").read_text()
    assert pki.node_key_fingerprint(node_public) in readme
    assert "no private key" in readme
    assert pki.registered_node_keys(certs) == {"hospital-a": registered / "node.pub"}


def test_add_site_without_keys_generates_them_into_the_bundle(certs: Path) -> None:
    bundle = pki.add_site(certs, "bank-b", "127.0.0.1:9092")
    for name in ("node.key", "audit-key.pem"):
        assert mode(bundle / name) == 0o600, name
    private = flower_loads_private_key(bundle / "node.key")
    assert isinstance(private.curve, ec.SECP384R1)
    assert pki.load_node_private_key(bundle / "node.key").public_key() == private.public_key()
    registered = certs / "sites" / "bank-b"
    assert (registered / "node.pub").read_bytes() == (bundle / "node.pub").read_bytes()
    assert (registered / "audit.pub").read_bytes() == (bundle / "audit.pub").read_bytes()
    assert serialization.load_pem_public_key(try_load_public_key(registered / "node.pub")) == (
        private.public_key()
    )
    assert not (registered / "node.key").exists()
    connection = _connection(bundle)
    assert connection["node_key"] == str(bundle / "node.key")
    assert _signing_key_note(bundle) == bundle / "audit-key.pem"
    audit_private = signing.load_private_key(bundle / "audit-key.pem")
    assert signing.load_public_key(registered / "audit.pub") == audit_private.public_key()
    signing.load_public_key(Path(connection["coordinator_key"]))


def test_add_site_needs_init_first(tmp_path: Path, site_keys: Path) -> None:
    with pytest.raises(ConfigError, match=r"no CA at .*ca\.pem: run `fedlora pki init"):
        pki.add_site(tmp_path / "certs", "hospital-a", "localhost:9092", site_keys / "node.pub")


def test_add_site_twice_is_refused_unless_forced(certs: Path, site_keys: Path) -> None:
    bundle = pki.add_site(certs, "hospital-a", "localhost:9092")
    old_key = (bundle / "node.key").read_bytes()
    with pytest.raises(ConfigError, match=r"site hospital-a is already registered.*--force"):
        pki.add_site(certs, "hospital-a", "localhost:9092", site_keys / "node.pub")
    assert (bundle / "node.key").read_bytes() == old_key
    # Forced, with a key that sat in the old bundle: it is read before the bundle goes.
    kept = bundle / "node.pub"
    expected = pki.load_node_public_key(kept)
    pki.add_site(certs, "hospital-a", "localhost:9093", node_public_key=kept, force=True)
    assert not (bundle / "node.key").exists()
    assert pki.load_node_public_key(certs / "sites" / "hospital-a" / "node.pub") == expected
    assert not (certs / "sites" / "hospital-a" / "audit.pub").exists()
    assert _connection(bundle)["superlink"] == "localhost:9093"


@pytest.mark.parametrize(
    "name", ["a", "-abc", "Hospital-A", "hospital_a", "../etc", "a" * 64, "site a", ""]
)
def test_add_site_refuses_a_bad_name(certs: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="is not valid: use 2 to 63 lowercase"):
        pki.add_site(certs, name, "localhost:9092")
    assert not (certs / "sites").exists()


@pytest.mark.parametrize(
    ("superlink", "message"),
    [
        ("localhost", "is not HOST:PORT"),
        (":9092", "is not HOST:PORT"),
        ("localhost:0", "between 1 and 65535"),
        ("::1:9092", "IPv6 address in brackets"),
        ("[nope]:9092", "is not an IPv6 address"),
        ("bad host:9092", "not a valid host name"),
    ],
)
def test_add_site_refuses_a_bad_superlink_address(
    certs: Path, superlink: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        pki.add_site(certs, "hospital-a", superlink)


def test_parse_superlink() -> None:
    assert pki.parse_superlink("superlink.example.org:9092") == ("superlink.example.org", 9092)
    assert pki.parse_superlink("[2001:db8::1]:443") == ("2001:db8::1", 443)


def test_add_site_refuses_bad_public_keys_and_writes_nothing(
    certs: Path, site_keys: Path, tmp_path: Path
) -> None:
    rsa_key = tmp_path / "rsa.pub"
    _write_bad_public(rsa_key, "rsa")
    with pytest.raises(ConfigError, match=r"rsa\.pub is a RSA key"):
        pki.add_site(certs, "hospital-a", "localhost:9092", rsa_key)
    pem = tmp_path / "pem.pub"
    _write_bad_public(pem, "pem")
    with pytest.raises(ConfigError, match=r"pem\.pub is not an OpenSSH public key"):
        pki.add_site(certs, "hospital-a", "localhost:9092", pem)
    with pytest.raises(ConfigError, match=r"audit-key\.pem is a private key"):
        pki.add_site(
            certs,
            "hospital-a",
            "localhost:9092",
            site_keys / "node.pub",
            site_keys / "audit-key.pem",
        )
    with pytest.raises(ConfigError, match=r"audit public key .*node\.pub is not usable"):
        pki.add_site(
            certs, "hospital-a", "localhost:9092", site_keys / "node.pub", site_keys / "node.pub"
        )
    ec_pem = tmp_path / "ec-audit.pub"
    _write_bad_public(ec_pem, "pem")
    with pytest.raises(ConfigError, match=r"ec-audit\.pub is not usable"):
        pki.add_site(certs, "hospital-a", "localhost:9092", site_keys / "node.pub", ec_pem)
    with pytest.raises(ConfigError, match="needs the site's node public key"):
        pki.add_site(certs, "hospital-a", "localhost:9092", None, site_keys / "audit.pub")
    assert not (certs / "sites").exists() and not (certs / "bundles").exists()


def test_one_node_key_cannot_serve_two_sites(certs: Path, site_keys: Path) -> None:
    pki.add_site(certs, "hospital-a", "localhost:9092", site_keys / "node.pub")
    with pytest.raises(ConfigError, match="already registered for site hospital-a"):
        pki.add_site(certs, "hospital-b", "localhost:9092", site_keys / "node.pub")
    assert list(pki.registered_node_keys(certs)) == ["hospital-a"]


def test_registered_node_keys_are_sorted_and_skip_incomplete_folders(certs: Path) -> None:
    assert pki.registered_node_keys(certs) == {}
    for name in ("site-c", "site-a", "site-b"):
        pki.add_site(certs, name, "localhost:9092")
    (certs / "sites" / "stray").mkdir()
    (certs / "sites" / "notes.txt").write_text("\n")
    keys = pki.registered_node_keys(certs)
    assert list(keys) == ["site-a", "site-b", "site-c"]
    assert keys["site-b"] == certs.absolute() / "sites" / "site-b" / "node.pub"


# ------------------------------------------------- the bundle in a site config ---

TEMPLATE = Path(__file__).resolve().parents[3] / "sites" / "template.toml"


def _signing_key_note(bundle: Path) -> Path | None:
    """The audit key that connection.toml's note says to set as site.signing_key."""
    found = re.search(r'signing_key to (".*")$', (bundle / "connection.toml").read_text(), re.M)
    return Path(json.loads(found.group(1))) if found else None


def _uncomment(text: str, key: str, value: Path) -> str:
    """``text`` with its one commented ``# KEY = …`` line made active, set to ``value``."""
    lines = text.splitlines()
    hits = [number for number, line in enumerate(lines) if line.startswith(f"# {key} = ")]
    assert len(hits) == 1, f"{key}: {hits}"
    lines[hits[0]] = f"{key} = {json.dumps(str(value))}"
    return "\n".join(lines) + "\n"


def _site_config(
    folder: Path,
    bundle: Path,
    *,
    signing_key: Path | None = None,
    node_key: Path | None = None,
    coordinator_key: Path | None = None,
) -> Path:
    """A site config made from sites/template.toml (its [site] lines filled in as
    given) with the bundle's connection.toml appended (node_key filled in as given)."""
    text = TEMPLATE.read_text()
    for key, value in (("signing_key", signing_key), ("coordinator_key", coordinator_key)):
        if value is not None:
            text = _uncomment(text, key, value)
    appended = (bundle / "connection.toml").read_text()
    if node_key is not None:
        appended = _uncomment(appended, "node_key", node_key)
    path = folder / "my-site.toml"
    path.write_text(text + "\n" + appended)
    return path


def test_the_bundle_appended_to_a_template_config_loads(
    tmp_path: Path, certs: Path, site_keys: Path
) -> None:
    bundle = pki.add_site(
        certs, "my-hospital", "localhost:9092", site_keys / "node.pub", site_keys / "audit.pub"
    )
    with pytest.raises(ConfigError, match=r"connection\.node_key: required, but missing"):
        load_site_config(_site_config(tmp_path, bundle))  # the site's own key: to fill in
    path = _site_config(
        tmp_path, bundle, signing_key=site_keys / "audit-key.pem", node_key=site_keys / "node.key"
    )
    config = load_site_config(path)
    assert config.connection == SiteConnection(
        superlink="localhost:9092",
        ca_certificate=(bundle / "ca.pem").resolve(),
        node_key=(site_keys / "node.key").resolve(),
    )
    assert config.site.coordinator_key == (bundle / "coordinator.pub").resolve()
    assert config.site.signing_key == (site_keys / "audit-key.pem").resolve()
    assert config.site.id == "my-hospital"
    # What the daemon and the artifact check then read are the keys add-site used.
    assert signing.load_public_key(config.site.coordinator_key) == signing.load_public_key(
        certs / "coordinator.pub"
    )
    assert pki.load_node_private_key(config.connection.node_key).public_key() == (
        pki.load_node_public_key(certs / "sites" / "my-hospital" / "node.pub")
    )


def test_the_generated_keys_bundle_appended_to_a_template_config_loads(
    tmp_path: Path, certs: Path
) -> None:
    bundle = pki.add_site(certs, "my-hospital", "localhost:9092")
    signing_key = _signing_key_note(bundle)
    assert signing_key == bundle / "audit-key.pem"
    config = load_site_config(_site_config(tmp_path, bundle, signing_key=signing_key))
    assert config.connection is not None
    assert config.connection.node_key == (bundle / "node.key").resolve()
    assert config.site.signing_key == signing_key.resolve()
    assert config.site.coordinator_key == (bundle / "coordinator.pub").resolve()
    assert signing.load_private_key(config.site.signing_key).public_key() == (
        signing.load_public_key(certs / "sites" / "my-hospital" / "audit.pub")
    )


def test_a_bundle_without_an_audit_key_appended_loads_without_a_signing_key(
    tmp_path: Path, certs: Path, site_keys: Path
) -> None:
    bundle = pki.add_site(certs, "my-hospital", "localhost:9092", site_keys / "node.pub")
    assert _signing_key_note(bundle) is None
    assert "<state_dir>/audit-key.pem" in (bundle / "connection.toml").read_text()
    config = load_site_config(_site_config(tmp_path, bundle, node_key=site_keys / "node.key"))
    assert config.site.signing_key is None
    assert config.site.coordinator_key == (bundle / "coordinator.pub").resolve()


@pytest.mark.parametrize("variant", ["site-keys", "site-keys without audit key", "generated"])
def test_nothing_before_the_connection_header_uncomments_into_a_key(
    certs: Path, site_keys: Path, variant: str
) -> None:
    """Lines before [connection] would land in the site config's last table: they are
    notes, none of them a commented ``key = value`` for another table."""
    node, audit = {
        "site-keys": (site_keys / "node.pub", site_keys / "audit.pub"),
        "site-keys without audit key": (site_keys / "node.pub", None),
        "generated": (None, None),
    }[variant]
    bundle = pki.add_site(certs, "my-hospital", "localhost:9092", node, audit)
    head, table = (bundle / "connection.toml").read_text().split("\n[connection]\n")
    assert "signing_key" in head or variant == "site-keys without audit key"
    for line in head.splitlines():
        assert line == "" or line.startswith("#"), line
        assert not re.match(r"#\s*[\w.]+\s*=", line), line
    assert "[" not in "".join(line for line in table.splitlines() if not line.startswith("#"))


def test_the_coordinator_key_in_both_tables_is_an_error(
    tmp_path: Path, certs: Path, site_keys: Path
) -> None:
    bundle = pki.add_site(certs, "my-hospital", "localhost:9092", site_keys / "node.pub")
    path = _site_config(
        tmp_path,
        bundle,
        node_key=site_keys / "node.key",
        coordinator_key=bundle / "coordinator.pub",
    )
    with pytest.raises(
        ConfigError, match=r"coordinator_key is set in both \[site\] and \[connection\]"
    ):
        load_site_config(path)


# ------------------------------------------------------------------ command line ---


def test_cli_init_add_site_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        pki_group, ["init", "--address", "superlink.example.org", "--days", "90"]
    )
    assert result.exit_code == 0, result.output
    certs = tmp_path / "certs"  # the default
    assert mode(certs) == 0o700
    assert pki.certificate_sans(certs / "superlink.pem")[0] == "superlink.example.org"
    assert "fedlora coordinator start --certs" in result.stdout
    assert f"--certs {certs}" in result.stdout

    result = runner.invoke(pki_group, ["site-keys", "keys"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "keys" / "node.pub") in result.stdout
    assert str(tmp_path / "keys" / "audit.pub") in result.stdout

    result = runner.invoke(
        pki_group,
        [
            "add-site",
            "hospital-a",
            "--superlink",
            "superlink.example.org:9092",
            "--node-public-key",
            "keys/node.pub",
            "--audit-public-key",
            "keys/audit.pub",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PRIVATE" not in result.stderr and "warning" not in result.stderr
    assert "fedlora coordinator register" in result.stdout

    result = runner.invoke(pki_group, ["add-site", "bank-b", "--superlink", "10.1.2.3:9092"])
    assert result.exit_code == 0, result.output
    assert "PRIVATE keys" in result.stderr and "secure channel" in result.stderr
    assert "10.1.2.3 is not among the TLS certificate's names" in result.stderr

    result = runner.invoke(pki_group, ["list"])
    assert result.exit_code == 0, result.output
    fingerprint = pki.node_key_fingerprint(pki.load_node_public_key(Path("keys/node.pub")))
    assert "superlink.example.org" in result.stdout
    assert "chains to the CA: yes" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[-2:]}
    assert fingerprint in lines["hospital-a"] and "audit key on file" in lines["hospital-a"]
    expiry = load_cert(certs / "superlink.pem").not_valid_after_utc
    assert f"{expiry:%Y-%m-%d}" in result.stdout


def test_cli_refusals(tmp_path: Path) -> None:
    runner = CliRunner()
    certs = str(tmp_path / "certs")
    result = runner.invoke(
        pki_group, ["add-site", "site-a", "--superlink", "h:1", "--certs", certs]
    )
    assert isinstance(result.exception, ConfigError) and "pki init" in str(result.exception)
    assert runner.invoke(pki_group, ["init", "--certs", certs]).exit_code == 0
    result = runner.invoke(pki_group, ["init", "--certs", certs])
    assert isinstance(result.exception, ConfigError) and "--force" in str(result.exception)
    assert runner.invoke(pki_group, ["init", "--certs", certs, "--force"]).exit_code == 0
    result = runner.invoke(
        pki_group, ["add-site", "Site_A", "--superlink", "h:1", "--certs", certs]
    )
    assert isinstance(result.exception, ConfigError)
    result = runner.invoke(pki_group, ["add-site", "site-a", "--certs", certs])
    assert result.exit_code == 2 and "--superlink" in result.output
    result = runner.invoke(pki_group, ["init", "--certs", certs, "--force", "--days", "0"])
    assert result.exit_code == 2
    keys = str(tmp_path / "keys")
    assert runner.invoke(pki_group, ["site-keys", keys]).exit_code == 0
    result = runner.invoke(pki_group, ["site-keys", keys])
    assert isinstance(result.exception, ConfigError) and "refusing" in str(result.exception)
    result = runner.invoke(pki_group, ["list", "--certs", str(tmp_path / "none")])
    assert isinstance(result.exception, ConfigError)


def test_the_root_command_finds_pki() -> None:
    result = CliRunner().invoke(cli, ["pki", "--help"])
    assert result.exit_code == 0, result.output
    for command in ("init", "add-site", "site-keys", "list"):
        assert command in result.output
    for command in ("init", "add-site", "site-keys", "list"):
        result = CliRunner().invoke(cli, ["pki", command, "--help"])
        assert result.exit_code == 0, result.output


def _next_steps(output: str) -> list[str]:
    """The commands a command's "Next steps" print, in order: continued lines joined,
    trailing comments dropped."""
    commands: list[str] = []
    for line in output.split("\nNext steps:\n", 1)[1].splitlines():
        text = line.strip()
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1].removesuffix("\\").rstrip() + " " + text
        elif text.startswith("fedlora "):
            commands.append(re.sub(r"\s+#.*$", "", text))
    return commands


def _subcommand(command: str) -> str:
    return " ".join(command.split()[1:3])


def test_next_steps_give_the_deployment_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    init = runner.invoke(pki_group, ["init", "--address", "fl.example.org"])
    assert init.exit_code == 0, init.output
    steps = _next_steps(init.stdout)
    assert [_subcommand(command) for command in steps] == [
        "pki site-keys",
        "pki add-site",
        "coordinator start",
        "coordinator register",
        "coordinator release",
        "site release",
        "site check",
        "site run",
        "coordinator run",
    ]
    assert "--superlink fl.example.org:9092" in steps[1]
    assert "--node-public-key" in steps[1] and "--audit-public-key" in steps[1]
    assert "--release release.json" in steps[5]
    assert "--federation FEDERATION.toml" in steps[6]
    certs = tmp_path / "certs"
    section = init.stdout.split("Next steps:", 1)[1]
    assert (
        section.index("pki add-site")
        < section.index(f"{certs / 'bundles'}/NAME")
        < section.index("coordinator start")
    )

    assert runner.invoke(pki_group, ["site-keys", "keys"]).exit_code == 0
    added = runner.invoke(
        pki_group,
        [
            "add-site",
            "hospital-a",
            "--superlink",
            "fl.example.org:9092",
            "--node-public-key",
            "keys/node.pub",
            "--audit-public-key",
            "keys/audit.pub",
        ],
    )
    assert added.exit_code == 0, added.output
    after = _next_steps(added.stdout)
    assert [_subcommand(command) for command in after] == [
        "coordinator start",
        "coordinator register",
        "coordinator release",
        "site release",
        "site check",
        "site run",
        "coordinator run",
    ]
    section = added.stdout.split("Next steps:", 1)[1]
    assert section.index(str(certs / "bundles" / "hospital-a")) < section.index("coordinator start")
    assert all(f"--certs {certs}" in command for command in after if "coordinator" in command)
    check_commands_exist(steps + after)
