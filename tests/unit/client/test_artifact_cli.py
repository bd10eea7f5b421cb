"""``fedlora artifact verify|inspect|predict`` through the real root command: which key
is trusted, what a tampered artifact looks like, and predictions cleaned as in training."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import tomli_w
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.artifacts import install_artifact
from client.data.tabular import TabularPreprocessor
from client.predict import PREPROCESSING_FILE
from client.site import load_site
from common.artifact import (
    ADAPTER_FILES,
    MANIFEST,
    MODEL_INT8,
    SIGNATURE,
    Manifest,
    artifact_payload,
    sign_manifest,
)
from common.audit.review import COORDINATOR_PUBLIC_KEY
from common.cli import cli, main
from common.errors import ArtifactError, DataError
from common.inference import OnnxClassifier, softmax
from common.signing import fingerprint, sign, write_public_key
from simulations.scenario import Scenario
from tests.artifacts import BuiltArtifact, build_test_artifact
from tests.conftest import write_site_config

TABULAR = "tabular-classification"
DICOM = "dicom-classification"
SITE_OF = {TABULAR: "bank-a", DICOM: "hospital-a"}
WIDE = {"COLUMNS": "250"}


def _invoke(*args: str | Path) -> Result:
    """``fedlora artifact ARGS`` through the real root command."""
    return CliRunner().invoke(cli, ["artifact", *map(str, args)], env=WIDE)


def _flat(text: str) -> str:
    """Rich's line wrapping undone (runs of whitespace become one space)."""
    return " ".join(text.split())


# ------------------------------------------------------------------- fixtures ---


class Release:
    """A finished run's artifacts, laid out as the coordinator writes them."""

    def __init__(self, run_dir: Path, built: dict[str, BuiltArtifact]) -> None:
        self.run_dir = run_dir
        self.built = built
        self.key = built[TABULAR].key
        self.public_key = run_dir / COORDINATOR_PUBLIC_KEY

    def artifact(self, task: str) -> Path:
        return self.run_dir / "artifacts" / task


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, site_workspace: Path) -> Release:
    key = Ed25519PrivateKey.generate()
    run_dir = tmp_path_factory.mktemp("run")
    built = {}
    for task in (TABULAR, DICOM):
        built[task] = build_test_artifact(
            tmp_path_factory.mktemp(task), task, site_workspace / "models" / task, key=key
        )
        shutil.copytree(built[task].directory, run_dir / "artifacts" / task)
    write_public_key(run_dir / COORDINATOR_PUBLIC_KEY, key.public_key())
    return Release(run_dir, built)


class Installed:
    def __init__(self, config: Path, directory: Path) -> None:
        self.config = config
        self.directory = directory


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory,
    small_scenario: Scenario,
    site_workspace: Path,
    release: Release,
) -> dict[str, Installed]:
    """Each task's artifact installed at a site that pins the run's coordinator key."""
    root = tmp_path_factory.mktemp("sites")
    result = {}
    for task, site_id in SITE_OF.items():
        config = write_site_config(small_scenario, site_workspace, site_id, root)
        document = tomllib.loads(config.read_text())
        document["site"]["coordinator_key"] = str(release.public_key)
        config.write_text(tomli_w.dumps(document))
        site = load_site(config)
        target = install_artifact(site, artifact_payload(release.artifact(task)), run="77")
        result[task] = Installed(config, target)
    return result


def _copy(source: Path, tmp_path: Path) -> Path:
    """A copy outside any run directory (so no run key is found next to it)."""
    target = tmp_path / "copy" / source.name
    shutil.copytree(source, target)
    return target


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _tamper(directory: Path, how: str) -> None:
    if how == "model":
        _flip_byte(directory / MODEL_INT8)
    elif how == "adapter":
        _flip_byte(directory / ADAPTER_FILES[0])
    elif how == "longer-model":
        with (directory / MODEL_INT8).open("ab") as handle:
            handle.write(b"\0")
    elif how == "manifest":
        manifest = json.loads((directory / MANIFEST).read_text())
        manifest["sites"][0]["epsilon"] = 0.1
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    elif how == "signature":
        other = Ed25519PrivateKey.generate()
        (directory / SIGNATURE).write_text(sign(other, (directory / MANIFEST).read_bytes()) + "\n")
    elif how == "missing-adapter":
        (directory / ADAPTER_FILES[1]).unlink()
    else:  # pragma: no cover - a typo in a parameter
        raise AssertionError(how)


TAMPERING = [
    ("model", "hash-mismatch"),
    ("adapter", "hash-mismatch"),
    ("longer-model", "size-mismatch"),
    ("manifest", "bad-signature"),
    ("signature", "bad-signature"),
    ("missing-adapter", "missing-file"),
]


# ---------------------------------------------------------------------- help ---


@pytest.mark.parametrize("command", [[], ["verify"], ["inspect"], ["predict"]])
def test_every_artifact_command_has_help(command: list[str]) -> None:
    result = _invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    if not command:
        for name in ("verify", "inspect", "predict"):
            assert name in result.output


def test_the_root_command_lists_the_artifact_group() -> None:
    result = CliRunner().invoke(cli, ["--help"], env=WIDE)
    assert result.exit_code == 0
    assert "artifact" in result.output


# -------------------------------------------------------------------- verify ---


@pytest.mark.slow
def test_verify_with_trust_run_key_uses_the_run_key_next_to_the_artifact(
    release: Release,
) -> None:
    result = _invoke("verify", release.artifact(TABULAR), "--trust-run-key")
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert "verified" in text and "NOT VERIFIED" not in text
    assert TABULAR in text
    assert fingerprint(release.key.public_key()) in text
    assert "the run's keys/coordinator.pub" in text
    for name in (MODEL_INT8, *ADAPTER_FILES):
        assert name in text


@pytest.mark.slow
def test_verify_with_an_explicit_key_or_a_site_pinned_key(
    release: Release, installed: dict[str, Installed], tmp_path: Path
) -> None:
    copy = _copy(release.artifact(TABULAR), tmp_path)
    by_key = _invoke("verify", copy, "--key", release.public_key)
    assert by_key.exit_code == 0, by_key.output
    assert "--key" in _flat(by_key.output)
    by_site = _invoke("verify", copy, "--site", installed[TABULAR].config)
    assert by_site.exit_code == 0, by_site.output
    assert "pinned by" in _flat(by_site.output)
    # An explicit key is the one used, even with the run's own key beside the artifact.
    other = tmp_path / "other.pub"
    write_public_key(other, Ed25519PrivateKey.generate().public_key())
    wrong = _invoke("verify", release.artifact(TABULAR), "--key", other)
    assert wrong.exit_code == 1
    assert "bad-signature" in wrong.output


@pytest.mark.slow
def test_verify_json_describes_the_artifact(release: Release) -> None:
    result = _invoke("verify", release.artifact(TABULAR), "--key", release.public_key, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    manifest = release.built[TABULAR].manifest
    assert document["ok"] is True
    assert document["task"] == TABULAR
    assert document["checked"] is True
    assert document["signer"] == manifest.signer
    assert document["files"] == {name: entry.sha256 for name, entry in manifest.files.items()}
    assert len(document["manifest_sha256"]) == 64


@pytest.mark.slow
def test_verify_warns_about_an_unchecked_artifact(tmp_path: Path, site_workspace: Path) -> None:
    built = build_test_artifact(
        tmp_path, TABULAR, site_workspace / "models" / TABULAR, checked=False
    )
    result = _invoke("verify", built.directory, "--key", built.public_key)
    assert result.exit_code == 0, result.output
    assert "not yet checked" in _flat(result.output)
    document = json.loads(
        _invoke("verify", built.directory, "--key", built.public_key, "--json").stdout
    )
    assert document["checked"] is False


@pytest.mark.slow
@pytest.mark.parametrize(("how", "kind"), TAMPERING, ids=[how for how, _ in TAMPERING])
def test_verify_fails_on_a_tampered_artifact_and_names_the_check(
    how: str, kind: str, release: Release, tmp_path: Path
) -> None:
    copy = _copy(release.artifact(TABULAR), tmp_path)
    _tamper(copy, how)
    result = _invoke("verify", copy, "--key", release.public_key)
    assert result.exit_code == 1, result.output
    assert "NOT VERIFIED" in result.output
    assert f"({kind})" in result.output
    as_json = _invoke("verify", copy, "--key", release.public_key, "--json")
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    assert document["ok"] is False
    assert document["check"] == kind
    assert document["reason"]


@pytest.mark.slow
def test_verify_without_any_trusted_key_cannot_check_and_exits_2(
    release: Release,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The run's own key lies beside this artifact: without --trust-run-key it is not
    used."""
    argv = ["fedlora", "artifact", "verify", str(release.artifact(TABULAR))]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no trusted coordinator key" in err
    assert "--key" in err and "--site" in err and "--trust-run-key" in err


@pytest.mark.slow
def test_verify_with_a_site_that_pins_no_key_exits_2(
    release: Release,
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_site_config(small_scenario, site_workspace, "bank-a", tmp_path)
    argv = ["fedlora", "artifact", "verify", str(release.artifact(TABULAR)), "--site", str(config)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "coordinator_key" in capsys.readouterr().err


# ------------------------------------------------------------------- inspect ---


@pytest.mark.slow
def test_inspect_shows_provenance_privacy_size_and_both_scores(release: Release) -> None:
    result = _invoke("inspect", release.artifact(TABULAR), "--trust-run-key")
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    manifest = release.built[TABULAR].manifest
    assert f"artifact — {TABULAR}" in text
    assert manifest.base_model_sha256 in text
    # ε per site, as the sites reported it.
    assert re.search(r"site-a\s+3\.50\s+1e-05\s+2", text)
    assert re.search(r"site-b\s+4\.00\s+1e-05\s+2", text)
    # int8 size over fp32 size.
    ratio = manifest.files[MODEL_INT8].bytes / manifest.quantization.fp32_onnx_bytes
    assert f"= {ratio:.2f}" in text
    assert ratio < 1.0
    # Both models' federated scores.
    assert re.search(r"fp32\s+0\.9000\s+0\.9500\s+0\.3000\s+120", text)
    assert re.search(r"int8\s+0\.9000\s+0\.9500\s+0\.3000\s+120", text)
    # (int8 lost nothing; the sign of a zero difference is not the point here)
    assert re.search(r"int8 − fp32 accuracy: [+-]0\.00 points; sites: site-a", text)
    assert "verified" in text and "NOT VERIFIED" not in text


@pytest.mark.slow
def test_inspect_shows_the_points_of_accuracy_int8_lost(release: Release, tmp_path: Path) -> None:
    copy = _copy(release.artifact(TABULAR), tmp_path)
    manifest = release.built[TABULAR].manifest
    assert manifest.metrics is not None
    int8 = manifest.metrics.int8.model_copy(update={"accuracy": 0.875})
    metrics = manifest.metrics.model_copy(update={"int8": int8})
    sign_manifest(copy, manifest.model_copy(update={"metrics": metrics}), release.key)
    result = _invoke("inspect", copy, "--key", release.public_key)
    assert result.exit_code == 0, result.output
    text = _flat(result.output)
    assert re.search(r"int8\s+0\.8750\s", text)
    assert "int8 − fp32 accuracy: -2.50 points" in text


@pytest.mark.slow
def test_inspect_json_round_trips_to_the_manifest(release: Release) -> None:
    result = _invoke("inspect", release.artifact(TABULAR), "--trust-run-key", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["verified"] is True
    assert "coordinator.pub" in document["key_source"]
    manifest = Manifest.model_validate(document["manifest"])
    assert manifest == release.built[TABULAR].manifest
    assert manifest.to_bytes() == (release.artifact(TABULAR) / MANIFEST).read_bytes()


@pytest.mark.slow
def test_inspect_without_a_key_shows_the_manifest_marked_unverified(
    release: Release, tmp_path: Path
) -> None:
    copy = _copy(release.artifact(TABULAR), tmp_path)
    result = _invoke("inspect", copy)
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert TABULAR in text and "site-a" in text
    assert "NOT VERIFIED (no-trusted-key)" in text
    document = json.loads(_invoke("inspect", copy, "--json").stdout)
    assert document["verified"] is False
    assert document["check"] == "no-trusted-key"
    assert Manifest.model_validate(document["manifest"]) == release.built[TABULAR].manifest


@pytest.mark.slow
def test_inspect_of_a_tampered_artifact_says_which_check_failed(
    release: Release, tmp_path: Path
) -> None:
    copy = _copy(release.artifact(TABULAR), tmp_path)
    _tamper(copy, "model")
    result = _invoke("inspect", copy, "--key", release.public_key)
    assert "NOT VERIFIED (hash-mismatch)" in _flat(result.output)


@pytest.mark.slow
def test_inspect_of_a_malformed_manifest_fails_without_a_traceback(
    release: Release,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = _copy(release.artifact(TABULAR), tmp_path)
    (copy / MANIFEST).write_text('{"task": ')
    argv = ["fedlora", "artifact", "inspect", str(copy), "--key", str(release.public_key)]
    monkeypatch.setattr(sys, "argv", argv)
    code: int | str | None = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    output = capsys.readouterr()
    assert "Traceback" not in output.err
    assert code == 1
    assert "NOT VERIFIED (bad-signature)" in " ".join(output.err.split())


# ------------------------------------------------------------------- predict ---


def _read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _int8_probabilities(model: Path, features: dict[str, np.ndarray]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {i.name: features[i.name] for i in session.get_inputs()})[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


@pytest.mark.slow
def test_predict_csv_prints_one_prediction_per_row(
    installed: dict[str, Installed], site_workspace: Path
) -> None:
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    rows = len(pd.read_csv(table))
    result = _invoke(
        "predict", installed[TABULAR].directory, "--csv", table, "--site", installed[TABULAR].config
    )
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"^\s*row \d+\s+(repaid|default)\s", result.stdout, re.M)) == rows
    assert f"{rows} predicted, 0 skipped" in result.stderr


@pytest.mark.slow
def test_predict_csv_output_matches_the_int8_model_on_the_cleaned_rows(
    installed: dict[str, Installed], site_workspace: Path, tmp_path: Path
) -> None:
    target = installed[TABULAR].directory
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    output = tmp_path / "predictions.csv"
    result = _invoke(
        "predict", target, "--csv", table, "--output", output, "--site", installed[TABULAR].config
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(table)
    assert f"{len(frame)} predictions written" in _flat(result.stderr)

    predictions = _read_predictions(output)
    cleaning = json.loads((target / PREPROCESSING_FILE).read_text())
    classes = cleaning["classes"]
    assert list(predictions[0]) == ["record", "prediction", *(f"p_{c}" for c in classes)]
    assert [p["record"] for p in predictions] == [f"row {i + 1}" for i in range(len(frame))]
    probabilities = np.array([[float(p[f"p_{c}"]) for c in classes] for p in predictions])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    preprocessor = TabularPreprocessor.from_dict(
        {k: v for k, v in cleaning.items() if k != "format"}
    )
    features = preprocessor.transform(frame)
    expected = softmax(OnnxClassifier(target / MODEL_INT8).logits(features))
    np.testing.assert_allclose(probabilities, expected, atol=2e-6)
    # The int8 model quantizes activations per batch, so one run over the whole table
    # differs slightly from the batched run; it is still the same model.
    whole_table = _int8_probabilities(target / MODEL_INT8, features)
    np.testing.assert_allclose(probabilities, whole_table, atol=5e-3)
    assert [p["prediction"] for p in predictions] == [classes[i] for i in expected.argmax(axis=1)]


@pytest.mark.slow
def test_predict_csv_does_not_need_the_label_column(
    installed: dict[str, Installed], site_workspace: Path, tmp_path: Path
) -> None:
    site = installed[TABULAR]
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    unlabelled = tmp_path / "new-customers.csv"
    pd.read_csv(table).drop(columns=["default", "customer_name"]).to_csv(unlabelled, index=False)
    outputs = {}
    for name, source in (("labelled", table), ("unlabelled", unlabelled)):
        outputs[name] = tmp_path / f"{name}.csv"
        result = _invoke(
            "predict",
            site.directory,
            "--csv",
            source,
            "--output",
            outputs[name],
            "--site",
            site.config,
        )
        assert result.exit_code == 0, result.output
    assert _read_predictions(outputs["unlabelled"]) == _read_predictions(outputs["labelled"])


@pytest.mark.slow
def test_predict_dicom_folder_skips_unusable_files_and_ignores_labels(
    installed: dict[str, Installed], site_workspace: Path, tmp_path: Path
) -> None:
    folder = site_workspace / "sites" / "hospital-a" / "data"
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.dcm"))
    output = tmp_path / "predictions.csv"
    result = _invoke(
        "predict",
        installed[DICOM].directory,
        "--dicom",
        folder,
        "--output",
        output,
        "--site",
        installed[DICOM].config,
    )
    assert result.exit_code == 0, result.output
    skipped = re.findall(r"skipped (\S+):", result.stderr)
    assert skipped, result.stderr
    assert all(name.startswith("incoming/") for name in skipped)  # the corrupt files
    predictions = _read_predictions(output)
    predicted = [p["record"] for p in predictions]
    assert sorted(predicted + skipped) == images
    assert "labels.csv" not in result.output and "labels.csv" not in predicted
    # Of the corrupt examples the RGB secondary capture is a usable (colour) image, and
    # the one without a PatientID needs none for a prediction.
    usable = {"incoming/img-900004.dcm", "incoming/img-900005.dcm"}
    assert {n for n in predicted if n.startswith("incoming/")} == usable
    classes = ["normal", "lesion"]
    probabilities = np.array([[float(p[f"p_{c}"]) for c in classes] for p in predictions])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_predict_dicom_on_the_coordinator_artifact_uses_the_model_input_size(
    release: Release, site_workspace: Path
) -> None:
    image = site_workspace / "sites" / "hospital-b" / "data" / "series-00" / "img-000000.dcm"
    if not image.is_file():
        image = next((site_workspace / "sites" / "hospital-b" / "data").rglob("*.dcm"))
    result = _invoke(
        "predict", release.artifact(DICOM), "--dicom", image, "--key", release.public_key
    )
    assert result.exit_code == 0, result.output
    assert "1 predicted, 0 skipped" in result.stderr
    assert image.name in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["model", "manifest"])
def test_predict_refuses_a_tampered_artifact(
    how: str, installed: dict[str, Installed], site_workspace: Path, tmp_path: Path
) -> None:
    copy = _copy(installed[TABULAR].directory, tmp_path)
    _tamper(copy, how)
    output = tmp_path / "predictions.csv"
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    result = _invoke(
        "predict", copy, "--csv", table, "--output", output, "--site", installed[TABULAR].config
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, ArtifactError)
    assert result.exception.kind == ("hash-mismatch" if how == "model" else "bad-signature")
    assert not output.exists()
    assert "row 1" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("inputs", [["--csv", "--dicom"], []], ids=["both", "neither"])
def test_predict_needs_exactly_one_input(
    inputs: list[str], release: Release, site_workspace: Path
) -> None:
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    folder = site_workspace / "sites" / "hospital-a" / "data"
    args: list[str | Path] = []
    for option in inputs:
        args += [option, table if option == "--csv" else folder]
    result = _invoke("predict", release.artifact(TABULAR), *args)
    assert result.exit_code == 2
    assert "exactly one of --dicom PATH, --csv PATH or --text PATH" in result.output


@pytest.mark.slow
def test_predict_csv_on_the_coordinator_artifact_needs_the_site_cleaning(
    release: Release, installed: dict[str, Installed], site_workspace: Path
) -> None:
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    key = ("--key", release.public_key)
    result = _invoke("predict", release.artifact(TABULAR), "--csv", table, *key)
    assert result.exit_code != 0
    assert isinstance(result.exception, DataError)
    assert "preprocessing" in str(result.exception)
    # With the cleaning passed explicitly it runs.
    cleaning = installed[TABULAR].directory / PREPROCESSING_FILE
    explicit = _invoke(
        "predict", release.artifact(TABULAR), "--csv", table, "--preprocessing", cleaning, *key
    )
    assert explicit.exit_code == 0, explicit.output
    assert f"{len(pd.read_csv(table))} predicted" in explicit.stderr


@pytest.mark.slow
def test_predict_with_the_wrong_kind_of_input_says_so(
    installed: dict[str, Installed], site_workspace: Path
) -> None:
    folder = site_workspace / "sites" / "hospital-a" / "data"
    result = _invoke(
        "predict",
        installed[TABULAR].directory,
        "--dicom",
        folder,
        "--site",
        installed[TABULAR].config,
    )
    assert isinstance(result.exception, DataError)
    assert "--csv" in str(result.exception)


@pytest.mark.slow
def test_predict_trusts_only_a_pinned_key(release: Release, site_workspace: Path) -> None:
    """The run's own keys/coordinator.pub sits beside the artifact: fine for reviewing a
    run with verify, never a reason to run a model."""
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    result = _invoke("predict", release.artifact(TABULAR), "--csv", table)
    assert isinstance(result.exception, ArtifactError)
    assert result.exception.kind == "no-trusted-key"
    verify = _invoke("verify", release.artifact(TABULAR), "--trust-run-key")
    assert verify.exit_code == 0, verify.output
    assert "proves integrity, not who signed" in _flat(verify.output)
    offered = _invoke("predict", release.artifact(TABULAR), "--csv", table, "--trust-run-key")
    assert offered.exit_code == 2
    assert "No such option '--trust-run-key'" in offered.output


@pytest.mark.slow
def test_key_and_site_together_are_a_usage_error(
    release: Release, installed: dict[str, Installed]
) -> None:
    result = _invoke(
        "verify",
        installed[TABULAR].directory,
        "--key",
        release.public_key,
        "--site",
        installed[TABULAR].config,
    )
    assert result.exit_code == 2
    assert "not several" in result.output


@pytest.mark.slow
def test_predict_refuses_an_unchecked_artifact_unless_allowed(
    installed: dict[str, Installed], site_workspace: Path, tmp_path: Path
) -> None:
    unchecked = build_test_artifact(
        tmp_path, TABULAR, site_workspace / "models" / TABULAR, checked=False
    )
    table = site_workspace / "sites" / "bank-a" / "data" / "loans.csv"
    cleaning = installed[TABULAR].directory / PREPROCESSING_FILE
    args = ("--csv", table, "--preprocessing", cleaning, "--key", unchecked.public_key)
    refused = _invoke("predict", unchecked.directory, *args)
    assert isinstance(refused.exception, ArtifactError)
    assert refused.exception.kind == "unchecked"
    allowed = _invoke("predict", unchecked.directory, *args, "--allow-unchecked")
    assert allowed.exit_code == 0, allowed.output
