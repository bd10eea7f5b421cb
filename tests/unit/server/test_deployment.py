"""server/deployment.py without Flower running: what `flwr supernode register` answers,
staging a federation config into a run directory, the SuperLink's command line and the
Flower CLI's connection config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common import pki
from common.config import FederationConfig, load_federation_config
from common.errors import ConfigError, FedloraError
from server.deployment import (
    CONNECTION,
    Coordinator,
    DeploymentError,
    _registration_outcome,
    stage_federation,
    staged_federations,
)

# The minimal federation file of tests/unit/common/test_config.py.
FEDERATION = """\
task = "tabular-classification"
base_model = "models/ft"
rounds = 7
min_sites = 3

[lora]
r = 8
alpha = 16
target_modules = ["q_proj"]

[dp]
noise_multiplier = 1.1
epsilon_per_run = 2.5
"""

EVERY_SECTION = """\
task = "dicom-classification"
base_model = "../models/vit"
rounds = 4
min_sites = 2
aggregator = "trimmed-mean"
trim_fraction = 0.25
round_timeout = 90.5
optimizer = "adam"
seed = 11

[lora]
r = 4

[dp]
max_grad_norm = 0.5

[validation]
max_update_norm = 3
max_payload_bytes = 100000
min_examples = 30

[rollback]
enabled = false
max_accuracy_drop = 0.1
"""


# ------------------------------------------------------------------- registration ---


@pytest.mark.parametrize(
    ("stdout", "outcome"),
    [
        ('{"success": true, "node-id": 7}', "registered (node 7)"),
        ('{"success": true, "node-id": 7}\n', "registered (node 7)"),
        (
            'Loading project configuration...\nRegistering the key\n{"success": true, '
            '"node-id": 7}',
            "registered (node 7)",
        ),
        (
            '{"success": false, "error-message": "Public key already in use"}',
            "already registered",
        ),
        (
            'note\n{\n  "success": false,\n  "error-message": "The public key is already '
            'in use."\n}\n',
            "already registered",
        ),
    ],
)
def test_registration_outcome(stdout: str, outcome: str) -> None:
    assert _registration_outcome(stdout) == outcome


def test_registration_refused_for_another_reason() -> None:
    stdout = '{"success": false, "error-message": "  Invalid public key format  "}'
    with pytest.raises(DeploymentError, match="refused a node key: Invalid public key format"):
        _registration_outcome(stdout)


def test_registration_without_success_or_message_is_refused() -> None:
    with pytest.raises(DeploymentError, match="refused"):
        _registration_outcome('{"success": false}')


@pytest.mark.parametrize(
    "stdout",
    ["", "Error: connection refused\n", '{"success": true, "node-id": ', "{not json}"],
    ids=["empty", "text", "truncated", "braces"],
)
def test_registration_answer_that_is_not_json(stdout: str) -> None:
    with pytest.raises(DeploymentError, match="flwr supernode register answered"):
        _registration_outcome(stdout)


def test_registration_error_is_a_fedlora_error() -> None:
    assert issubclass(DeploymentError, FedloraError)


# ------------------------------------------------------------------ staging a run ---


def _federation_file(folder: Path, text: str = FEDERATION, name: str = "run.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text", [FEDERATION, EVERY_SECTION], ids=["minimal", "every-section"])
def test_stage_federation_copies_the_config_with_an_absolute_base_model(
    tmp_path: Path, text: str
) -> None:
    source = _federation_file(tmp_path / "configs", text)
    run_dir = tmp_path / "runs" / "one"
    original = load_federation_config(source)

    federation, staged = stage_federation(source, run_dir)

    assert federation == original
    assert staged == run_dir / "federation" / f"{original.task}.toml"
    assert staged.is_file()
    with staged.open("rb") as handle:
        document = tomllib.load(handle)
    base_model = Path(document["base_model"])
    assert base_model.is_absolute()
    assert base_model == original.base_model
    assert load_federation_config(staged) == original


def test_a_staged_config_keeps_its_base_model_when_the_source_moves(tmp_path: Path) -> None:
    """The staged copy is read from the run directory, not from where the source was."""
    source = _federation_file(tmp_path / "configs", FEDERATION)
    expected = (tmp_path / "configs" / "models" / "ft").resolve()
    _, staged = stage_federation(source, tmp_path / "run")
    source.unlink()
    loaded = load_federation_config(staged)
    assert loaded.base_model == expected
    assert isinstance(loaded, FederationConfig)


def test_stage_federation_refuses_a_second_time(tmp_path: Path) -> None:
    source = _federation_file(tmp_path / "configs")
    run_dir = tmp_path / "run"
    _, staged = stage_federation(source, run_dir)
    first = staged.read_text()
    changed = _federation_file(tmp_path / "other", FEDERATION.replace("rounds = 7", "rounds = 2"))

    with pytest.raises(ConfigError, match="already holds a tabular-classification run"):
        stage_federation(changed, run_dir)
    assert staged.read_text() == first


def test_stage_federation_of_an_invalid_config_stages_nothing(tmp_path: Path) -> None:
    source = _federation_file(tmp_path / "configs", FEDERATION.replace("rounds = 7", "rounds = 0"))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError):
        stage_federation(source, run_dir)
    assert not (run_dir / "federation").exists()


def test_staged_federations_lists_the_runs_tasks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stage_federation(_federation_file(tmp_path / "a"), run_dir)
    stage_federation(_federation_file(tmp_path / "b", EVERY_SECTION), run_dir)
    assert staged_federations(run_dir) == {
        "dicom-classification": run_dir / "federation" / "dicom-classification.toml",
        "tabular-classification": run_dir / "federation" / "tabular-classification.toml",
    }


@pytest.mark.parametrize("make_folder", [False, True], ids=["no-folder", "empty-folder"])
def test_staged_federations_of_an_empty_run_dir(tmp_path: Path, make_folder: bool) -> None:
    if make_folder:
        (tmp_path / "federation").mkdir()
    with pytest.raises(ConfigError, match="not a run directory"):
        staged_federations(tmp_path)


# ---------------------------------------------------------------------- SuperLink ---


def _flag(command: list[str], name: str) -> str:
    assert command.count(name) == 1, (name, command)
    return command[command.index(name) + 1]


def test_superlink_command(tmp_path: Path) -> None:
    coordinator = Coordinator(certs=tmp_path / "certs", state_dir=tmp_path / "state")
    secret = tmp_path / "state" / "secrets" / "superexec.secret"
    command = coordinator.superlink_command(9093, secret)

    assert Path(command[0]).name == "flower-superlink"
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert _flag(command, "--ssl-ca-certfile") == str(tmp_path / "certs" / pki.CA_CERT)
    assert _flag(command, "--ssl-certfile") == str(tmp_path / "certs" / pki.SUPERLINK_CERT)
    assert _flag(command, "--ssl-keyfile") == str(tmp_path / "certs" / pki.SUPERLINK_KEY)
    database = Path(_flag(command, "--database"))
    assert database.is_relative_to(tmp_path / "state")
    assert database == coordinator.database
    # Loopback only: the sites reach it through the perimeter (nginx).
    assert _flag(command, "--host") == "127.0.0.1"
    assert _flag(command, "--port") == "9093"
    # Process isolation with the SuperExec secret: the Runtime API serves only the
    # SuperExec fedlora starts (Flower ignores the secret in subprocess isolation).
    assert _flag(command, "--isolation") == "process"
    assert _flag(command, "--superexec-auth-secret-file") == str(secret)
    assert all(isinstance(part, str) for part in command)


def test_the_superexec_gets_the_ca_certificate_and_the_secret_only(tmp_path: Path) -> None:
    coordinator = Coordinator(certs=tmp_path / "certs", state_dir=tmp_path / "state")
    secret = tmp_path / "state" / "secrets" / "superexec.secret"
    command = coordinator.superexec_command(9093, secret)

    assert Path(command[0]).name == "fedlora-server-superexec"  # ServerApp tasks only
    assert _flag(command, "--runtime-api-address") == "127.0.0.1:9093"
    assert _flag(command, "--root-certificates") == str(tmp_path / "certs" / pki.CA_CERT)
    assert _flag(command, "--superexec-auth-secret-file") == str(secret)
    assert "--insecure" not in command
    assert "--allow-runtime-dependency-installation" not in command
    # No private key of the PKI is handed to what runs the ServerApp.
    assert not any(part.endswith(".key") for part in command)


def test_write_cli_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    coordinator = Coordinator(certs=Path("certs"), state_dir=Path("state"))

    path = coordinator.write_cli_config("127.0.0.1:9093")

    assert path.is_file()
    assert path.resolve().is_relative_to((tmp_path / "state").resolve())
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    connection = document["superlink"][CONNECTION]
    assert connection["address"] == "127.0.0.1:9093"
    root = Path(connection["root-certificates"])
    assert root.is_absolute()
    assert root == (tmp_path / "certs" / pki.CA_CERT).resolve()
    assert "insecure" not in connection
    assert document["superlink"]["default"] == CONNECTION
    # The CLI is pointed at that config.
    assert Path(coordinator.cli_environment()["FLWR_HOME"]) == path.parent.resolve()


def test_check_pki_names_what_is_missing(tmp_path: Path) -> None:
    coordinator = Coordinator(certs=tmp_path / "certs", state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match="fedlora pki init"):
        coordinator.check_pki()
    pki.init_pki(tmp_path / "certs", ["127.0.0.1"])
    coordinator.check_pki()


def test_registration_outcome_skips_braces_in_text_before_the_reply() -> None:
    stdout = 'Loading {profile} from config\n{\n  "success": true,\n  "node-id": 9\n}\n'
    assert _registration_outcome(stdout) == "registered (node 9)"


def test_coordinator_release_writes_a_signed_record_of_the_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from common.release import fab_sha256, load_release
    from common.signing import load_public_key
    from server import cli

    monkeypatch.setattr(cli, "build_fab", lambda app: b"the bundle flwr run would submit")
    pki.init_pki(tmp_path / "certs", ["127.0.0.1"])
    out = tmp_path / "release"
    done = CliRunner().invoke(
        cli.coordinator, ["release", "--certs", str(tmp_path / "certs"), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    release = load_release(
        out / "release.json", load_public_key(tmp_path / "certs" / "coordinator.pub")
    )
    assert release.fab_sha256 == fab_sha256(b"the bundle flwr run would submit")
    assert release.fab_sha256 in done.output
    (bundle,) = out.glob("*.fab")
    assert bundle.read_bytes() == b"the bundle flwr run would submit"
    assert "fedlora site release SITE.toml --release" in done.output
