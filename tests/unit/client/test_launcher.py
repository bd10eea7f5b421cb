"""client/launcher.py: a site runs only the client code it pinned. The bundle check is
a pure function of the bytes; the task handler refuses an unpinned bundle with an
error reply and an audit entry, and runs the installed ClientApp (never the bundle's)
for a pinned one. The Flower attributes the site's SuperExec relies on are checked to
still exist in the pinned Flower."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tomli_w
from flwr.app import Message, RecordDict

from client import launcher
from client.audit import SiteAudit
from client.launcher import UnpinnedCodeError, check_bundle, handle_task
from common.config import load_site_config
from common.protocol import CLIENT_CODE_REFUSED
from tests.conftest import write_site_config
from tests.unit.client.rounds import node_context

pytestmark = pytest.mark.usefixtures("flower_task_identity")

BUNDLE = b"PK\x03\x04 a stand-in app bundle"
DIGEST = hashlib.sha256(BUNDLE).hexdigest()


def test_a_pinned_bundle_passes() -> None:
    assert check_bundle(BUNDLE, DIGEST, DIGEST, [DIGEST]) == DIGEST


def test_a_bundle_one_byte_off_is_refused_by_its_own_hash() -> None:
    changed = BUNDLE[:-1] + b"?"
    actual = hashlib.sha256(changed).hexdigest()
    with pytest.raises(UnpinnedCodeError, match=f"SHA-256 {actual}") as refused:
        check_bundle(changed, actual, actual, [DIGEST])
    assert DIGEST[:12] in str(refused.value)


def test_no_pin_refuses_everything() -> None:
    with pytest.raises(UnpinnedCodeError, match=r"client_releases: none"):
        check_bundle(BUNDLE, DIGEST, DIGEST, [])


@pytest.mark.parametrize("declared", ["bundle", "run"])
def test_the_hash_is_computed_not_taken_from_the_run(declared: str) -> None:
    """A run that declares a pinned hash for other bytes is refused."""
    other = b"other bytes"
    hashes = {"bundle": DIGEST, "run": hashlib.sha256(other).hexdigest()}
    hashes[declared] = DIGEST
    with pytest.raises(UnpinnedCodeError, match="declares"):
        check_bundle(other, hashes["bundle"], hashes["run"], [DIGEST])


def _site(tmp_path: Path, small_scenario: Any, site_workspace: Path, pins: list[str]) -> Path:
    path = write_site_config(small_scenario, site_workspace, "bank-a", tmp_path)
    document = tomllib.loads(path.read_text())
    document.setdefault("policy", {})["client_releases"] = pins
    path.write_text(tomli_w.dumps(document))
    return path


def _task(config: Path, content: bytes) -> tuple[Message, Any, Any, Any]:
    digest = hashlib.sha256(content).hexdigest()
    message = Message(RecordDict(), dst_node_id=1, message_type="query")
    run = SimpleNamespace(run_id=7, fab_hash=digest)
    fab = SimpleNamespace(content=content, hash_str=digest)
    return message, node_context(config), run, fab


def test_an_unpinned_bundle_gets_an_error_reply_and_an_audit_entry(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _site(tmp_path, small_scenario, untrained_workspace, [DIGEST])

    def never() -> None:
        raise AssertionError("no client code may run for an unpinned bundle")

    monkeypatch.setattr(launcher, "installed_client_app", never)
    changed = BUNDLE + b"!"
    reply = handle_task(*_task(config, changed))

    assert reply.has_error()
    assert reply.error.code == CLIENT_CODE_REFUSED
    assert hashlib.sha256(changed).hexdigest() in reply.error.reason
    events = SiteAudit(load_site_config(config)).events()
    refused = [e for e in events if e["event"] == "code-refused"]
    assert refused == [
        {"event": "code-refused", "run": "7", "fab_sha256": hashlib.sha256(changed).hexdigest()}
    ]
    pinned = [e for e in events if e["event"] == "client-releases-pinned"]
    assert pinned and pinned[0]["pinned"] == [DIGEST]


def test_a_pinned_bundle_runs_the_installed_client_app(
    tmp_path: Path, small_scenario: Any, untrained_workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _site(tmp_path, small_scenario, untrained_workspace, [DIGEST])
    seen: list[Message] = []

    def installed(message: Message, context: Any) -> Message:
        seen.append(message)
        return Message(RecordDict(), reply_to=message)

    monkeypatch.setattr(launcher, "installed_client_app", lambda: installed)
    message, context, run, fab = _task(config, BUNDLE)
    reply = handle_task(message, context, run, fab)

    assert not reply.has_error()
    assert seen == [message]
    events = SiteAudit(load_site_config(config)).events()
    assert not any(e["event"] == "code-refused" for e in events)


def test_the_installed_client_app_is_this_package() -> None:
    from client.app import app

    assert launcher.installed_client_app() is app


def test_a_supernode_without_a_site_config_is_misconfigured() -> None:
    message = Message(RecordDict(), dst_node_id=1, message_type="query")
    context = SimpleNamespace(node_config={})
    reply = handle_task(message, context, None, None)  # type: ignore[arg-type]
    assert reply.has_error() and "site-config" in reply.error.reason


def test_the_flower_attributes_the_site_superexec_sets_still_exist() -> None:
    """fedlora-superexec points Flower's ClientApp command at fedlora-clientapp and
    narrows the task types it takes: a Flower upgrade that moves either must fail here."""
    from flwr.supercore import constant
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.plugin import base_exec_plugin

    assert callable(run_superexec.get_executor)  # replaced by the in-process executor

    assert constant.TASK_TYPE_TO_COMMAND[constant.TaskType.CLIENT_APP] == "flwr-clientapp"
    assert subprocess_executor.TASK_TYPE_TO_COMMAND is constant.TASK_TYPE_TO_COMMAND
    assert isinstance(base_exec_plugin.AutoExecPlugin.supported_task_types, frozenset)
    assert constant.TaskType.CLIENT_APP in base_exec_plugin.AutoExecPlugin.supported_task_types
