"""client/daemon.py: the flower-supernode command line, when the daemon starts the
SuperNode again and when it stops because the federation refused the site, and the TLS
check against the federation's CA. The SuperNode is played by small Python scripts and
the SuperLink by a TLS socket on loopback; no Flower process runs."""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from client.daemon import (
    HELD_RETRY_SECONDS,
    RESTART_DELAYS,
    NodeRefusedError,
    SupernodeSettings,
    check_connection,
    run_supernode,
)
from common import pki
from common.config import SiteConnection
from common.errors import ConfigError, FedloraError

# ------------------------------------------------------------------ helpers ---


def _settings(tmp_path: Path, superlink: str = "superlink.example.org:9092") -> SupernodeSettings:
    return SupernodeSettings(
        config_path=tmp_path / "sites" / "bank-a.toml",
        connection=SiteConnection(
            superlink=superlink,
            ca_certificate=tmp_path / "bundle" / "ca.pem",
            node_key=tmp_path / "keys" / "node.key",
        ),
        local_port=9094,
        log_file=tmp_path / "state" / "supernode.log",
        superexec_secret=tmp_path / "state" / "superexec.secret",
    )


def _script(lines: Sequence[str], code: int) -> list[str]:
    """A stand-in flower-supernode: prints ``lines`` and exits with ``code``."""
    source = (
        f"import sys\nfor line in {list(lines)!r}:\n    print(line, flush=True)\nsys.exit({code})"
    )
    return [sys.executable, "-S", "-c", source]


class Runs:
    """SupernodeSettings.command for successive starts: one (lines, exit code) each."""

    def __init__(self, *runs: tuple[Sequence[str], int]) -> None:
        self.runs = list(runs)
        self.started = 0

    def command(self, _settings: SupernodeSettings) -> list[str]:
        assert self.started < len(self.runs), "the daemon started the SuperNode too often"
        lines, code = self.runs[self.started]
        self.started += 1
        return _script(lines, code)


class Sleeps:
    def __init__(self, limit: int = 10) -> None:
        self.delays: list[float] = []
        self.limit = limit

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        assert len(self.delays) <= self.limit, "the daemon kept restarting"


def _run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *runs: tuple[Sequence[str], int]
) -> tuple[Runs, Sleeps, list[str], int | BaseException]:
    """run_supernode over ``runs``: the starts, the delays, the lines seen, and the exit
    code or the exception it raised."""
    fake = Runs(*runs)
    monkeypatch.setattr(SupernodeSettings, "command", lambda settings: fake.command(settings))
    # The SuperExec beside it waits; it is stopped with the SuperNode.
    monkeypatch.setattr(
        SupernodeSettings,
        "superexec_command",
        lambda _: [sys.executable, "-S", "-c", "import time; time.sleep(60)"],
    )
    sleeps = Sleeps()
    lines: list[str] = []
    outcome: int | BaseException
    try:
        outcome = run_supernode(_settings(tmp_path), lines.append, sleep=sleeps)
    except FedloraError as exc:
        outcome = exc
    return fake, sleeps, lines, outcome


# ------------------------------------------------------------- run_supernode ---


def test_a_clean_exit_returns_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, sleeps, lines, outcome = _run(
        tmp_path, monkeypatch, (["INFO : Starting", "SuperNode ID: 5", "INFO : Stopped"], 0)
    )
    assert outcome == 0
    assert runs.started == 1
    assert sleeps.delays == []
    assert lines == ["INFO : Starting", "SuperNode ID: 5", "INFO : Stopped"]
    log = _settings(tmp_path).log_file.read_text()
    assert log.splitlines() == lines


def test_a_certificate_the_ca_does_not_vouch_for_is_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = (
        "E0101 ssl_transport_security.cc: Handshake failed with error "
        "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED"
    )
    runs, sleeps, _, outcome = _run(tmp_path, monkeypatch, (["connecting", line], 1))
    assert isinstance(outcome, NodeRefusedError)
    assert "ca_certificate" in str(outcome)
    assert str(_settings(tmp_path).log_file) in str(outcome)
    assert runs.started == 1
    assert sleeps.delays == []


def test_an_unregistered_node_key_on_the_first_start_is_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, sleeps, _, outcome = _run(
        tmp_path,
        monkeypatch,
        (["ERROR : Failed to activate SuperNode: PERMISSION_DENIED"], 1),
    )
    assert isinstance(outcome, NodeRefusedError)
    assert "node key" in str(outcome)
    assert runs.started == 1
    assert sleeps.delays == []


def test_a_held_connection_after_an_accepted_start_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted once, then the SuperNode died: the SuperLink still counts the old
    connection as live and refuses the key for a while. That is no refusal."""
    runs, sleeps, lines, outcome = _run(
        tmp_path,
        monkeypatch,
        (["INFO : SuperNode ID: 5", "crashed"], 1),
        (["ERROR : Failed to activate SuperNode: node already connected"], 1),
        (["INFO : SuperNode ID: 5", "stopped"], 0),
    )
    assert outcome == 0
    assert runs.started == 3
    assert sleeps.delays == [RESTART_DELAYS[0], HELD_RETRY_SECONDS]
    assert lines[-1] == "stopped"


def test_plain_failures_restart_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = len(RESTART_DELAYS) + 2
    runs, sleeps, _, outcome = _run(
        tmp_path,
        monkeypatch,
        *[([f"SuperLink unreachable ({n})"], 1) for n in range(failures)],
        (["stopped"], 0),
    )
    assert outcome == 0
    assert runs.started == failures + 1
    assert sleeps.delays == [*RESTART_DELAYS, RESTART_DELAYS[-1], RESTART_DELAYS[-1]]
    assert list(RESTART_DELAYS) == sorted(RESTART_DELAYS)


def test_every_start_appends_to_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, outcome = _run(tmp_path, monkeypatch, (["first"], 3), (["second"], 0))
    assert outcome == 0
    assert _settings(tmp_path).log_file.read_text().splitlines() == ["first", "second"]


# ------------------------------------------------------------------ command ---


def _flag(command: list[str], name: str) -> str:
    assert command.count(name) == 1, (name, command)
    return command[command.index(name) + 1]


def test_supernode_command(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    command = settings.command()

    assert Path(command[0]).name == "flower-supernode"
    assert _flag(command, "--root-certificates") == str(tmp_path / "bundle" / "ca.pem")
    assert _flag(command, "--auth-supernode-private-key") == str(tmp_path / "keys" / "node.key")
    assert _flag(command, "--superlink") == "superlink.example.org:9092"
    assert _flag(command, "--port") == "9094"
    assert _flag(command, "--node-config") == f'site-config="{tmp_path / "sites" / "bank-a.toml"}"'
    assert "--insecure" not in command
    assert "--allow-runtime-dependency-installation" not in command
    assert all(isinstance(part, str) for part in command)
    # Process isolation: the SuperNode starts no app itself; its Runtime API, on
    # loopback, serves only the SuperExec holding the site's secret.
    assert _flag(command, "--isolation") == "process"
    assert _flag(command, "--host") == "127.0.0.1"
    secret = str(tmp_path / "state" / "superexec.secret")
    assert _flag(command, "--superexec-auth-secret-file") == secret
    superexec = settings.superexec_command()
    assert Path(superexec[0]).name == "fedlora-superexec"  # the pinned-code launcher
    assert _flag(superexec, "--runtime-api-address") == "127.0.0.1:9094"
    assert _flag(superexec, "--superexec-auth-secret-file") == secret
    assert "--allow-runtime-dependency-installation" not in superexec


def test_supernode_environment_keeps_flower_files_in_the_sites_state(tmp_path: Path) -> None:
    environment = _settings(tmp_path).environment()
    assert Path(environment["FLWR_HOME"]).is_relative_to(tmp_path / "state")
    assert environment["PATH"].split(":")[0] == str(Path(sys.executable).parent)


# --------------------------------------------------------- check_connection ---


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "certs"
    pki.init_pki(folder, ["127.0.0.1", "localhost"])
    return folder


@pytest.fixture(scope="module")
def node_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("node")
    pki.write_node_key_pair(folder / pki.NODE_KEY, folder / pki.NODE_PUB)
    return folder / pki.NODE_KEY


@contextmanager
def tls_server(certs: Path) -> Iterator[tuple[int, list[str]]]:
    """A SuperLink stand-in on 127.0.0.1 presenting certs' superlink.pem for one
    connection; yields its port and what happened to the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / pki.SUPERLINK_CERT, certs / pki.SUPERLINK_KEY)
    listener = socket.create_server(("", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    outcomes: list[str] = []

    def serve() -> None:
        try:
            raw, _ = listener.accept()
        except OSError as exc:
            outcomes.append(f"accept: {exc}")
            return
        with raw:
            raw.settimeout(10)
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    outcomes.append("handshake")
                    tls.recv(1)  # until the client closes
            except (ssl.SSLError, OSError) as exc:
                outcomes.append(f"failed: {type(exc).__name__}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, outcomes
    finally:
        listener.close()
        thread.join(timeout=10)


def _connection(port: int, ca: Path, node_key: Path, host: str = "127.0.0.1") -> SiteConnection:
    return SiteConnection(superlink=f"{host}:{port}", ca_certificate=ca, node_key=node_key)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_check_connection_to_the_superlink_the_ca_vouches_for(certs: Path, node_key: Path) -> None:
    with tls_server(certs) as (port, outcomes):
        assert check_connection(_connection(port, certs / pki.CA_CERT, node_key), 5.0) is True
    assert outcomes and outcomes[0] == "handshake"


def test_check_connection_by_host_name(certs: Path, node_key: Path) -> None:
    with tls_server(certs) as (port, _):
        connection = _connection(port, certs / pki.CA_CERT, node_key, host="localhost")
        assert check_connection(connection, 5.0) is True


def test_check_connection_under_another_ca_is_a_refusal(
    tmp_path: Path, certs: Path, node_key: Path
) -> None:
    other = tmp_path / "other-certs"
    pki.init_pki(other, ["127.0.0.1"])
    with tls_server(certs) as (port, _), pytest.raises(NodeRefusedError) as info:
        check_connection(_connection(port, other / pki.CA_CERT, node_key), 5.0)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "ca_certificate" in str(info.value)


def test_check_connection_to_a_name_the_certificate_lacks_is_a_refusal(
    tmp_path: Path, node_key: Path
) -> None:
    # The certificate always names the loopback addresses; 127.0.0.2 is loopback too.
    certs = tmp_path / "certs"
    pki.init_pki(certs, ["fl.example.org"])
    assert "127.0.0.2" not in pki.certificate_sans(certs / pki.SUPERLINK_CERT)
    with tls_server(certs) as (port, _), pytest.raises(NodeRefusedError):
        check_connection(_connection(port, certs / pki.CA_CERT, node_key, "127.0.0.2"), 5.0)


def test_check_connection_with_nothing_listening(certs: Path, node_key: Path) -> None:
    port = _free_port()
    assert check_connection(_connection(port, certs / pki.CA_CERT, node_key), 2.0) is False


def test_check_connection_with_a_bad_node_key(tmp_path: Path, certs: Path) -> None:
    bad = tmp_path / "node.key"
    bad.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="node key"):
        check_connection(_connection(_free_port(), certs / pki.CA_CERT, bad), 2.0)


def test_check_connection_with_a_missing_node_key(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        check_connection(_connection(_free_port(), certs / pki.CA_CERT, tmp_path / "none"), 2.0)


def test_check_connection_with_a_missing_ca(tmp_path: Path, node_key: Path) -> None:
    with pytest.raises(ConfigError, match="ca_certificate"):
        check_connection(_connection(_free_port(), tmp_path / "ca.pem", node_key), 2.0)
