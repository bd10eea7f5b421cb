"""What a site's bundle says: its ``connection.toml`` and the README that walks the site
operator from the template to the running daemon.

Pure text, from the bundle's folder and the site's names: ``add_site`` in
:mod:`common.pki` writes the files. The texts name the bundle's real paths, so what
the operator copies works as is, and tell where each private key is (in the bundle,
when the coordinator made the keys, or still at the site).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.pki_layout import (
    AUDIT_KEY,
    AUDIT_PUB,
    CA_CERT,
    CONNECTION,
    COORDINATOR_PUB,
    NODE_KEY,
    NODE_PUB,
)

PLACEHOLDER_NODE_KEY = "/path/to/node.key"
"""What connection.toml's commented node_key line holds until the site fills it in."""


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


def connection_toml(
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


def readme_text(
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
