"""FedLoraStrategy with Flower's registry of node names (a deployment) and the site
registry of audit keys: a fake Grid whose get_nodes reports registered names, and
hand-built introductions. A simulation's grid reports no names (test_strategy.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from common.protocol import AUDIT_KEY, SITE_ID_KEY
from server.strategy import FedLoraStrategy
from tests.unit.server.replies import eval_metrics, train_metrics
from tests.unit.server.test_strategy import (
    FakeGrid,
    _answer,
    _audit_entries,
    _honest_round,
    _rows,
    _strategy,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")

TASK = "tabular-classification"


def _fingerprint(seed: str) -> str:
    return "ed25519:" + hashlib.sha256(seed.encode()).hexdigest()


KEY_A, KEY_B = _fingerprint("hospital-a"), _fingerprint("hospital-b")


def _told(site: str, audit_key: str | None = None) -> dict[str, str]:
    """What a site's introduction says (client.app's introduce)."""
    told = {SITE_ID_KEY: site, "kind": "hospital", "task": TASK}
    if audit_key is not None:
        told[AUDIT_KEY] = audit_key
    return told


def _instructed(strategy: FedLoraStrategy, server_round: int, grid: FakeGrid) -> list[int]:
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    return sorted(m.metadata.dst_node_id for m in messages)


def _excluded(tmp_path: Path) -> list[dict[str, object]]:
    return [e["data"] for e in _audit_entries(tmp_path) if e["event"] == "site-excluded"]


@pytest.mark.parametrize(("impostor", "real"), [(11, 12), (12, 11)])
def test_an_impostor_is_rejected_and_the_registered_site_takes_the_rounds(
    tmp_path: Path, impostor: int, real: int
) -> None:
    """The impostor holds bank-a's registered node key and claims hospital-a; whichever
    answers first, the name stays with the node registered under it."""
    strategy = _strategy(tmp_path, min_sites=2)
    registered = {impostor: "bank-a", real: "hospital-a", 13: "hospital-b"}
    details = {impostor: _told("hospital-a"), real: _told("hospital-a"), 13: _told("hospital-b")}
    grid = FakeGrid([11, 12, 13], details=details, registered=registered)

    assert _instructed(strategy, 1, grid) == sorted([real, 13])

    assert strategy.known_sites == {real: "hospital-a", 13: "hospital-b"}
    assert strategy.sites_of_this_task() == {real: "hospital-a", 13: "hospital-b"}
    entries = _audit_entries(tmp_path)
    joined = [e["data"]["site"] for e in entries if e["event"] == "site-joined"]
    assert sorted(joined) == ["hospital-a", "hospital-b"]
    started = next(e["data"] for e in entries if e["event"] == "round-started")
    assert started["sites"] == ["hospital-a", "hospital-b"]
    assert _excluded(tmp_path) == [
        {
            "round": 1,
            "site": "bank-a",
            "phase": "train",
            "status": "rejected",
            "reason": "node registered as bank-a claims to be hospital-a",
        }
    ]
    assert [(r["site"], r["status"]) for r in _rows(tmp_path)] == [("bank-a", "rejected")]

    # The next round: the impostor is neither asked again nor sent the round, and its
    # rejection is not recorded twice; the registered sites train as usual.
    grid = FakeGrid([11, 12, 13], details=details, registered=registered)
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    messages = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    instructions = {m.metadata.dst_node_id: m for m in messages}
    assert sorted(instructions) == sorted([real, 13])
    assert grid.introduced == []
    assert len(_excluded(tmp_path)) == 1
    names = {real: "hospital-a", 13: "hospital-b"}
    _, replies = _honest_round(instructions, {real: 40, 13: 60}, names)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and metrics is not None
    assert metrics["sites"] == 2.0 and metrics["rejected"] == 0.0
    aggregated = [e["data"] for e in _audit_entries(tmp_path) if e["event"] == "aggregation-done"]
    assert aggregated[-1]["sites"] == ["hospital-a", "hospital-b"]


def test_a_node_claiming_an_unregistered_name_is_rejected(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=1)
    grid = FakeGrid(
        [11, 12],
        details={11: _told("hospital-a"), 12: _told("clinic-z")},
        registered={11: "hospital-a", 12: "hospital-b"},
    )
    assert _instructed(strategy, 1, grid) == [11]
    assert [(d["site"], d["reason"]) for d in _excluded(tmp_path)] == [
        ("hospital-b", "node registered as hospital-b claims to be clinic-z")
    ]


def test_an_audit_key_other_than_the_registered_one_takes_no_round(tmp_path: Path) -> None:
    strategy = _strategy(
        tmp_path, min_sites=1, audit_keys={"hospital-a": KEY_A, "hospital-b": KEY_B}
    )
    details = {
        11: _told("hospital-a", KEY_A),
        12: _told("hospital-b", KEY_A),  # another site's key
        13: _told("bank-a"),  # no audit key registered for bank-a: not checked
    }
    registered = {11: "hospital-a", 12: "hospital-b", 13: "bank-a"}
    grid = FakeGrid([11, 12, 13], details=details, registered=registered)

    assert _instructed(strategy, 1, grid) == [11, 13]

    assert strategy.known_sites == {11: "hospital-a", 13: "bank-a"}
    assert set(strategy.site_details) == {"hospital-a", "bank-a"}
    assert strategy.site_details["hospital-a"][AUDIT_KEY] == KEY_A
    assert [(d["site"], d["status"], d["reason"]) for d in _excluded(tmp_path)] == [
        (
            "hospital-b",
            "rejected",
            f"site hospital-b announced audit key {KEY_A}, not its registered {KEY_B}",
        )
    ]
    # Nor is it asked to evaluate.
    evaluation = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in evaluation) == [11, 13]


def test_a_site_that_announces_no_audit_key_is_rejected(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=1, audit_keys={"hospital-a": KEY_A})
    grid = FakeGrid(
        [11, 12],
        details={11: _told("hospital-a"), 12: _told("bank-a")},
        registered={11: "hospital-a", 12: "bank-a"},
    )
    assert _instructed(strategy, 1, grid) == [12]
    assert strategy.known_sites == {12: "bank-a"}
    (excluded,) = _excluded(tmp_path)
    assert excluded["site"] == "hospital-a"
    assert excluded["reason"] == (
        f"site hospital-a announced no audit key; its registered audit key is {KEY_A}"
    )


def test_a_silent_site_with_a_registered_audit_key_waits_until_it_shows_it(
    tmp_path: Path,
) -> None:
    """Not introducing itself must not skip the check: the node is held back (and asked
    again) each round until its introduction shows the registered key."""
    strategy = _strategy(tmp_path, min_sites=1, audit_keys={"hospital-a": KEY_A})
    # These rounds take no time; a real one outlasts the introduction timeout, after
    # which an unanswered question is asked again (server/introductions.py).
    strategy.introductions.retry_after = 0.0
    details = {12: _told("bank-a")}  # node 11 (hospital-a) does not answer
    registered = {11: "hospital-a", 12: "bank-a"}
    grid = FakeGrid([11, 12], details=details, registered=registered)

    assert _instructed(strategy, 1, grid) == [12]
    grid = FakeGrid([11, 12], details=details, registered=registered)
    assert _instructed(strategy, 2, grid) == [12]
    assert grid.introduced == [11]
    reasons = [(d["round"], d["site"], d["reason"]) for d in _excluded(tmp_path)]
    held = "site hospital-a has not shown its registered audit key; it takes no round"
    assert reasons == [(1, "hospital-a", held), (2, "hospital-a", held)]

    details[11] = _told("hospital-a", KEY_A)
    grid = FakeGrid([11, 12], details=details, registered=registered)
    assert _instructed(strategy, 3, grid) == [11, 12]
    assert strategy.known_sites == {11: "hospital-a", 12: "bank-a"}
    assert len(_excluded(tmp_path)) == 2


def test_the_registry_is_read_when_new_nodes_appear_not_per_message(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, min_sites=2)
    registered = {11: "hospital-a", 12: "hospital-b", 13: "bank-a"}
    details: Mapping[int, Mapping[str, str]] = {
        node: _told(name) for node, name in registered.items()
    }
    grid = FakeGrid([11, 12], details=details, registered=registered)
    _instructed(strategy, 1, grid)
    _instructed(strategy, 2, grid)
    evaluation = strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    assert len(list(evaluation)) == 2
    assert grid.listings == 1

    newcomer = FakeGrid([11, 12, 13], details=details, registered=registered)
    assert _instructed(strategy, 3, newcomer) == [11, 12, 13]
    assert newcomer.listings == 1
    assert newcomer.introduced == [13]
    assert strategy.admission.registered == registered


def test_replies_are_held_to_the_registered_names(tmp_path: Path) -> None:
    """A site that joined under its registered name cannot switch to another in a reply,
    in training or in evaluation."""
    strategy = _strategy(tmp_path, min_sites=1)
    registered = {11: "hospital-a", 12: "hospital-b"}
    details = {node: _told(name) for node, name in registered.items()}
    grid = FakeGrid([11, 12], details=details, registered=registered)
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    instructions = {m.metadata.dst_node_id: m for m in messages}
    _, replies = _honest_round(instructions, {11: 40, 12: 60}, {11: "hospital-a", 12: "bank-a"})

    _, metrics = strategy.aggregate_train(1, replies)

    assert metrics is not None and metrics["rejected"] == 1.0
    rejected = [e["data"] for e in _audit_entries(tmp_path) if e["event"] == "update-received"]
    assert [(d["site"], d["status"], d["reason"]) for d in rejected] == [
        ("hospital-b", "rejected", "node registered as hospital-b claims to be bank-a"),
        ("hospital-a", "accepted", None),
    ]

    evaluation = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    answers = [
        _answer(m, None, eval_metrics(30, 0.4, 0.7), site="bank-a")
        for m in evaluation
        if m.metadata.dst_node_id == 12
    ]
    assert strategy.aggregate_evaluate(1, answers) is None
    evaluated = [e for e in strategy.recorder.exclusions if e["phase"] == "evaluate"]
    assert [(e["site"], e["status"], e["reason"]) for e in evaluated] == [
        ("hospital-b", "rejected", "node registered as hospital-b claims to be bank-a"),
        ("hospital-a", "timed-out", "no reply within 600 s"),
    ]


def test_in_a_simulation_names_stay_first_come_first_served(tmp_path: Path) -> None:
    """No registered names: the first node to claim a name keeps it; the second is still
    asked the round, and its reply is rejected with the reason, as before."""
    strategy = _strategy(tmp_path, min_sites=1, audit_keys={})
    grid = FakeGrid([11, 12], details={11: _told("bank-a"), 12: _told("bank-a")})
    strategy.admit(grid)  # type: ignore[arg-type]  # the round loop
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # type: ignore[arg-type]
    instructions = {m.metadata.dst_node_id: m for m in messages}
    assert sorted(instructions) == [11, 12]
    assert strategy.known_sites == {11: "bank-a"}
    assert _excluded(tmp_path) == []
    assert strategy.admission.registered == {}
    replies = [
        _answer(instructions[node], None, train_metrics(10), site="bank-a") for node in (11, 12)
    ]
    strategy.aggregate_train(1, replies)
    reasons = [e["reason"] for e in strategy.recorder.exclusions]
    assert "site name bank-a is already used by another node" in reasons
