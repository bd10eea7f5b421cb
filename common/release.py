"""A release of fedlora's Flower app, as the coordinator publishes it and a site pins it.

`flwr run` ships the app as a Flower App Bundle (FAB): a zip that Flower builds from
the app's folder deterministically (files sorted, fixed timestamps, stored, not
compressed) and names by its SHA-256. A release is that hash, signed by the
coordinator with its Ed25519 key, together with the version it was built from. A site
reviews a release and pins its hash (``policy.client_releases``); its ClientApp
launcher refuses every run whose bundle is not pinned, and even for a pinned one runs
the site's own installed client code, never the bundle's.

The hash is computed with Flower's own builder (the one `flwr run` uses), so the
coordinator's published hash is the hash of what its `flwr run` submits.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field

from common.config import StrictModel, validate_model
from common.errors import ConfigError, FedloraError
from common.files import write_atomically
from common.signing import fingerprint, sign, signature_valid

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
RELEASE_FILE = "release.json"
SIGNATURE_SUFFIX = ".sig"
MAX_RELEASE_BYTES = 64 * 1024


class ReleaseError(FedloraError):
    """A release record that is missing, malformed, or not signed by the pinned key."""


class Release(StrictModel):
    """What the coordinator publishes for one build of the app."""

    app: str = Field(description="The Flower app's name (its pyproject project name).")
    version: str = Field(description="The fedlora version it was built from.")
    fab_sha256: str = Field(pattern=SHA256_HEX.pattern, description="SHA-256 of the FAB.")
    fab_bytes: int = Field(gt=0, description="Size of the FAB.")
    built_at: str = Field(description="UTC time of the build (ISO 8601).")
    signer: str = Field(description="Fingerprint of the coordinator key that signed it.")

    def canonical(self) -> bytes:
        """The bytes the signature covers: the record as sorted, compact JSON."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()


def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def app_files(app_root: Path) -> dict[str, Path]:
    """The files Flower's builder considers for ``app_root``, as its own collector
    lists them (relative POSIX path -> file, symlinks skipped), but without walking
    folders that no ``fab-include`` pattern can reach: a source checkout holds its
    virtualenv, and walking it takes longer than building the bundle. The bundle is the
    same, since a file outside those folders cannot be selected anyway."""
    from flwr.cli.utils import collect_files  # Flower's CLI: loaded on use

    root = app_root.resolve()
    document = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = document.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not isinstance(patterns, list) or not patterns:
        return collect_files(root)
    tops = {str(pattern).lstrip("/").split("/", 1)[0] for pattern in patterns}
    if any(glob in top for top in tops for glob in "*?[!"):
        return collect_files(root)
    files = {path.name: path for path in root.iterdir() if path.is_file()}
    for top in sorted(tops):
        if (root / top).is_dir():
            files.update(
                {f"{top}/{name}": path for name, path in collect_files(root / top).items()}
            )
    return {name: path for name, path in files.items() if not path.is_symlink()}


def build_fab(app_root: Path) -> bytes:
    """The FAB `flwr run APP_ROOT` would submit, built by Flower's own builder."""
    from flwr.cli.build import build_fab_from_files

    try:
        return build_fab_from_files(app_files(app_root))[0]
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ReleaseError(f"cannot build the app bundle of {app_root}: {exc}") from exc


def make_release(fab: bytes, key: Ed25519PrivateKey, app: str = "fedlora") -> Release:
    return Release(
        app=app,
        version=version("fedlora"),
        fab_sha256=fab_sha256(fab),
        fab_bytes=len(fab),
        built_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        signer=fingerprint(key.public_key()),
    )


def write_release(folder: Path, release: Release, key: Ed25519PrivateKey) -> Path:
    """``folder/release.json`` and its detached signature ``release.json.sig``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RELEASE_FILE
    write_atomically(path, json.dumps(release.model_dump(), indent=2) + "\n")
    signature = sign(key, release.canonical())
    write_atomically(path.with_name(path.name + SIGNATURE_SUFFIX), signature + "\n")
    return path


def load_release(path: Path, trusted: Ed25519PublicKey) -> Release:
    """The release at ``path``, if its signature verifies with the ``trusted`` key (the
    coordinator key the site pinned); ReleaseError naming what is wrong otherwise."""
    signature_path = path.with_name(path.name + SIGNATURE_SUFFIX)
    for needed in (path, signature_path):
        if not needed.is_file():
            raise ReleaseError(f"{needed.name} is missing (a release is {RELEASE_FILE} + .sig)")
        if needed.stat().st_size > MAX_RELEASE_BYTES:
            raise ReleaseError(f"{needed.name} is larger than a release record can be")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleaseError(f"{path.name} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ReleaseError(f"{path.name} is not a release record")
    try:
        release = validate_model(Release, document, path.name)
    except ConfigError as exc:
        raise ReleaseError(str(exc)) from None
    signature = signature_path.read_text(encoding="ascii", errors="replace").strip()
    if not signature_valid(trusted, release.canonical(), signature):
        raise ReleaseError(
            f"{path.name} is not signed by the coordinator key this site pinned "
            f"({fingerprint(trusted)}); it names signer {release.signer}"
        )
    return release
