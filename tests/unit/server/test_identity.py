"""server/identity.py and the registered-name rule of parse_replies: a site name belongs to
the node key registered under it, and a site's introduction must announce the audit key
registered for it. Plain data: node ids, names and hand-built replies."""

from __future__ import annotations

import hashlib

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo

from common.errors import ConfigError
from common.protocol import AUDIT_KEY, SITE_ID_KEY
from server.identity import (
    Admission,
    audit_key_problem,
    parse_site_registry,
    registered_names,
    screen_introductions,
    unverified_nodes,
)
from server.strategy_utils import FailedReply, parse_replies
from tests.unit.server.replies import error_reply, eval_metrics, metadata, reply


def _fingerprint(seed: str) -> str:
    return "ed25519:" + hashlib.sha256(seed.encode()).hexdigest()


KEY_A, KEY_B, KEY_BANK = _fingerprint("a"), _fingerprint("b"), _fingerprint("bank")
REGISTERED = {1: "bank-a", 2: "hospital-a", 3: "hospital-b"}
"""Node -> the name the coordinator registered its key under."""
AUDIT_KEYS = {"hospital-a": KEY_A, "hospital-b": KEY_B, "bank-a": KEY_BANK}


def _evaluation(node: int, site: str | None) -> Message:
    return reply(node, site=site, metrics=eval_metrics(5, 0.1, 0.9))


def _introduction(node: int, site: str | None, audit_key: str | None = None) -> Message:
    told: dict[str, str] = {"kind": "hospital", "task": "dicom-classification"}
    if site is not None:
        told[SITE_ID_KEY] = site
    if audit_key is not None:
        told[AUDIT_KEY] = audit_key
    content = RecordDict({"site": ConfigRecord(told)})
    return Message(content, metadata=metadata(node, MessageType.QUERY))


# ------------------------------------------------------------ registered names ---


@pytest.mark.parametrize("impostor_first", [True, False])
def test_an_impostor_with_another_sites_key_cannot_take_its_name(impostor_first: bool) -> None:
    known: dict[int, str] = {}
    impostor, real = _evaluation(1, "hospital-a"), _evaluation(2, "hospital-a")
    replies = [impostor, real] if impostor_first else [real, impostor]

    good, bad = parse_replies(replies, known, None, registered=REGISTERED)

    assert [(r.node_id, r.site) for r in good] == [(2, "hospital-a")]
    assert bad == [
        FailedReply(1, "bank-a", "rejected", "node registered as bank-a claims to be hospital-a")
    ]
    assert known == {2: "hospital-a"}


def test_the_registered_name_is_kept_round_after_round() -> None:
    known: dict[int, str] = {}
    parse_replies([_evaluation(2, "hospital-a")], known, None, registered=REGISTERED)
    good, bad = parse_replies(
        [_evaluation(1, "bank-a"), _evaluation(2, "hospital-b")],
        known,
        None,
        registered=REGISTERED,
    )
    assert [r.site for r in good] == ["bank-a"]
    assert [(f.site, f.reason) for f in bad] == [
        ("hospital-a", "node registered as hospital-a claims to be hospital-b")
    ]
    assert known == {1: "bank-a", 2: "hospital-a"}


@pytest.mark.parametrize(
    ("node", "claimed", "reason"),
    [
        (9, "clinic-z", "node 9 has no registered site name and no node is registered as clinic-z"),
        (9, "hospital-a", "node 9 has no registered site name and hospital-a is registered to"),
        (1, "clinic-z", "node registered as bank-a claims to be clinic-z"),
    ],
)
def test_a_name_not_registered_to_the_node_is_rejected(
    node: int, claimed: str, reason: str
) -> None:
    known: dict[int, str] = {}
    good, bad = parse_replies([_evaluation(node, claimed)], known, None, registered=REGISTERED)
    assert good == []
    assert bad[0].status == "rejected"
    assert bad[0].reason.startswith(reason)
    assert bad[0].site == ("bank-a" if node == 1 else "node-9")
    assert known == {}


def test_a_reply_without_a_claim_is_named_by_the_registration() -> None:
    known: dict[int, str] = {}
    good, bad = parse_replies(
        [_evaluation(3, None), error_reply(2, 4004, "crashed"), _evaluation(9, None)],
        known,
        None,
        registered=REGISTERED,
    )
    assert [(r.node_id, r.site) for r in good] == [(3, "hospital-b")]
    assert [(f.site, f.status, f.reason) for f in bad] == [
        ("hospital-a", "failed", "crashed"),
        ("node-9", "rejected", "node 9 has no registered site name"),  # no site at all
    ]
    assert known == {}  # a name is taken by claiming it


def test_the_registered_owner_takes_a_name_bound_before_the_registry_was_known() -> None:
    known = {7: "hospital-a"}  # bound by an unregistered node, first come
    good, _ = parse_replies([_evaluation(2, "hospital-a")], known, None, registered=REGISTERED)
    assert [r.site for r in good] == ["hospital-a"]
    assert known == {2: "hospital-a"}


def test_of_two_nodes_registered_under_one_name_the_first_to_claim_it_keeps_it() -> None:
    known: dict[int, str] = {}
    twice = {**REGISTERED, 4: "hospital-a"}
    good, bad = parse_replies(
        [_evaluation(4, "hospital-a"), _evaluation(2, "hospital-a")], known, None, registered=twice
    )
    assert [r.node_id for r in good] == [4]
    assert bad[0].node_id == 2 and "already used by another node" in bad[0].reason
    assert known == {4: "hospital-a"}


def test_without_registered_names_names_stay_first_come_first_served() -> None:
    """A simulation: Flower registers no names, so the first claim wins, as before."""
    known: dict[int, str] = {}
    good, bad = parse_replies(
        [_evaluation(1, "hospital-a"), _evaluation(2, "hospital-a")], known, None, registered={}
    )
    assert [r.node_id for r in good] == [1]
    assert "already used by another node" in bad[0].reason
    assert known == {1: "hospital-a"}


def test_registered_names_come_from_the_node_infos_that_have_one() -> None:
    nodes = [NodeInfo(node_id=1, name="bank-a"), NodeInfo(node_id=2), NodeInfo(node_id=3, name="")]
    assert registered_names(nodes) == {1: "bank-a"}
    assert registered_names([NodeInfo(node_id=5), NodeInfo(node_id=6)]) == {}


# ------------------------------------------------------------------ audit keys ---


@pytest.mark.parametrize(
    ("announced", "reason"),
    [
        (KEY_A, None),
        (KEY_B, f"site hospital-a announced audit key {KEY_B}, not its registered {KEY_A}"),
        (None, f"site hospital-a announced no audit key; its registered audit key is {KEY_A}"),
        ("", "site hospital-a announced no audit key"),
        ("ed25519:xyz\nforged line", "site hospital-a announced a malformed audit key"),
        (42, "site hospital-a announced a malformed audit key"),
    ],
)
def test_audit_key_problem(announced: object, reason: str | None) -> None:
    problem = audit_key_problem("hospital-a", announced, AUDIT_KEYS)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason)
        assert "\n" not in problem  # nothing the site sent goes into the reason as it came


def test_a_site_without_a_registered_audit_key_is_not_checked() -> None:
    assert audit_key_problem("clinic-z", KEY_A, AUDIT_KEYS) is None
    assert audit_key_problem("hospital-a", None, {}) is None


def test_introductions_join_sites_whose_audit_key_is_the_registered_one() -> None:
    known: dict[int, str] = {}
    joined, rejected = screen_introductions(
        [_introduction(2, "hospital-a", KEY_A), _introduction(3, "hospital-b", KEY_A)],
        known,
        REGISTERED,
        AUDIT_KEYS,
    )
    assert joined == {
        "hospital-a": {"kind": "hospital", "task": "dicom-classification", AUDIT_KEY: KEY_A}
    }
    assert rejected == [
        FailedReply(
            3,
            "hospital-b",
            "rejected",
            f"site hospital-b announced audit key {KEY_A}, not its registered {KEY_B}",
        )
    ]
    assert known == {2: "hospital-a"}  # a rejected site never takes its name


@pytest.mark.parametrize("impostor_first", [True, False])
def test_an_impostor_introduction_is_rejected_and_the_real_site_joins(
    impostor_first: bool,
) -> None:
    known: dict[int, str] = {}
    impostor, real = _introduction(1, "hospital-a", KEY_A), _introduction(2, "hospital-a", KEY_A)
    joined, rejected = screen_introductions(
        [impostor, real] if impostor_first else [real, impostor], known, REGISTERED, AUDIT_KEYS
    )
    assert list(joined) == ["hospital-a"]
    assert [(f.node_id, f.site, f.reason) for f in rejected] == [
        (1, "bank-a", "node registered as bank-a claims to be hospital-a")
    ]
    assert known == {2: "hospital-a"}


def test_introductions_without_a_registry_are_as_before() -> None:
    """A simulation: no names, no audit keys; a name taken first is not a rejection at
    the introduction (the node is asked rounds and its replies say why they fail)."""
    known: dict[int, str] = {}
    joined, rejected = screen_introductions(
        [
            _introduction(1, "hospital-a", "anything"),
            _introduction(2, "hospital-a"),
            _introduction(3, None),
            Message(RecordDict(), metadata=metadata(4, MessageType.QUERY)),
            error_reply(5, 4002, "misconfigured", MessageType.QUERY),
        ],
        known,
    )
    assert list(joined) == ["hospital-a"]
    assert joined["hospital-a"][AUDIT_KEY] == "anything"
    assert rejected == []
    assert known == {1: "hospital-a"}


def test_nodes_still_to_show_their_audit_key() -> None:
    known = {2: "hospital-a"}
    nodes = [1, 2, 3, 9]
    assert unverified_nodes(nodes, known, REGISTERED, AUDIT_KEYS) == {1: "bank-a", 3: "hospital-b"}
    assert unverified_nodes(nodes, known, REGISTERED, {"hospital-a": KEY_A}) == {}
    assert unverified_nodes(nodes, {}, {}, AUDIT_KEYS) == {}  # nothing registered


# ------------------------------------------------------------------- admission ---


class Listing:
    """A grid's get_nodes, counting how often it is read."""

    def __init__(self, registered: dict[int, str]) -> None:
        self.registered = registered
        self.reads = 0

    def get_nodes(self) -> list[NodeInfo]:
        self.reads += 1
        return [NodeInfo(node_id=node, name=name) for node, name in self.registered.items()]


def test_admission_reads_the_registry_only_when_new_nodes_appear() -> None:
    grid = Listing({1: "bank-a", 2: "hospital-a"})
    admission = Admission()
    admission.learn(grid, [1, 2])  # type: ignore[arg-type]
    admission.learn(grid, [2])  # type: ignore[arg-type]
    assert grid.reads == 1
    grid.registered[3] = "hospital-b"
    admission.learn(grid, [1, 2, 3])  # type: ignore[arg-type]
    assert grid.reads == 2
    assert admission.registered == REGISTERED


def test_admission_bars_rejected_and_unverified_nodes_and_reports_them() -> None:
    admission = Admission(AUDIT_KEYS)
    admission.learn(Listing(dict(REGISTERED)), [1, 2, 3])  # type: ignore[arg-type]
    known: dict[int, str] = {}
    assert admission.to_introduce([1, 2, 3], known, asked=set()) == [1, 2, 3]
    joined = admission.screen(
        [_introduction(1, "hospital-a", KEY_A), _introduction(2, "hospital-a", KEY_A)], known
    )  # node 3 stays silent
    assert list(joined) == ["hospital-a"]
    assert set(admission.rejected) == {1}
    assert admission.barred([1, 2, 3], known) == {1, 3}
    # Node 3 is asked again (its audit key is unshown); node 1 never again.
    assert admission.to_introduce([1, 2, 3], known, asked={1, 2, 3}) == [3]

    first = admission.held_back([1, 2, 3], known)
    assert [(f.node_id, f.site, f.status) for f in first] == [
        (1, "bank-a", "rejected"),
        (3, "hospital-b", "rejected"),
    ]
    assert "has not shown its registered audit key" in first[1].reason
    again = admission.held_back([1, 2, 3], known)
    assert [f.node_id for f in again] == [3]  # the rejection is reported once

    admission.screen([_introduction(3, "hospital-b", KEY_B)], known)
    assert admission.barred([1, 2, 3], known) == {1}
    assert admission.held_back([1, 2, 3], known) == []


def test_admission_in_a_simulation_bars_nobody() -> None:
    admission = Admission()
    admission.learn(Listing({}), [1, 2])  # type: ignore[arg-type]
    known: dict[int, str] = {}
    admission.screen([_introduction(1, "bank-a"), _introduction(2, "bank-a")], known)
    assert admission.barred([1, 2], known) == set()
    assert admission.held_back([1, 2], known) == []
    assert admission.to_introduce([1, 2], known, asked={1, 2}) == []


# -------------------------------------------------------------- registry file ---


def test_parse_site_registry() -> None:
    document = {"hospital-a": {"audit_key": KEY_A}, "bank-a": {}}
    assert parse_site_registry(document) == {"hospital-a": KEY_A}
    assert parse_site_registry({}) == {}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a JSON object"),
        ({"Hospital A": {}}, "not a site id"),
        ({"hospital-a": "x"}, "is not an object"),
        ({"hospital-a": {"audit_key": "SHA256:abc"}}, "not an ed25519: fingerprint"),
        ({"hospital-a": {"audit_key": 7}}, "not an ed25519: fingerprint"),
    ],
)
def test_a_malformed_site_registry_is_refused(document: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_site_registry(document)


def test_a_site_that_refuses_its_introduction_is_reported_with_its_reason() -> None:
    """A site whose launcher refuses the run's code answers the introduction with an
    error: the coordinator records that refusal and its reason, not a missing key."""
    from common.protocol import CLIENT_CODE_REFUSED, SITE_FAILED

    admission = Admission(AUDIT_KEYS)
    admission.learn(Listing(dict(REGISTERED)), [1, 2, 3])  # type: ignore[arg-type]
    known: dict[int, str] = {}
    reason = "the run's app bundle (SHA-256 abc) is not a release this site pinned"
    admission.screen(
        [
            error_reply(2, CLIENT_CODE_REFUSED, reason, MessageType.QUERY),
            error_reply(3, SITE_FAILED, "disk full", MessageType.QUERY),
        ],
        known,
    )
    held = {f.node_id: f for f in admission.held_back([2, 3], known)}
    assert (held[2].site, held[2].status, held[2].reason) == ("hospital-a", "refused", reason)
    assert (held[3].status, held[3].reason) == ("failed", "disk full")
    assert admission.barred([2, 3], known) == {2, 3}
