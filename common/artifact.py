"""The distributable model: its files, its manifest, the detached signature, and their
verification (the one check the coordinator, every site and every reviewer run).

An artifact folder holds::

    model.int8.onnx                      merged model (base + final adapter), int8
    adapter/adapter_model.safetensors    the final adapter alone, for sites with the base
    adapter/adapter_config.json
    manifest.json                        provenance, privacy, files, metrics
    manifest.sig                         Ed25519 signature of manifest.json's exact bytes

Verification trusts nothing in the folder before the signature: it checks the signature
over the manifest's bytes with the pinned coordinator key, then parses the manifest,
then checks the size and SHA-256 of every file it lists. Files the manifest does not
list (a site's own ``preprocessing.json``) are not part of the artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ArtifactError
from common.files import fsync_folder, hash_file, write_atomically
from common.signing import fingerprint, public_key_text, sign, signature_valid

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL_INT8 = "model.int8.onnx"
ADAPTER_DIR = "adapter"
ADAPTER_FILES = (f"{ADAPTER_DIR}/adapter_model.safetensors", f"{ADAPTER_DIR}/adapter_config.json")
ARTIFACT_FILES = (MODEL_INT8, *ADAPTER_FILES)
"""Every file an artifact carries besides its manifest and signature; nothing else is
ever written from a received artifact."""
FORMAT: Literal["fedlora-artifact/1"] = "fedlora-artifact/1"
_HEX64 = r"^[0-9a-f]{64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    sha256: str = Field(pattern=_HEX64)
    bytes: int = Field(ge=0)


class InputSpec(_Model):
    dtype: Literal["float32", "int64"]
    shape: list[int | str]
    """Dimensions; ``"batch"`` marks the free batch axis."""


class SitePrivacy(_Model):
    """What one site spent on its data, as it reported it (lifetime ε after the run)."""

    site: str
    epsilon: float
    delta: float
    rounds_trained: int
    accountant: str | None = None


class Quantization(_Model):
    method: Literal["onnxruntime.quantize_dynamic"] = "onnxruntime.quantize_dynamic"
    weight_type: Literal["QInt8"] = "QInt8"
    activations: Literal["dynamic uint8"] = "dynamic uint8"
    op_types: list[str]
    kept_fp32: list[str]
    """Nodes of a quantized op type left in fp32 on purpose (the classifier head)."""
    opset: int
    fp32_onnx_bytes: int
    fp32_onnx_sha256: str = Field(pattern=_HEX64)


class Metrics(_Model):
    accuracy: float
    loss: float
    auc: float | None
    """Example-weighted mean of the sites' ROC AUC (one-vs-rest macro for >2 classes)."""
    examples: int


class CheckedMetrics(_Model):
    """The federated check: both models evaluated at the sites on their held-out data."""

    fp32: Metrics
    int8: Metrics
    sites: list[str]

    @property
    def accuracy_loss(self) -> float:
        """Points of accuracy the int8 model lost (negative: it gained)."""
        return self.fp32.accuracy - self.int8.accuracy


class AuditHead(_Model):
    log: str
    seq: int
    hash: str = Field(pattern=_HEX64)


class Manifest(_Model):
    format: Literal["fedlora-artifact/1"] = FORMAT
    task: str
    run: str
    created: str
    code_version: str
    base_model_sha256: str = Field(pattern=_HEX64)
    num_labels: int
    inputs: dict[str, InputSpec]
    outputs: list[str]
    lora: dict[str, int | float | list[str]]
    training: dict[str, int | float | str | None]
    sites: list[SitePrivacy]
    quantization: Quantization
    files: dict[str, FileEntry]
    metrics: CheckedMetrics | None = None
    """None until the sites have checked the artifact; only a checked artifact installs."""
    audit: AuditHead | None = None
    """The coordinator's audit log head when the manifest was signed."""
    signer: str
    """Fingerprint of the coordinator key that signs the manifest."""

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    hash_file(digest, path)
    return FileEntry(sha256=digest.hexdigest(), bytes=path.stat().st_size)


def manifest_sha256(data: bytes) -> str:
    """The hash by which logs and replies name a manifest: SHA-256 of its exact bytes."""
    return hashlib.sha256(data).hexdigest()


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """Size and hash of every artifact file in ``directory``."""
    missing = [name for name in ARTIFACT_FILES if not (directory / name).is_file()]
    if missing:
        raise ArtifactError("missing-file", f"the artifact lacks {', '.join(missing)}")
    return {name: file_entry(directory / name) for name in ARTIFACT_FILES}


def sign_manifest(directory: Path, manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    """Write ``manifest.json`` and its detached signature; returns the manifest's bytes."""
    if manifest.signer != fingerprint(key.public_key()):
        raise ArtifactError("untrusted-signer", "the manifest names another signer than this key")
    data = manifest.to_bytes()
    write_atomically(directory / MANIFEST, data.decode())
    write_atomically(directory / SIGNATURE, sign(key, data) + "\n")
    return data


@dataclass(frozen=True)
class VerifiedArtifact:
    directory: Path
    manifest: Manifest
    manifest_sha256: str
    signer_public_key: str


def verify_artifact(directory: Path, trusted_key: Ed25519PublicKey) -> VerifiedArtifact:
    """Signature first, then the manifest, then every file; ArtifactError says which
    check failed (``kind``) and what was found."""
    manifest_path, signature_path = directory / MANIFEST, directory / SIGNATURE
    for path in (manifest_path, signature_path):
        if not path.is_file():
            raise ArtifactError("missing-file", f"the artifact has no {path.name}")
    data = manifest_path.read_bytes()
    signature = signature_path.read_text(encoding="ascii", errors="replace").strip()
    if not signature_valid(trusted_key, data, signature):
        raise ArtifactError(
            "bad-signature",
            f"{SIGNATURE} is not a valid signature of {MANIFEST} by the trusted coordinator "
            f"key {fingerprint(trusted_key)}: the manifest or the signature was altered, "
            "or another key signed it",
        )
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise ArtifactError("bad-manifest", f"{MANIFEST} is signed but malformed: {exc}") from None
    if manifest.signer != fingerprint(trusted_key):
        raise ArtifactError("bad-manifest", f"{MANIFEST} names signer {manifest.signer}")
    if set(manifest.files) != set(ARTIFACT_FILES):
        raise ArtifactError(
            "bad-manifest",
            f"{MANIFEST} lists {sorted(manifest.files)}, expected {sorted(ARTIFACT_FILES)}",
        )
    for name, expected in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise ArtifactError("missing-file", f"the artifact lacks {name}")
        found = file_entry(path)
        if found.bytes != expected.bytes:
            raise ArtifactError(
                "size-mismatch",
                f"{name} has {found.bytes} bytes, the manifest says {expected.bytes}",
            )
        if found.sha256 != expected.sha256:
            raise ArtifactError(
                "hash-mismatch",
                f"{name} has SHA-256 {found.sha256[:16]}…, the manifest says "
                f"{expected.sha256[:16]}…: the file was altered",
            )
    return VerifiedArtifact(
        directory=directory,
        manifest=manifest,
        manifest_sha256=manifest_sha256(data),
        signer_public_key=public_key_text(trusted_key),
    )


# ---------------------------------------------------------- moving artifacts ---


def artifact_payload(directory: Path) -> dict[str, bytes]:
    """The artifact's files by relative name, as sent to sites."""
    return {
        name: (directory / name).read_bytes() for name in (*ARTIFACT_FILES, MANIFEST, SIGNATURE)
    }


def write_payload(payload: Mapping[str, object], directory: Path) -> None:
    """Write a received artifact into a new folder, durably. Only the known file names
    are written, so a payload can never name a path of its own choosing."""
    if not all(isinstance(value, bytes) for value in payload.values()):
        raise ArtifactError("bad-payload", "the artifact message holds entries that are not files")
    expected = {*ARTIFACT_FILES, MANIFEST, SIGNATURE}
    unknown = sorted(set(payload) - expected)
    missing = sorted(expected - set(payload))
    if unknown or missing:
        raise ArtifactError(
            "bad-payload",
            "the artifact message "
            + "; ".join(
                part
                for part in (
                    f"lacks {', '.join(missing)}" if missing else "",
                    f"carries unexpected entries {unknown[:5]}" if unknown else "",
                )
                if part
            ),
        )
    for name in sorted(expected):
        target = directory.joinpath(*PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as handle:
            handle.write(cast(bytes, payload[name]))
            handle.flush()
            os.fsync(handle.fileno())
    for folder in {directory, directory / ADAPTER_DIR}:
        fsync_folder(folder)


def install(staged: Path, target: Path) -> None:
    """Move a verified artifact folder into place. The one it replaces is kept as
    ``<target>.previous`` (an operator's way back), and put back if the move fails."""
    previous = target.with_name(target.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.replace(previous)
    try:
        staged.replace(target)
    except OSError:
        if previous.exists() and not target.exists():
            previous.replace(target)
        raise
    fsync_folder(target.parent)
