"""Which key ``fedlora artifact verify|inspect`` trusts: only one the caller names.

The run's own ``keys/coordinator.pub`` lies beside ``RUN_DIR/artifacts/<task>``, so an
attacker who alters and re-signs the artifact can replace it too; it is used only on
an explicit ``--trust-run-key``. The artifact here is synthetic (placeholder file
bytes, a hand-made manifest, a real Ed25519 signature): key selection and signature
checks need no real model, and these tests stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.artifact import (
    ARTIFACT_FILES,
    MODEL_INT8,
    InputSpec,
    Manifest,
    Quantization,
    SitePrivacy,
    file_entries,
    sign_manifest,
)
from common.audit.review import COORDINATOR_PUBLIC_KEY
from common.cli import cli, main
from common.signing import fingerprint, write_public_key

TASK = "tabular-classification"
WIDE = {"COLUMNS": "250"}


def _invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["artifact", *map(str, args)], env=WIDE)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _main(monkeypatch: pytest.MonkeyPatch, *args: str | Path) -> int | str | None:
    """``fedlora artifact ARGS`` through the console script's entry point, for the exit
    code an operator sees (FedloraError → 2)."""
    monkeypatch.setattr(sys, "argv", ["fedlora", "artifact", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


def _sign(directory: Path, key: Ed25519PrivateKey) -> Manifest:
    """A manifest for the files now in ``directory``, signed by ``key``."""
    manifest = Manifest(
        task=TASK,
        run="77",
        created="2025-01-01T00:00:00+00:00",
        code_version="test",
        base_model_sha256="0" * 64,
        num_labels=2,
        inputs={"features": InputSpec(dtype="float32", shape=["batch", 4])},
        outputs=["logits"],
        lora={"r": 4},
        training={"aggregator": "fedavg", "rounds_completed": 2},
        sites=[SitePrivacy(site="site-a", epsilon=3.5, delta=1e-5, rounds_trained=2)],
        quantization=Quantization(
            op_types=["MatMul"],
            kept_fp32=[],
            opset=17,
            fp32_onnx_bytes=64,
            fp32_onnx_sha256="1" * 64,
        ),
        files=file_entries(directory),
        signer=fingerprint(key.public_key()),
    )
    sign_manifest(directory, manifest, key)
    return manifest


class Run:
    """A run directory as the coordinator lays it out, with one artifact, and the
    genuine coordinator key pinned out of band (outside the run directory)."""

    def __init__(self, root: Path) -> None:
        self.run_dir = root / "run"
        self.artifact = self.run_dir / "artifacts" / TASK
        for name in ARTIFACT_FILES:
            (self.artifact / name).parent.mkdir(parents=True, exist_ok=True)
            (self.artifact / name).write_bytes(f"genuine {name}\n".encode())
        self.key = Ed25519PrivateKey.generate()
        self.manifest = _sign(self.artifact, self.key)
        self.run_key = self.run_dir / COORDINATOR_PUBLIC_KEY
        self.run_key.parent.mkdir(parents=True)
        write_public_key(self.run_key, self.key.public_key())
        self.pinned = root / "pinned" / "coordinator.pub"
        self.pinned.parent.mkdir()
        write_public_key(self.pinned, self.key.public_key())

    def forge(self) -> Ed25519PrivateKey:
        """What an attacker with write access to the run directory does: alter the
        model, re-sign the manifest with a key of their own, replace the run's key."""
        (self.artifact / MODEL_INT8).write_bytes(b"a model of the attacker's\n")
        attacker = Ed25519PrivateKey.generate()
        _sign(self.artifact, attacker)
        write_public_key(self.run_key, attacker.public_key())
        return attacker


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


# ------------------------------------------------------------- forged artifact ---


def test_a_forged_artifact_with_a_replaced_run_key_is_refused_without_trust_run_key(
    run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    attacker = run.forge()
    assert _main(monkeypatch, "verify", run.artifact) == 2
    err = _flat(capsys.readouterr().err)
    assert "no trusted coordinator key" in err
    assert "--key COORDINATOR.pub" in err
    assert "--site SITE_CONFIG" in err
    assert "--trust-run-key" in err
    # The pinned key catches the forgery.
    pinned = _invoke("verify", run.artifact, "--key", run.pinned)
    assert pinned.exit_code == 1
    assert "NOT VERIFIED (bad-signature)" in _flat(pinned.output)
    # Only an explicit opt-in uses the replaced key, and the output says what that is worth.
    opted_in = _invoke("verify", run.artifact, "--trust-run-key", "--json")
    assert opted_in.exit_code == 0, opted_in.output
    document = json.loads(opted_in.stdout)
    assert document["signer"] == fingerprint(attacker.public_key())
    assert "proves integrity, not who signed" in document["key_source"]


def test_inspect_of_a_forged_artifact_without_a_key_is_marked_not_verified(
    run: Run,
) -> None:
    run.forge()
    result = _invoke("inspect", run.artifact)
    assert result.exit_code == 1
    text = _flat(result.output)
    assert f"artifact — {TASK}" in text  # the manifest is still shown
    assert "NOT VERIFIED (no-trusted-key)" in text and "--trust-run-key" in text
    document = json.loads(_invoke("inspect", run.artifact, "--json").stdout)
    assert document["verified"] is False
    assert document["check"] == "no-trusted-key"
    assert _invoke("inspect", run.artifact, "--key", run.pinned).exit_code == 1


# ------------------------------------------------------------- genuine artifact ---


def test_verify_without_a_key_option_ignores_even_the_genuine_run_key(
    run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.run_key.is_file()
    assert _main(monkeypatch, "verify", run.artifact) == 2
    output = capsys.readouterr()
    assert "verified" not in output.out
    assert "no trusted coordinator key" in output.err


@pytest.mark.parametrize(
    ("options", "source"),
    [
        (["--trust-run-key"], "the run's keys/coordinator.pub"),
        (["--key", "PINNED"], "--key"),
    ],
    ids=["trust-run-key", "key"],
)
def test_verify_and_inspect_with_a_named_key_verify_the_genuine_artifact(
    run: Run, options: list[str], source: str
) -> None:
    args = [run.pinned if option == "PINNED" else option for option in options]
    verified = _invoke("verify", run.artifact, *args)
    assert verified.exit_code == 0, verified.output
    assert source in _flat(verified.output)
    assert fingerprint(run.key.public_key()) in _flat(verified.output)
    inspected = json.loads(_invoke("inspect", run.artifact, *args, "--json").stdout)
    assert inspected["verified"] is True
    assert source in inspected["key_source"]
    assert Manifest.model_validate(inspected["manifest"]) == run.manifest


def test_trust_run_key_without_a_run_key_beside_the_artifact_exits_2(
    run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run.run_key.unlink()
    assert _main(monkeypatch, "verify", run.artifact, "--trust-run-key") == 2
    assert "--trust-run-key: no keys/coordinator.pub" in _flat(capsys.readouterr().err)


@pytest.mark.parametrize(
    "options",
    [["--key", "PINNED", "--trust-run-key"], ["--site", "PINNED", "--trust-run-key"]],
    ids=["key", "site"],
)
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_trust_run_key_with_another_key_option_is_a_usage_error(
    run: Run, command: str, options: list[str]
) -> None:
    args = [run.pinned if option == "PINNED" else option for option in options]
    result = _invoke(command, run.artifact, *args)
    assert result.exit_code == 2
    assert "give one of --key, --site or --trust-run-key, not several" in _flat(result.output)


# ---------------------------------------------------------------------- help ---


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_help_offers_trust_run_key_as_integrity_only(command: str) -> None:
    result = _invoke(command, "--help")
    assert result.exit_code == 0
    text = _flat(result.output)
    assert "--trust-run-key" in text
    assert "integrity only, not who signed" in text
    assert "fall back" not in text


def test_predict_never_offers_the_run_key() -> None:
    result = _invoke("predict", "--help")
    assert result.exit_code == 0
    assert "--trust-run-key" not in result.output
