"""``fedlora pki``: the federation's CA, TLS certificate and keys (coordinator), and a
site's own keys (site operator)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import click

from common import pki as lib
from common import signing
from common.errors import ConfigError

CERTS_OPTION = click.option(
    "--certs",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs"),
    show_default=True,
    help="The coordinator's PKI folder (CA, TLS certificate, keys, sites, bundles).",
)

Step = tuple[str, tuple[str, ...]]
"""One numbered next step: what to do (lines), then the commands that do it."""

FEDERATION_RUN = "FEDERATION.toml"
"""How the next steps name a federation (run) config, such as sites/federation/*.toml."""
FEDERATION_EXAMPLES = "sites/federation/"
"""Where fedlora's commented federation configs are, one per task."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def pki() -> None:
    """A deployment's keys: the CA, SuperLink TLS, node and signing keys.

    \b
    At the coordinator:
      fedlora pki init --address superlink.example.org
      fedlora pki add-site hospital-a --superlink superlink.example.org:9092 \\
          --node-public-key node.pub --audit-public-key audit.pub
      fedlora pki list
    At a site (before add-site, so no private key travels):
      fedlora pki site-keys /etc/fedlora/keys
    """


def _shown(path: Path) -> str:
    return str(path.absolute())


@pki.command()
@CERTS_OPTION
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST",
    default=lib.DEFAULT_ADDRESSES,
    show_default=True,
    help="A host name or IP address the sites use to reach the SuperLink; the TLS "
    "certificate is valid for exactly these (repeat the option for several). "
    "The first one is the certificate's common name.",
)
@click.option(
    "--days",
    type=click.IntRange(1, lib.CA_DAYS),
    metavar="DAYS",
    default=365,
    show_default=True,
    help="How long the SuperLink's TLS certificate is valid (the CA: 10 years).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing CA, TLS certificate and coordinator key. Every bundle "
    "already handed out then carries the old CA and must be issued again.",
)
def init(certs: Path, addresses: tuple[str, ...], days: int, force: bool) -> None:
    """Create the CA, the SuperLink TLS certificate, the coordinator key.

    Run once per federation, at the coordinator.
    """
    had_bundles = (certs / lib.BUNDLES).is_dir() and any((certs / lib.BUNDLES).iterdir())
    lib.init_pki(certs, addresses, days=days, force=force)
    sans = lib.certificate_sans(certs / lib.SUPERLINK_CERT)
    expiry = lib.certificate_expiry(certs / lib.SUPERLINK_CERT)
    coordinator = signing.load_public_key(certs / lib.COORDINATOR_PUB)
    click.echo(f"Wrote the PKI in {_shown(certs)} (mode 0700):")
    rows = [
        (f"{lib.CA_CERT}, {lib.CA_KEY}", "the federation CA (keep ca.key safe, ideally offline)"),
        (
            f"{lib.SUPERLINK_CERT}, {lib.SUPERLINK_KEY}",
            f"the SuperLink's TLS certificate, until {expiry:%Y-%m-%d}, for {', '.join(sans)}",
        ),
        (
            f"{lib.COORDINATOR_KEY}, {lib.COORDINATOR_PUB}",
            f"the coordinator's signing key, {signing.fingerprint(coordinator)[:32]}…",
        ),
    ]
    for files, what in rows:
        click.echo(f"  {files:<34}{what}")
    if force and had_bundles:
        click.secho(
            "warning: the bundles in "
            f"{_shown(certs / lib.BUNDLES)} carry the old CA; issue them again with "
            "`fedlora pki add-site NAME --force …`",
            fg="yellow",
            err=True,
        )
    _echo_next_steps(_init_next_steps(certs, _host_port(sans[0], 9092)))


@pki.command("add-site")
@click.argument("name")
@click.option(
    "--superlink",
    required=True,
    metavar="HOST:PORT",
    help="The SuperLink address the site's SuperNode connects to; HOST should be one of "
    "the TLS certificate's names (see `fedlora pki list`).",
)
@CERTS_OPTION
@click.option(
    "--node-public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The node.pub the site sent (OpenSSH EC key from `fedlora pki site-keys`). "
    "Without it, the coordinator makes the site's keys and the bundle holds private keys.",
)
@click.option(
    "--audit-public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The audit.pub the site sent (Ed25519 PEM): the key its audit log is signed with.",
)
@click.option("--force", is_flag=True, help="Replace an already registered site and its bundle.")
def add_site(
    name: str,
    superlink: str,
    certs: Path,
    node_public_key: Path | None,
    audit_public_key: Path | None,
    force: bool,
) -> None:
    """Register site NAME and write the bundle for its operator.

    NAME is the site.id of the site's config.
    """
    bundle = lib.add_site(
        certs,
        name,
        superlink,
        node_public_key=node_public_key,
        audit_public_key=audit_public_key,
        force=force,
    )
    node_pub = certs / lib.SITES / name / lib.NODE_PUB
    fingerprint = lib.node_key_fingerprint(lib.load_node_public_key(node_pub))
    click.echo(f"Registered site {name}: node key {fingerprint}")
    if (certs / lib.SITES / name / lib.AUDIT_PUB).is_file():
        click.echo(f"  audit key on file: {_shown(certs / lib.SITES / name / lib.AUDIT_PUB)}")
    click.echo(f"Bundle for the site operator: {_shown(bundle)}")
    for path in sorted(bundle.iterdir()):
        click.echo(f"  {path.name}")
    host, _ = lib.parse_superlink(superlink)
    sans = lib.certificate_sans(certs / lib.SUPERLINK_CERT)
    if not _host_in(host, sans):
        click.secho(
            f"warning: {host} is not among the TLS certificate's names ({', '.join(sans)}); "
            "the site will refuse the connection. Use one of those names in --superlink, or "
            f"add {host} with `fedlora pki init --force --address …` (a new CA: every bundle "
            "must then be issued again).",
            fg="yellow",
            err=True,
        )
    if node_public_key is None:
        click.secho(
            f"warning: the bundle holds the site's PRIVATE keys ({lib.NODE_KEY}, "
            f"{lib.AUDIT_KEY}): hand it over only by a secure channel and delete your copy "
            "afterwards. Prefer `fedlora pki site-keys` at the site.",
            fg="yellow",
            err=True,
        )
    _echo_next_steps(_add_site_next_steps(certs, bundle, generated=node_public_key is None))


def _echo_next_steps(steps: list[Step]) -> None:
    click.echo("\nNext steps:")
    for number, (what, commands) in enumerate(steps, start=1):
        click.echo(f"  {number}. " + what.replace("\n", "\n     "))
        for command in commands:
            click.echo(f"       {command}")


def _run_steps(certs: Path) -> list[Step]:
    """The steps after the SuperLink knows the sites: the sites join, then a run."""
    return [
        (
            "Publish the release the sites will run (the app bundle's hash, signed), and\n"
            "hand release.json and release.json.sig to each site (again after any change\n"
            "of the installed code: a site refuses a bundle it did not pin):",
            (f"fedlora coordinator release --certs {_shown(certs)}",),
        ),
        (
            "Each site reviews the release and pins it (the command prints the\n"
            "client_releases line for its config's [policy] table), checks its config\n"
            "against the run, then starts its daemon (or its systemd unit fedlora-site@):",
            (
                "fedlora site release SITE.toml --release release.json",
                f"fedlora site check SITE.toml --federation {FEDERATION_RUN}",
                "fedlora site run SITE.toml",
            ),
        ),
        (
            "Once the sites are connected, launch a run (a federation config per task):",
            (f"fedlora coordinator run --certs {_shown(certs)} {FEDERATION_RUN} …",),
        ),
    ]


def _init_next_steps(certs: Path, superlink: str) -> list[Step]:
    shown = _shown(certs)
    return [
        (
            "Each site makes its own keys and sends you DIR/node.pub and DIR/audit.pub:",
            ("fedlora pki site-keys DIR",),
        ),
        (
            "Register each site (NAME: the site.id of its config) with the keys it sent:",
            (
                f"fedlora pki add-site NAME --certs {shown} --superlink {superlink} \\",
                "    --node-public-key NAME-node.pub --audit-public-key NAME-audit.pub",
            ),
        ),
        (
            f"Hand each site its bundle, {_shown(certs / lib.BUNDLES)}/NAME (it holds\n"
            f"no secret), and the federation config of its task ({FEDERATION_RUN}; examples\n"
            f"in {FEDERATION_EXAMPLES}).",
            (),
        ),
        (
            "Start the SuperLink (TLS, node authentication, a persistent database) behind\n"
            "nginx, which serves the sites the Fleet API alone on HOST:9092 (HOST: the\n"
            "interface the sites reach; 127.0.0.1 by default, this machine only); it\n"
            "registers the node key of every site added so far:",
            (
                f"fedlora coordinator start --certs {shown} --host HOST --port 9092",
                f"fedlora coordinator register --certs {shown}   # sites added while it runs",
            ),
        ),
        *_run_steps(certs),
    ]


def _add_site_next_steps(certs: Path, bundle: Path, *, generated: bool) -> list[Step]:
    channel = " by a secure channel" if generated else ""
    return [
        (
            f"Send {_shown(bundle)} to the site operator{channel},\n"
            f"with the federation config of its task ({FEDERATION_RUN}; examples in\n"
            f"{FEDERATION_EXAMPLES}). The bundle's {lib.README} and {lib.CONNECTION} tell\n"
            "them what to do.",
            (),
        ),
        (
            "Register the site's node key at the SuperLink: `coordinator start` registers\n"
            "every added site's when it starts; if it is already running, register it:",
            (
                f"fedlora coordinator start --certs {_shown(certs)}",
                f"fedlora coordinator register --certs {_shown(certs)}   # if it is running",
            ),
        ),
        *_run_steps(certs),
    ]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_in(host: str, sans: list[str]) -> bool:
    """Whether the certificate names ``host`` (IP addresses compared as addresses)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in {san.lower() for san in sans}
    for san in sans:
        try:
            if ipaddress.ip_address(san) == address:
                return True
        except ValueError:
            continue
    return False


@pki.command("site-keys")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
def site_keys(directory: Path) -> None:
    """At a site: create its node and audit key pairs in DIR.

    The private keys stay here; send only the two public files to the coordinator.
    """
    lib.make_site_keys(directory)
    node = lib.load_node_public_key(directory / lib.NODE_PUB)
    audit_key = signing.load_public_key(directory / lib.AUDIT_PUB)
    click.echo(f"Wrote in {_shown(directory)}:")
    click.echo(f"  {lib.NODE_KEY}       node-authentication private key (mode 0600, keep here)")
    click.echo(f"  {lib.NODE_PUB}       its public key  {lib.node_key_fingerprint(node)}")
    click.echo(f"  {lib.AUDIT_KEY}  audit-log signing private key (mode 0600, keep here)")
    click.echo(f"  {lib.AUDIT_PUB}      its public key  {signing.fingerprint(audit_key)}")
    click.echo("\nSend these two files to the coordinator (they are public):")
    click.echo(f"  {_shown(directory / lib.NODE_PUB)}")
    click.echo(f"  {_shown(directory / lib.AUDIT_PUB)}")
    click.echo("Then, in the site config:")
    click.echo(f"  in [site]:        signing_key = {json.dumps(_shown(directory / lib.AUDIT_KEY))}")
    click.echo(f"  in [connection]:  node_key = {json.dumps(_shown(directory / lib.NODE_KEY))}")
    click.echo(f"  (the [connection] table comes in the coordinator's bundle, {lib.CONNECTION})")


@pki.command("list")
@CERTS_OPTION
def list_(certs: Path) -> None:
    """Show the sites, and the TLS certificate's names and expiry."""
    ca = certs / lib.CA_CERT
    if not ca.is_file():
        raise ConfigError(f"no CA at {ca}: run `fedlora pki init --certs {certs}` first")
    server = certs / lib.SUPERLINK_CERT
    click.echo(f"CA:        {_shown(ca)}, valid until {lib.certificate_expiry(ca):%Y-%m-%d}")
    click.echo(
        f"SuperLink: {_shown(server)}, valid until {lib.certificate_expiry(server):%Y-%m-%d}"
    )
    click.echo(f"  names:   {', '.join(lib.certificate_sans(server))}")
    try:
        lib.check_certificate_chain(server, ca)
    except ConfigError as exc:
        click.secho(f"  PROBLEM: {exc}", fg="red")
    else:
        click.echo("  chains to the CA: yes")
    sites = lib.registered_node_keys(certs)
    click.echo(f"\nSites ({len(sites)}):")
    if not sites:
        click.echo("  none yet: `fedlora pki add-site NAME --superlink HOST:PORT …`")
    width = max((len(name) for name in sites), default=0)
    for name, path in sites.items():
        try:
            fingerprint = lib.node_key_fingerprint(lib.load_node_public_key(path))
        except ConfigError as exc:
            fingerprint = f"UNUSABLE: {exc}"
        audit = "audit key on file" if (path.parent / lib.AUDIT_PUB).is_file() else "no audit key"
        click.echo(f"  {name:<{width}}  {fingerprint}  {audit}")
