"""A site's side of the signed artifact: it checks it on its held-out data, installs
it with its own cleaning beside it, and refuses (and audits) anything it cannot trust."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.artifacts import check_artifact, install_artifact
from client.predict import PREPROCESSING_FILE
from client.site import Site, load_site
from common.artifact import (
    ADAPTER_FILES,
    MANIFEST,
    MODEL_INT8,
    artifact_payload,
    file_entries,
    sign_manifest,
    verify_artifact,
)
from common.errors import ArtifactError
from common.inference import OnnxClassifier, classification_metrics
from common.signing import fingerprint
from common.tasks import TASKS
from simulations.generators.tabular import bank_schema
from simulations.scenario import Scenario
from tests.artifacts import BuiltArtifact, build_test_artifact
from tests.conftest import write_site_config

pytestmark = pytest.mark.slow

TABULAR = "tabular-classification"
DICOM = "dicom-classification"
SITE_OF = {TABULAR: "bank-a", DICOM: "hospital-a"}
STAGING = ".incoming"


# ------------------------------------------------------------------ artifacts ---


@pytest.fixture(scope="module")
def coordinator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    site_workspace: Path,
    coordinator_key: Ed25519PrivateKey,
) -> dict[str, BuiltArtifact]:
    """A checked artifact per task, signed by the coordinator key the sites pin."""
    return {
        task: build_test_artifact(
            tmp_path_factory.mktemp(task),
            task,
            site_workspace / "models" / task,
            key=coordinator_key,
        )
        for task in (TABULAR, DICOM)
    }


@pytest.fixture(scope="module")
def unchecked(
    tmp_path_factory: pytest.TempPathFactory,
    site_workspace: Path,
    coordinator_key: Ed25519PrivateKey,
) -> BuiltArtifact:
    """Signed by the right key, but not yet scored by the sites."""
    return build_test_artifact(
        tmp_path_factory.mktemp("unchecked"),
        TABULAR,
        site_workspace / "models" / TABULAR,
        checked=False,
        key=coordinator_key,
    )


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, site_workspace: Path) -> BuiltArtifact:
    """Intact and checked, but signed by a key no site pins."""
    return build_test_artifact(
        tmp_path_factory.mktemp("foreign"), TABULAR, site_workspace / "models" / TABULAR
    )


@pytest.fixture(scope="module")
def other_base(
    tmp_path_factory: pytest.TempPathFactory, coordinator_key: Ed25519PrivateKey
) -> BuiltArtifact:
    """Built on a tabular base of the same shape but other weights than the sites hold."""
    root = tmp_path_factory.mktemp("other-base")
    schema = bank_schema()
    base = TASKS.get(TABULAR).build_demo_base_model(
        root / "base",
        seed=12345,
        num_numeric_features=len(schema["numeric_features"]),
        categorical_cardinalities=[len(v) for v in schema["categorical_features"].values()],
        num_labels=len(schema["classes"]),
    )
    return build_test_artifact(root, TABULAR, base, key=coordinator_key)


@pytest.fixture(scope="module")
def second_release(
    tmp_path_factory: pytest.TempPathFactory,
    built: dict[str, BuiltArtifact],
    coordinator_key: Ed25519PrivateKey,
) -> Path:
    """The tabular artifact of a later run: same files, another signed manifest."""
    directory = tmp_path_factory.mktemp("second") / "artifact"
    shutil.copytree(built[TABULAR].directory, directory)
    sign_manifest(
        directory, built[TABULAR].manifest.model_copy(update={"run": "78"}), coordinator_key
    )
    return directory


# ---------------------------------------------------------------------- sites ---


def _site(
    scenario: Scenario, workspace: Path, tmp_path: Path, site_id: str, key: Path | None
) -> Site:
    """A workspace site with a fresh state folder, pinning ``key`` (or nothing)."""
    path = write_site_config(scenario, workspace, site_id, tmp_path)
    if key is not None:
        document = tomllib.loads(path.read_text())
        document["site"]["coordinator_key"] = str(key)
        path.write_text(tomli_w.dumps(document))
    return load_site(path)


def _manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()


def _events(site: Site, event: str) -> list[dict[str, object]]:
    return [e for e in site.audit.events() if e["event"] == event]


def _assert_no_staging_leftovers(site: Site) -> None:
    """Only installed artifacts (and at most an empty staging folder) remain."""
    root = site.config.site.installed_artifacts
    if not root.exists():
        return
    task = site.task.name
    assert {p.name for p in root.iterdir()} <= {STAGING, task, f"{task}.previous"}
    incoming = root / STAGING
    assert not incoming.exists() or list(incoming.iterdir()) == []


def _assert_nothing_installed(site: Site) -> None:
    root = site.config.site.installed_artifacts
    assert not (root / site.task.name).exists()
    assert not (root / f"{site.task.name}.previous").exists()
    _assert_no_staging_leftovers(site)


# --------------------------------------------------------------------- check ---


@pytest.mark.parametrize("task", [TABULAR, DICOM])
def test_check_scores_fp32_and_int8_on_the_holdout_and_installs_nothing(
    task: str,
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
) -> None:
    artifact = built[task]
    site = _site(small_scenario, site_workspace, tmp_path, SITE_OF[task], artifact.public_key)
    check = check_artifact(site, artifact_payload(artifact.directory), run="77")

    holdout = site.load_data().holdout
    for scores in (check.fp32, check.int8):
        assert set(scores) == {"accuracy", "loss", "auc", "examples"}
        assert 0.0 <= float(scores["accuracy"] or 0) <= 1.0
        assert scores["examples"] == len(holdout.labels) > 0
    assert check.int8["accuracy"] == pytest.approx(check.fp32["accuracy"], abs=0.1)
    assert check.int8["loss"] == pytest.approx(check.fp32["loss"], abs=0.05)
    # The int8 score is the payload's int8 model on this site's held-out records.
    logits = OnnxClassifier(artifact.directory / MODEL_INT8).logits(
        {n: holdout.features[n] for n in site.task.input_names}
    )
    assert check.int8 == pytest.approx(classification_metrics(logits, holdout.labels))
    # The fp32 score is the merged model in fp32 (as the coordinator exported it).
    fp32_logits = OnnxClassifier(artifact.fp32).logits(
        {n: holdout.features[n] for n in site.task.input_names}
    )
    expected_fp32 = classification_metrics(fp32_logits, holdout.labels)
    assert check.fp32["accuracy"] == pytest.approx(expected_fp32["accuracy"])
    assert check.fp32["loss"] == pytest.approx(expected_fp32["loss"], abs=1e-4)

    manifest_sha256 = _manifest_sha256(artifact.directory)
    assert check.manifest_sha256 == manifest_sha256
    (checked,) = _events(site, "artifact-checked")
    assert checked["manifest_sha256"] == manifest_sha256
    assert checked["run"] == "77"
    assert checked["signer"] == fingerprint(artifact.key.public_key())
    assert checked["fp32"] == pytest.approx(check.fp32)
    assert checked["int8"] == pytest.approx(check.int8)
    assert 0.9 <= float(checked["agreement"]) <= 1.0  # type: ignore[arg-type]
    assert _events(site, "artifact-refused") == []
    assert _events(site, "artifact-installed") == []
    _assert_nothing_installed(site)


def test_the_check_accepts_an_artifact_the_sites_have_not_scored_yet(
    small_scenario: Scenario, site_workspace: Path, tmp_path: Path, unchecked: BuiltArtifact
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, "bank-a", unchecked.public_key)
    check = check_artifact(site, artifact_payload(unchecked.directory), run="77")
    assert check.manifest_sha256 == _manifest_sha256(unchecked.directory)
    assert [e["event"] for e in site.audit.events()][-1] == "artifact-checked"
    _assert_nothing_installed(site)


# ------------------------------------------------------------------- install ---


@pytest.mark.parametrize("task", [TABULAR, DICOM])
def test_install_puts_the_verified_artifact_and_the_site_cleaning_in_place(
    task: str,
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
) -> None:
    artifact = built[task]
    site = _site(small_scenario, site_workspace, tmp_path, SITE_OF[task], artifact.public_key)
    target = install_artifact(site, artifact_payload(artifact.directory), run="77")

    assert target == site.config.site.installed_artifacts / task
    assert target.is_dir()
    installed = verify_artifact(target, artifact.key.public_key())
    assert installed.manifest == artifact.manifest
    assert (target / MODEL_INT8).read_bytes() == (artifact.directory / MODEL_INT8).read_bytes()
    # The site's own cleaning sits beside it, outside the signed file list.
    assert PREPROCESSING_FILE not in installed.manifest.files
    cleaning = json.loads((target / PREPROCESSING_FILE).read_text())
    assert cleaning == site.load_data().preprocessing
    if task == TABULAR:
        schema = bank_schema()
        assert cleaning["format"] == "table"
        assert cleaning["classes"] == schema["classes"]
        assert cleaning["numeric_features"] == schema["numeric_features"]
        for statistic in ("medians", "means", "stds", "clip_low", "clip_high"):
            assert len(cleaning[statistic]) == len(schema["numeric_features"])
        assert set(cleaning["categorical_features"]) == set(schema["categorical_features"])
    else:
        assert cleaning["format"] == "dicom"
        assert cleaning["image_size"] == small_scenario.image_size
        assert cleaning["classes"] == list(site.config.data.classes)

    (event,) = _events(site, "artifact-installed")
    assert event["manifest_sha256"] == _manifest_sha256(artifact.directory)
    assert event["model_sha256"] == artifact.manifest.files[MODEL_INT8].sha256
    assert event["signer"] == fingerprint(artifact.key.public_key())
    assert event["run"] == "77"
    assert _events(site, "artifact-refused") == []
    assert not (target.parent / f"{task}.previous").exists()
    _assert_no_staging_leftovers(site)


def test_a_reinstall_keeps_the_version_it_replaces_as_previous(
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
    second_release: Path,
) -> None:
    first = built[TABULAR]
    site = _site(small_scenario, site_workspace, tmp_path, "bank-a", first.public_key)
    root = site.config.site.installed_artifacts
    target = install_artifact(site, artifact_payload(first.directory), run="77")
    assert install_artifact(site, artifact_payload(second_release), run="78") == target

    previous = root / f"{TABULAR}.previous"
    assert _manifest_sha256(target) == _manifest_sha256(second_release)
    assert _manifest_sha256(previous) == _manifest_sha256(first.directory)
    for folder in (target, previous):
        verify_artifact(folder, first.key.public_key())
        assert (folder / PREPROCESSING_FILE).is_file()

    # Only one previous version is kept: the one just replaced.
    install_artifact(site, artifact_payload(first.directory), run="77")
    assert _manifest_sha256(target) == _manifest_sha256(first.directory)
    assert _manifest_sha256(previous) == _manifest_sha256(second_release)
    assert [e["run"] for e in _events(site, "artifact-installed")] == ["77", "78", "77"]
    _assert_no_staging_leftovers(site)


# ------------------------------------------------------------------ refusals ---


def _flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _edited_manifest(payload: dict[str, bytes]) -> dict[str, bytes]:
    manifest = json.loads(payload[MANIFEST])
    manifest["sites"][0]["epsilon"] = 0.1  # a nicer privacy story, same signature
    return {**payload, MANIFEST: json.dumps(manifest, indent=2, sort_keys=True).encode()}


Payloads = dict[str, Callable[[], dict[str, bytes]]]


@pytest.fixture(scope="module")
def payloads(
    built: dict[str, BuiltArtifact],
    unchecked: BuiltArtifact,
    foreign: BuiltArtifact,
    other_base: BuiltArtifact,
) -> Payloads:
    good = artifact_payload(built[TABULAR].directory)
    return {
        "good": lambda: dict(good),
        "unchecked": lambda: artifact_payload(unchecked.directory),
        "other-key": lambda: artifact_payload(foreign.directory),
        "edited-manifest": lambda: _edited_manifest(good),
        "foreign-signature": lambda: {
            **good,
            "manifest.sig": artifact_payload(foreign.directory)["manifest.sig"],
        },
        "flipped-model-byte": lambda: {**good, MODEL_INT8: _flip_byte(good[MODEL_INT8])},
        "flipped-adapter-byte": lambda: {
            **good,
            ADAPTER_FILES[0]: _flip_byte(good[ADAPTER_FILES[0]]),
        },
        "longer-model": lambda: {**good, MODEL_INT8: good[MODEL_INT8] + b"\0"},
        "other-base": lambda: artifact_payload(other_base.directory),
        "other-task": lambda: artifact_payload(built[DICOM].directory),
        "extra-entry": lambda: {**good, "../x": b"not an artifact file"},
        "missing-entry": lambda: {k: v for k, v in good.items() if k != ADAPTER_FILES[1]},
    }


# (case, payload, whether the site pins the coordinator key, expected check, stages)
REFUSALS = [
    ("no-key", "good", False, "no-trusted-key", ("check", "install")),
    ("other-key", "other-key", True, "bad-signature", ("check", "install")),
    ("edited-manifest", "edited-manifest", True, "bad-signature", ("check", "install")),
    ("foreign-signature", "foreign-signature", True, "bad-signature", ("check", "install")),
    ("tampered-model", "flipped-model-byte", True, "hash-mismatch", ("check", "install")),
    ("tampered-adapter", "flipped-adapter-byte", True, "hash-mismatch", ("check", "install")),
    ("longer-model", "longer-model", True, "size-mismatch", ("check", "install")),
    ("wrong-base", "other-base", True, "wrong-base-model", ("check", "install")),
    ("wrong-task", "other-task", True, "wrong-task", ("check", "install")),
    ("extra-entry", "extra-entry", True, "bad-payload", ("check", "install")),
    ("missing-entry", "missing-entry", True, "bad-payload", ("check", "install")),
    ("unchecked", "unchecked", True, "unchecked", ("install",)),
]
CASES = [
    pytest.param(payload, pinned, kind, stage, id=f"{case}-{stage}")
    for case, payload, pinned, kind, stages in REFUSALS
    for stage in stages
]


@pytest.mark.parametrize(("payload", "pinned", "kind", "stage"), CASES)
def test_a_refused_artifact_is_audited_with_its_check_and_installs_nothing(
    payload: str,
    pinned: bool,
    kind: str,
    stage: str,
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
    payloads: Payloads,
) -> None:
    key = built[TABULAR].public_key if pinned else None
    site = _site(small_scenario, site_workspace, tmp_path, "bank-a", key)
    handler = check_artifact if stage == "check" else install_artifact

    with pytest.raises(ArtifactError) as refused:
        handler(site, payloads[payload](), run="77")
    assert refused.value.kind == kind

    (event,) = _events(site, "artifact-refused")
    assert event["check"] == kind
    assert event["stage"] == stage
    assert event["run"] == "77"
    assert event["reason"] == str(refused.value)
    for local in (str(tmp_path), str(site_workspace)):
        assert local not in str(event["reason"])
    assert _events(site, "artifact-checked") == _events(site, "artifact-installed") == []
    _assert_nothing_installed(site)
    # A payload entry never names a path of its own: nothing was written beside staging.
    root = site.config.site.installed_artifacts
    assert not (root / "x").exists() and not (root / STAGING / "x").exists()


def test_a_refused_install_leaves_the_installed_version_alone(
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
    payloads: Payloads,
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, "bank-a", built[TABULAR].public_key)
    target = install_artifact(site, payloads["good"](), run="77")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    for name in ("flipped-model-byte", "other-key", "unchecked", "other-base"):
        with pytest.raises(ArtifactError):
            install_artifact(site, payloads[name](), run="77")
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert not (target.parent / f"{TABULAR}.previous").exists()
    assert [e["check"] for e in _events(site, "artifact-refused")] == [
        "hash-mismatch",
        "bad-signature",
        "unchecked",
        "wrong-base-model",
    ]
    assert len(_events(site, "artifact-installed")) == 1
    _assert_no_staging_leftovers(site)


@pytest.fixture(scope="module")
def unloadable(
    tmp_path_factory: pytest.TempPathFactory,
    built: dict[str, BuiltArtifact],
    coordinator_key: Ed25519PrivateKey,
) -> Path:
    """Correctly signed and hashed, but its int8 model is not an ONNX model."""
    directory = tmp_path_factory.mktemp("unloadable") / "artifact"
    shutil.copytree(built[TABULAR].directory, directory)
    (directory / MODEL_INT8).write_bytes(b"not an onnx model")
    manifest = built[TABULAR].manifest.model_copy(update={"files": file_entries(directory)})
    sign_manifest(directory, manifest, coordinator_key)
    return directory


def test_a_signed_model_that_cannot_be_loaded_is_refused_and_audited_without_paths(
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
    unloadable: Path,
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, "bank-a", built[TABULAR].public_key)
    with pytest.raises(ArtifactError) as refused:
        check_artifact(site, artifact_payload(unloadable), run="77")
    assert refused.value.kind == "bad-model"
    _assert_nothing_installed(site)
    assert str(tmp_path) not in str(refused.value)
    (event,) = _events(site, "artifact-refused")
    assert event["check"] == "bad-model"


@pytest.mark.slow
def test_an_artifact_replayed_by_another_run_is_refused(
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    built: dict[str, BuiltArtifact],
) -> None:
    """A genuine, checked artifact of run 77 sent again by run 78 (e.g. to roll a site
    back to an older model) is refused at both stages and audited."""
    site = _site(small_scenario, site_workspace, tmp_path, "bank-a", built[TABULAR].public_key)
    payload = artifact_payload(built[TABULAR].directory)
    for call in (check_artifact, install_artifact):
        with pytest.raises(ArtifactError) as refused:
            call(site, payload, run="78")
        assert refused.value.kind == "wrong-run"
    assert [e["check"] for e in _events(site, "artifact-refused")] == ["wrong-run"] * 2
    assert not (site.config.site.installed_artifacts / TABULAR).exists()
