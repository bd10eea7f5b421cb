"""The artifact through the ClientApp: the coordinator's check and install messages, the
scores and accountant a site sends back, and refusals that explain without local paths."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import cast

import pytest
import tomli_w
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import build_client_app
from client.predict import PREPROCESSING_FILE
from client.site import Site, load_site
from common.artifact import (
    MODEL_INT8,
    artifact_payload,
    file_entries,
    sign_manifest,
    verify_artifact,
)
from common.protocol import (
    ARTIFACT_CHECK,
    ARTIFACT_INSTALL,
    ARTIFACT_RECORD,
    ARTIFACT_REFUSED,
    SITE_ID_KEY,
    SITE_MISCONFIGURED,
)
from common.replies import ARTIFACT_CHECK_METRICS
from simulations.scenario import Scenario
from tests.artifacts import BuiltArtifact, build_test_artifact
from tests.conftest import write_site_config
from tests.unit.client.rounds import node_context

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_task_identity")]

TABULAR = "tabular-classification"
SITE_ID = "bank-a"  # tabular: the quickest site to load
RUN = "1"  # the run id of the test messages (tests/unit/client/rounds.py)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, site_workspace: Path) -> BuiltArtifact:
    return build_test_artifact(
        tmp_path_factory.mktemp("artifact"), TABULAR, site_workspace / "models" / TABULAR, run=RUN
    )


@pytest.fixture(scope="module")
def unchecked(
    tmp_path_factory: pytest.TempPathFactory, site_workspace: Path, artifact: BuiltArtifact
) -> BuiltArtifact:
    return build_test_artifact(
        tmp_path_factory.mktemp("unchecked"),
        TABULAR,
        site_workspace / "models" / TABULAR,
        checked=False,
        key=artifact.key,
        run=RUN,
    )


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, site_workspace: Path) -> BuiltArtifact:
    return build_test_artifact(
        tmp_path_factory.mktemp("foreign"), TABULAR, site_workspace / "models" / TABULAR, run=RUN
    )


def _config(
    scenario: Scenario,
    workspace: Path,
    tmp_path: Path,
    key: Path | None,
    **privacy: float | str,
) -> Path:
    path = write_site_config(scenario, workspace, SITE_ID, tmp_path)
    document = tomllib.loads(path.read_text())
    if key is not None:
        document["site"]["coordinator_key"] = str(key)
    document["privacy"].update(privacy)
    path.write_text(tomli_w.dumps(document))
    return path


def _send(config_path: Path, message_type: str, payload: dict[str, bytes] | None) -> Message:
    """What the coordinator sends (server/distribution.py), through a resolver that
    names this site's config, as a simulation wires it."""
    content = RecordDict()
    if payload is not None:
        content[ARTIFACT_RECORD] = ConfigRecord(dict(payload))
    message = Message(content, dst_node_id=1, message_type=message_type)
    app = build_client_app(resolve_site=lambda _context: config_path)
    return app(message, node_context(config_path))


def _flip_model_byte(payload: dict[str, bytes]) -> dict[str, bytes]:
    model = bytearray(payload[MODEL_INT8])
    model[len(model) // 2] ^= 0x01
    return {**payload, MODEL_INT8: bytes(model)}


def _refusals(site: Site) -> list[dict[str, object]]:
    return [e for e in site.audit.events() if e["event"] == "artifact-refused"]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_check_replies_with_both_scores_and_the_site_accountant(
    accountant: str,
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    artifact: BuiltArtifact,
) -> None:
    config_path = _config(
        small_scenario, site_workspace, tmp_path, artifact.public_key, accountant=accountant
    )
    reply = _send(config_path, ARTIFACT_CHECK, artifact_payload(artifact.directory))
    assert not reply.has_error(), reply.error

    site = load_site(config_path)
    metrics = cast(dict[str, float], dict(reply.content.metric_records["metrics"]))
    assert set(ARTIFACT_CHECK_METRICS) <= set(metrics)
    assert set(metrics) <= {*ARTIFACT_CHECK_METRICS, "fp32-auc", "int8-auc"}
    assert metrics["num-examples"] == len(site.load_data().holdout.labels)
    for model in ("fp32", "int8"):
        assert 0.0 <= metrics[f"{model}-accuracy"] <= 1.0
    assert metrics["int8-accuracy"] == pytest.approx(metrics["fp32-accuracy"], abs=0.1)
    assert dict(reply.content.config_records["site"]) == {
        SITE_ID_KEY: SITE_ID,
        "accountant": accountant,
    }
    assert list(reply.content.array_records) == []  # scores only: no model leaves

    (checked,) = [e for e in site.audit.events() if e["event"] == "artifact-checked"]
    assert checked["run"] == str(reply.metadata.run_id)
    for model in ("fp32", "int8"):
        scores = checked[model]
        assert isinstance(scores, dict)
        assert metrics[f"{model}-accuracy"] == pytest.approx(scores["accuracy"])
        assert metrics[f"{model}-loss"] == pytest.approx(scores["loss"])
    assert not (site.config.site.installed_artifacts / TABULAR).exists()


# (case, whether the site pins the key, payload maker, expected check, words of the reason)
REFUSED = [
    ("tampered-model", True, "tampered", "hash-mismatch", ("model.int8.onnx", "altered")),
    ("other-key", True, "foreign", "bad-signature", ("not a valid signature",)),
    ("no-pinned-key", False, "good", "no-trusted-key", ("coordinator_key",)),
    ("extra-entry", True, "extra", "bad-payload", ("unexpected entries",)),
]


@pytest.mark.parametrize(
    ("pinned", "payload", "kind", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
@pytest.mark.parametrize("message_type", [ARTIFACT_CHECK, ARTIFACT_INSTALL])
def test_a_refused_artifact_is_an_artifact_refused_error_without_local_paths(
    message_type: str,
    pinned: bool,
    payload: str,
    kind: str,
    words: tuple[str, ...],
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    artifact: BuiltArtifact,
    foreign: BuiltArtifact,
) -> None:
    good = artifact_payload(artifact.directory)
    payloads = {
        "good": good,
        "tampered": _flip_model_byte(good),
        "foreign": artifact_payload(foreign.directory),
        "extra": {**good, "../x": b"x"},
    }
    key = artifact.public_key if pinned else None
    config_path = _config(small_scenario, site_workspace, tmp_path, key)
    reply = _send(config_path, message_type, payloads[payload])

    assert reply.has_error()
    assert reply.error.code == ARTIFACT_REFUSED
    reason = reply.error.reason or ""
    for word in words:
        assert word in reason
    for local in (str(tmp_path), str(site_workspace)):
        assert local not in reason
    site = load_site(config_path)
    (refusal,) = _refusals(site)
    assert refusal["check"] == kind
    assert reason == f"{kind}: {refusal['reason']}"  # the reply names the failed check
    assert refusal["stage"] == ("check" if message_type == ARTIFACT_CHECK else "install")
    assert not (site.config.site.installed_artifacts / TABULAR).exists()


def test_a_message_without_the_artifact_record_is_refused(
    small_scenario: Scenario, site_workspace: Path, tmp_path: Path, artifact: BuiltArtifact
) -> None:
    config_path = _config(small_scenario, site_workspace, tmp_path, artifact.public_key)
    for message_type in (ARTIFACT_CHECK, ARTIFACT_INSTALL):
        reply = _send(config_path, message_type, None)
        assert reply.has_error()
        assert reply.error.code == ARTIFACT_REFUSED
        assert "carries no artifact" in (reply.error.reason or "")
    not_files = _send_with_record(config_path, ConfigRecord({"model.int8.onnx": "text"}))
    assert not_files.has_error()
    assert not_files.error.code == ARTIFACT_REFUSED
    assert "not files" in (not_files.error.reason or "")


def _send_with_record(config_path: Path, record: ConfigRecord) -> Message:
    message = Message(
        RecordDict({ARTIFACT_RECORD: record}), dst_node_id=1, message_type=ARTIFACT_CHECK
    )
    app = build_client_app(resolve_site=lambda _context: config_path)
    return app(message, node_context(config_path))


def test_the_install_message_installs_the_checked_artifact(
    small_scenario: Scenario, site_workspace: Path, tmp_path: Path, artifact: BuiltArtifact
) -> None:
    config_path = _config(small_scenario, site_workspace, tmp_path, artifact.public_key)
    reply = _send(config_path, ARTIFACT_INSTALL, artifact_payload(artifact.directory))
    assert not reply.has_error(), reply.error
    assert dict(reply.content.metric_records["metrics"]) == {"installed": 1}
    assert dict(reply.content.config_records["site"]) == {SITE_ID_KEY: SITE_ID}

    site = load_site(config_path)
    target = site.config.site.installed_artifacts / TABULAR
    assert verify_artifact(target, artifact.key.public_key()).manifest == artifact.manifest
    assert (target / PREPROCESSING_FILE).is_file()
    (installed,) = [e for e in site.audit.events() if e["event"] == "artifact-installed"]
    assert installed["run"] == str(reply.metadata.run_id)


def test_the_install_message_refuses_an_unchecked_artifact(
    small_scenario: Scenario,
    site_workspace: Path,
    tmp_path: Path,
    unchecked: BuiltArtifact,
) -> None:
    config_path = _config(small_scenario, site_workspace, tmp_path, unchecked.public_key)
    payload = artifact_payload(unchecked.directory)
    assert not _send(config_path, ARTIFACT_CHECK, payload).has_error()  # checking is fine
    reply = _send(config_path, ARTIFACT_INSTALL, payload)
    assert reply.has_error()
    assert reply.error.code == ARTIFACT_REFUSED
    assert "no federated check results" in (reply.error.reason or "")
    site = load_site(config_path)
    assert [e["check"] for e in _refusals(site)] == ["unchecked"]
    assert not (site.config.site.installed_artifacts / TABULAR).exists()


def test_a_pinned_key_that_cannot_be_read_is_a_misconfigured_site(
    small_scenario: Scenario, site_workspace: Path, tmp_path: Path, artifact: BuiltArtifact
) -> None:
    config_path = _config(small_scenario, site_workspace, tmp_path, tmp_path / "missing.pub")
    reply = _send(config_path, ARTIFACT_CHECK, artifact_payload(artifact.directory))
    assert reply.has_error()
    assert reply.error.code == SITE_MISCONFIGURED
    assert str(tmp_path) not in (reply.error.reason or "")


def test_a_signed_model_that_cannot_be_loaded_is_refused_without_local_paths(
    small_scenario: Scenario, site_workspace: Path, tmp_path: Path, artifact: BuiltArtifact
) -> None:
    directory = tmp_path / "unloadable"
    shutil.copytree(artifact.directory, directory)
    (directory / MODEL_INT8).write_bytes(b"not an onnx model")
    manifest = artifact.manifest.model_copy(update={"files": file_entries(directory)})
    sign_manifest(directory, manifest, artifact.key)
    config_path = _config(small_scenario, site_workspace, tmp_path, artifact.public_key)
    reply = _send(config_path, ARTIFACT_CHECK, artifact_payload(directory))
    assert reply.has_error()
    assert reply.error.code == ARTIFACT_REFUSED
    assert str(tmp_path) not in (reply.error.reason or "")
