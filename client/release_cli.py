"""``fedlora site release``: what client code a site pins, runs and refused, and what a
release the coordinator published would change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from client.audit import SiteAudit
from client.releases import installed_release, refused_bundles
from common.config import load_site_config
from common.errors import ConfigError
from common.release import load_release
from common.signing import load_public_key


def release_report(site_config: Path, release_file: Path | None) -> dict[str, Any]:
    """The facts `site release` shows, as plain data (also its --json)."""
    config = load_site_config(site_config)
    pinned = list(config.policy.client_releases)
    installed = installed_release()
    report: dict[str, Any] = {
        "site": config.site.id,
        "pinned": pinned,
        "installed": installed,
        "installed_is_pinned": installed in pinned if installed else None,
        "refused": refused_bundles(SiteAudit(config).events())[:10],
    }
    if release_file is not None:
        key = config.site.coordinator_key
        if key is None:
            raise ConfigError(
                f"{site_config} pins no coordinator key (site.coordinator_key or "
                "connection.coordinator_key): a release cannot be checked"
            )
        release = load_release(release_file, load_public_key(key))
        report["release"] = {
            **release.model_dump(),
            "signature": "valid",
            "pinned": release.fab_sha256 in pinned,
            "matches_installed": installed == release.fab_sha256 if installed else None,
        }
    return report


def _print(report: dict[str, Any]) -> None:
    click.echo(f"site {report['site']}")
    pins = report["pinned"]
    click.echo(f"  pinned releases ({len(pins)}): " + (", ".join(pins) or "none"))
    installed = report["installed"]
    if installed is None:
        click.echo("  installed code: not a source checkout; its release hash is unknown")
    else:
        state = "pinned" if report["installed_is_pinned"] else "NOT pinned"
        click.echo(f"  installed code, as a release: {installed} ({state})")
    for refused in report["refused"]:
        click.echo(
            f"  refused: bundle {refused['fab_sha256']} ({refused['times']}×, last in run "
            f"{refused['run']})"
        )
    release = report.get("release")
    if release is None:
        return
    click.echo(
        f"release {release['app']} {release['version']}, built {release['built_at']}, "
        f"signed by {release['signer']} (signature valid)"
    )
    click.echo(f"  app bundle SHA-256: {release['fab_sha256']} ({release['fab_bytes']} bytes)")
    if release["matches_installed"] is False:
        click.secho(
            "  it is NOT the code installed here: review the coordinator's source at that "
            "version before pinning",
            fg="yellow",
        )
    if release["pinned"]:
        click.echo("  already pinned")
    else:
        entries = ", ".join(json.dumps(entry) for entry in [*pins, release["fab_sha256"]])
        click.echo("  to pin it, after review, set in the site config's [policy] table:")
        click.echo(f"    client_releases = [{entries}]")


@click.command("release")
@click.argument("site_config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--release",
    "release_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A release.json the coordinator published (`fedlora coordinator release`), "
    "with its release.json.sig beside it: checked against the coordinator key the site "
    "pins, then shown with the line that would pin it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def release(site_config: Path, release_file: Path | None, as_json: bool) -> None:
    """The client code SITE_CONFIG runs: the releases it pins (policy.client_releases),
    this installed copy's own release hash, and the bundles it refused (from its
    audit log); with --release, what pinning that release would change.

    A site runs only releases it pinned, and even then its own installed client code.
    Pinning is an edit of the site config after review; the daemon records every
    change of the list in the site's signed audit log. Exit 0; 2 when the config is
    invalid, or the release is malformed or not signed by the pinned coordinator key."""
    report = release_report(site_config, release_file)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)
