"""A site whose audit trail or ledger cannot be used: it says so without paths, never
makes up a key it was told to use, and audits a round withheld at the last moment."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from flwr.app import Message, MessageType, RecordDict

from client.app import build_client_app
from client.ledger import (
    INDEX_FILE,
    LEDGER_DIR,
    LedgerError,
    PrivacyLedger,
    read_index,
    read_ledger,
)
from client.site import Site
from common.audit.log import verify_log
from common.config import load_site_config
from common.errors import PolicyError
from common.protocol import SITE_MISCONFIGURED
from common.signing import load_public_key
from tests.conftest import write_site_config
from tests.unit.client.rounds import initial_adapter, node_context, round_request, site_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SITE_ID = "bank-a"  # tabular: the quickest site to train


def _assert_pathless_audit_error(reply: Message, tmp_path: Path) -> None:
    assert reply.has_error()
    assert reply.error.code == SITE_MISCONFIGURED
    reason = reply.error.reason or ""
    assert "audit trail is unusable" in reason
    assert "/" not in reason
    assert str(tmp_path) not in reason


# ------------------------------------------------------- the site's audit key ---


def test_a_group_readable_audit_key_is_an_audit_error_without_a_path(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, untrained_workspace, SITE_ID, tmp_path)
    site = Site(load_site_config(config_path))
    site.audit.key_fingerprint  # noqa: B018 (creates the default key, mode 0600)
    key_path = site.config.site.audit_key_path
    assert key_path.exists() and (key_path.stat().st_mode & 0o777) == 0o600
    key_path.chmod(0o644)
    key_bytes = key_path.read_bytes()

    reply = build_client_app()(
        site_message(site, round_request(site), MessageType.TRAIN), node_context(config_path)
    )

    _assert_pathless_audit_error(reply, tmp_path)
    # The key is left as it is for the operator to fix, not replaced or re-permissioned.
    assert key_path.read_bytes() == key_bytes
    assert (key_path.stat().st_mode & 0o777) == 0o644
    assert not site.audit.path.exists()  # nothing was signed with it


def _config_with_signing_key(scenario, workspace, directory: Path, key: Path) -> Path:
    path = write_site_config(scenario, workspace, SITE_ID, directory)
    document = tomllib.loads(path.read_text())
    document["site"]["signing_key"] = str(key)
    path.write_text(tomli_w.dumps(document))
    return path


def test_a_configured_signing_key_that_does_not_exist_is_not_created(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    key = tmp_path / "keys" / "site-signing.pem"
    config_path = _config_with_signing_key(small_scenario, untrained_workspace, tmp_path, key)
    site = Site(load_site_config(config_path))
    assert site.config.site.signing_key == key.resolve()
    app, context = build_client_app(), node_context(config_path)

    reply = app(site_message(site, round_request(site), MessageType.TRAIN), context)

    _assert_pathless_audit_error(reply, tmp_path)
    assert not key.exists()
    assert not key.parent.exists()
    assert not site.config.site.state_dir.joinpath("audit-key.pem").exists()
    # Joining a run needs the key too: refused the same way, still nothing created.
    introduction = app(
        Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context
    )
    _assert_pathless_audit_error(introduction, tmp_path)
    assert not key.exists()


def test_a_configured_signing_key_that_exists_signs_the_log(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.signing import fingerprint, write_private_key

    key = tmp_path / "keys" / "site-signing.pem"
    private = Ed25519PrivateKey.generate()
    write_private_key(key, private)
    config_path = _config_with_signing_key(small_scenario, untrained_workspace, tmp_path, key)
    site = Site(load_site_config(config_path))

    site.joined("run-1")

    assert site.audit.key_fingerprint == fingerprint(private.public_key())
    assert not site.config.site.state_dir.joinpath("audit-key.pem").exists()
    verification = verify_log(site.audit.path, load_public_key(key))
    assert verification.ok, verification.findings


# ------------------------------------------------------------ ledger messages ---


def test_an_unreadable_ledger_is_a_ledger_error_without_a_path(tmp_path: Path) -> None:
    folder = tmp_path / "state" / LEDGER_DIR
    ledger = folder / f"{'a' * 64}.json"
    ledger.mkdir(parents=True)  # read_text fails with IsADirectoryError, an OSError

    with pytest.raises(LedgerError) as raised:
        read_ledger(ledger)

    message = str(raised.value)
    assert "is unreadable" in message and ledger.name in message
    assert "/" not in message
    assert str(tmp_path) not in message


def test_an_unreadable_ledger_index_is_a_ledger_error_without_a_path(tmp_path: Path) -> None:
    index = tmp_path / "state" / LEDGER_DIR / INDEX_FILE
    index.mkdir(parents=True)

    with pytest.raises(LedgerError) as raised:
        read_index(index)

    message = str(raised.value)
    assert "is unreadable" in message and INDEX_FILE in message
    assert "/" not in message
    assert str(tmp_path) not in message


def test_a_refusal_over_an_unreadable_ledger_is_audited_without_a_path(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, untrained_workspace, SITE_ID, tmp_path)
    site = Site(load_site_config(config_path))
    dataset = site.load_data().dataset
    (site.config.site.state_dir / LEDGER_DIR / f"{dataset}.json").mkdir(parents=True)
    request = round_request(site)

    with pytest.raises(LedgerError, match="is unreadable") as raised:
        site.train(request, initial_adapter(site, request), run="run-1")

    assert "/" not in str(raised.value)
    refusal = site.audit.events()[-1]
    assert refusal["event"] == "policy-decision" and refusal["decision"] == "refused"
    assert "is unreadable" in refusal["reason"] and "/" not in refusal["reason"]
    assert str(tmp_path) not in site.audit.path.read_text(encoding="utf-8")


# ----------------------------------------- a round withheld at record time ---


@pytest.mark.slow  # calibrates (PRV) and trains a DP round
def test_a_round_withheld_when_it_is_recorded_is_audited_as_a_budget_refusal(
    small_scenario, untrained_workspace, tmp_path, monkeypatch
) -> None:
    """Another process of the site charges a large round while this one trains: the
    ledger refuses to record this round (its update must not leave), and the site's
    audit log says so."""
    config_path = write_site_config(
        small_scenario, untrained_workspace, SITE_ID, tmp_path, epsilon=6.0
    )
    site = Site(load_site_config(config_path))
    original = PrivacyLedger.record_round
    concurrent: list[PrivacyLedger] = []

    def record_round(self: PrivacyLedger, run, server_round, history_entry, limit=None):
        if limit is not None and not concurrent:
            other = PrivacyLedger.open(
                site.config.site.state_dir,
                self.state.dataset,
                accountant=self.state.accountant,
                delta=self.state.delta,
            )
            concurrent.append(other)
            original(other, "run-elsewhere", 1, (0.5, 1.0, 1))  # a large spend elsewhere
        return original(self, run, server_round, history_entry, limit)

    monkeypatch.setattr(PrivacyLedger, "record_round", record_round)
    request = round_request(site)

    with pytest.raises(LedgerError, match="past") as raised:
        site.train(request, initial_adapter(site, request), run="run-1")

    events = site.audit.events()
    refusal = events[-1]
    assert refusal == {
        "event": "budget-refused",
        "run": "run-1",
        "round": 1,
        "phase": "train",
        "reason": str(raised.value),
    }
    assert "training-done" not in [event["event"] for event in events]
    ledger = site.open_ledger(site.load_data().dataset)
    assert [(entry.run, entry.round) for entry in ledger.state.entries] == [("run-elsewhere", 1)]
    assert verify_log(site.audit.path, load_public_key(site.config.site.audit_key_path)).ok


@pytest.mark.slow  # calibrates (PRV) and trains a DP round
def test_a_ledger_error_at_record_time_is_audited_with_its_round(
    small_scenario, untrained_workspace, tmp_path, monkeypatch
) -> None:
    config_path = write_site_config(
        small_scenario, untrained_workspace, SITE_ID, tmp_path, epsilon=6.0
    )
    site = Site(load_site_config(config_path))

    def refuse(self, run, server_round, history_entry, limit=None):
        raise LedgerError(f"round {server_round} would bring ε to 9.00, past the budget")

    monkeypatch.setattr(PrivacyLedger, "record_round", refuse)
    request = round_request(site, 2)

    with pytest.raises(PolicyError):
        site.train(request, initial_adapter(site, request), run="run-7")

    refusal = site.audit.events()[-1]
    assert refusal["event"] == "budget-refused"
    assert refusal["phase"] == "train"
    assert refusal["round"] == 2 and refusal["run"] == "run-7"
    assert "past the budget" in refusal["reason"]
