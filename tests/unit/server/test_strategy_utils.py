"""parse_replies, missing_replies, readable_reason, rollback_reason and weighted_mean:
every reply is accepted or failed with its reason."""

from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.adapters import AdapterArrays, AdapterSchema, adapter_sha256, record_to_arrays
from common.config import FederationConfig
from common.errors import UpdateError
from common.protocol import (
    BAD_GLOBAL_ADAPTER,
    REFUSED_BY_POLICY,
    SITE_MISCONFIGURED,
    RoundRequest,
)
from common.replies import TrainMetrics
from server.strategy_utils import (
    MAX_REASON_CHARS,
    FailedReply,
    SiteReply,
    metric_record,
    missing_replies,
    parse_replies,
    readable_reason,
    rollback_reason,
    update_receipt,
    weighted_mean,
)
from server.validation import UpdateLimits, record_payload_bytes, update_norm, validate_update
from tests.unit.server.replies import (
    error_reply,
    eval_metrics,
    metadata,
    nudged,
    reply,
    train_metrics,
)

SHAPES = {"q.lora_A": (2, 6), "q.lora_B": (6, 2), "classifier.weight": (2, 6)}


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


GLOBAL = _global()
"""The adapter the coordinator sent; honest updates are small moves away from it."""
SCHEMA = AdapterSchema.of(GLOBAL)
REQUEST = RoundRequest.for_round(
    FederationConfig(
        task="tabular-classification", base_model=Path("/m"), update_precision="float32"
    ),
    "f" * 64,
    1,
    ("q",),
)
LIMITS = UpdateLimits(
    # These toy tensors are smaller than their .npy headers: size is not what is tested here.
    max_payload_bytes=1_000_000,
    min_examples=1,
    max_examples=10_000_000,
    norm_bound="derived",
)
CHECK = partial(validate_update, reference=GLOBAL, schema=SCHEMA, request=REQUEST, limits=LIMITS)
"""The strategy's own check (server/validation.py), bound as the strategy binds it."""


def _adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """An update that passes CHECK."""
    return nudged(GLOBAL, seed)


def test_good_train_reply_is_parsed() -> None:
    arrays = _adapter(1)
    known: dict[int, str] = {}
    good, bad = parse_replies(
        [reply(11, metrics=train_metrics(120, loss=0.4), arrays=arrays, site="bank-a")],
        known,
        CHECK,
    )
    assert bad == []
    assert len(good) == 1
    parsed = good[0]
    assert isinstance(parsed, SiteReply)
    assert (parsed.node_id, parsed.site) == (11, "bank-a")
    assert parsed.metrics["num-examples"] == 120.0
    assert parsed.metrics["train-loss"] == 0.4
    assert parsed.metrics["epsilon-budget"] == 8.0
    assert all(isinstance(v, float) for v in parsed.metrics.values())
    assert parsed.arrays is not None
    assert set(parsed.arrays) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(parsed.arrays[name], value)
    # The norm of the update, measured from the adapter the site was sent.
    assert parsed.norm is not None
    assert parsed.norm == pytest.approx(update_norm(arrays, GLOBAL), rel=1e-6)  # float32
    assert 0 < parsed.norm < 1
    # The node is now known by its site name.
    assert known == {11: "bank-a"}


def test_refused_reply_keeps_the_sites_reason() -> None:
    known = {5: "hospital-b"}
    reason = "site hospital-b has spent its privacy budget"
    good, bad = parse_replies([error_reply(5, REFUSED_BY_POLICY, reason)], known, CHECK)
    assert good == []
    assert bad == [FailedReply(5, "hospital-b", "refused", reason)]


@pytest.mark.parametrize("code", [SITE_MISCONFIGURED, BAD_GLOBAL_ADAPTER, 0, 3])
def test_other_error_codes_are_failures(code: int) -> None:
    good, bad = parse_replies([error_reply(6, code, "boom")], {}, CHECK)
    assert good == []
    assert bad == [FailedReply(6, "node-6", "failed", "boom")]


def test_error_without_reason() -> None:
    _, bad = parse_replies([error_reply(6, SITE_MISCONFIGURED, None)], {}, CHECK)
    assert bad[0].reason == "no reason given"


def test_error_reply_does_not_change_the_known_sites() -> None:
    known = {5: "hospital-b"}
    parse_replies([error_reply(7, REFUSED_BY_POLICY, "no")], known, CHECK)
    assert known == {5: "hospital-b"}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda a: a.pop("q.lora_B"), "malformed update: missing tensors: q.lora_B"),
        (
            lambda a: a.update(extra=np.zeros(3, np.float32)),
            "malformed update: unexpected tensors: extra",
        ),
        (
            lambda a: a.update({"q.lora_A": np.zeros((2, 7), np.float32)}),
            "malformed update: q.lora_A: shape (2, 7), expected (2, 6)",
        ),
        (
            lambda a: a.update({"classifier.weight": np.zeros((2, 6), np.float64)}),
            "malformed update: classifier.weight: dtype float64, expected float32",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_malformed_update_is_rejected_and_others_still_accepted(mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    broken = _adapter(2)
    mutate(broken)
    replies = [
        reply(1, metrics=train_metrics(10), arrays=_adapter(1), site="bank-a"),
        reply(2, metrics=train_metrics(20), arrays=broken, site="bank-b"),
        reply(3, metrics=train_metrics(30), arrays=_adapter(3), site="bank-c"),
    ]
    good, bad = parse_replies(replies, {}, CHECK)
    assert [r.site for r in good] == ["bank-a", "bank-c"]
    assert [r.metrics["num-examples"] for r in good] == [10.0, 30.0]
    assert bad == [FailedReply(2, "bank-b", "rejected", expected)]


def test_reply_without_metrics_is_rejected() -> None:
    good, bad = parse_replies([reply(4, metrics=None, arrays=_adapter(), site="bank-b")], {}, CHECK)
    assert good == []
    assert bad == [FailedReply(4, "bank-b", "rejected", "expected one metric record, got 0")]


def test_metrics_without_num_examples_are_rejected() -> None:
    metrics = train_metrics(10)
    del metrics["num-examples"]
    _, bad = parse_replies([reply(4, metrics=metrics, arrays=_adapter())], {}, CHECK)
    assert bad == [FailedReply(4, "node-4", "rejected", "reply lacks metric(s) num-examples")]


def test_two_metric_records_are_rejected() -> None:
    message = reply(4, metrics=train_metrics(10), arrays=_adapter())
    message.content["more"] = MetricRecord({"num-examples": 3})
    _, bad = parse_replies([message], {}, CHECK)
    assert [f.reason for f in bad] == ["expected one metric record, got 2"]


def test_train_reply_without_adapter_is_rejected() -> None:
    _, bad = parse_replies([reply(8, metrics=train_metrics(10), site="a1")], {}, CHECK)
    assert bad == [FailedReply(8, "a1", "rejected", "malformed update: reply carries no adapter")]


def test_adapter_under_another_record_name_is_rejected() -> None:
    message = reply(8, metrics=train_metrics(10))
    message.content["weights"] = ArrayRecord()
    _, bad = parse_replies([message], {}, CHECK)
    assert [f.reason for f in bad] == ["malformed update: reply carries no adapter"]


def test_evaluation_replies_carry_metrics_only() -> None:
    replies = [
        reply(1, metrics=eval_metrics(40, 0.7, 0.6), site="h1", message_type=MessageType.EVALUATE),
        reply(2, metrics=eval_metrics(60, 0.5, 0.9), site="h2", message_type=MessageType.EVALUATE),
        error_reply(3, REFUSED_BY_POLICY, "cohort too small", MessageType.EVALUATE),
    ]
    good, bad = parse_replies(replies, {}, check_update=None)
    assert [(r.site, r.arrays) for r in good] == [("h1", None), ("h2", None)]
    assert good[1].metrics == {"num-examples": 60.0, "eval-loss": 0.5, "eval-accuracy": 0.9}
    assert bad == [FailedReply(3, "node-3", "refused", "cohort too small")]


def test_evaluation_ignores_arrays_it_did_not_ask_for() -> None:
    message = reply(1, metrics=eval_metrics(4, 0.1, 0.2), arrays={"junk": np.zeros(2)})
    good, bad = parse_replies([message], {}, check_update=None)
    assert bad == []
    assert good[0].arrays is None


def test_site_name_falls_back_to_known_node_then_node_id() -> None:
    known = {21: "hospital-a"}
    replies = [
        reply(21, metrics=eval_metrics(1, 0.0, 1.0)),
        reply(22, metrics=eval_metrics(1, 0.0, 1.0)),
        error_reply(21, SITE_MISCONFIGURED, "x"),
        error_reply(23, SITE_MISCONFIGURED, "y"),
    ]
    good, bad = parse_replies(replies, known, check_update=None)
    assert [r.site for r in good] == ["hospital-a", "node-22"]
    assert [f.site for f in bad] == ["hospital-a", "node-23"]
    assert known == {21: "hospital-a"}  # a fallback name is never bound to a node


def test_site_name_learnt_in_training_names_a_later_error() -> None:
    known: dict[int, str] = {}
    parse_replies(
        [reply(9, metrics=train_metrics(5), arrays=_adapter(), site="bank-z")], known, CHECK
    )
    _, bad = parse_replies([error_reply(9, REFUSED_BY_POLICY, "budget")], known, check_update=None)
    assert bad[0].site == "bank-z"


def test_site_record_without_a_text_name_is_ignored() -> None:
    message = reply(30, metrics=eval_metrics(1, 0.0, 1.0))
    message.content["site"] = ConfigRecord({"site-id": 7})
    good, _ = parse_replies([message], {30: "bank-q"}, check_update=None)
    assert good[0].site == "bank-q"


def test_replies_may_be_a_generator() -> None:
    good, bad = parse_replies(
        (reply(n, metrics=eval_metrics(n, 0.1, 0.2)) for n in (1, 2, 3)), {}, check_update=None
    )
    assert [r.node_id for r in good] == [1, 2, 3]
    assert bad == []


def test_empty_replies() -> None:
    assert parse_replies([], {}, CHECK) == ([], [])
    assert parse_replies([], {}, None) == ([], [])


def test_a_reply_with_empty_content_is_rejected() -> None:
    good, bad = parse_replies([Message(RecordDict(), metadata=metadata(3))], {}, CHECK)
    assert good == []
    assert bad == [FailedReply(3, "node-3", "rejected", "expected one metric record, got 0")]


def test_list_valued_metric_rejects_only_that_reply() -> None:
    metrics = {**train_metrics(10), "per-class": [0.1, 0.9]}
    replies = [
        reply(1, metrics=metrics, arrays=_adapter(), site="bank-a"),
        reply(2, metrics=train_metrics(20), arrays=_adapter(), site="bank-b"),
    ]
    good, bad = parse_replies(replies, {}, CHECK)
    assert [r.site for r in good] == ["bank-b"]
    assert [(f.site, f.status) for f in bad] == [("bank-a", "rejected")]


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_rejected(bad_value: float) -> None:
    poisoned = _adapter(4)
    poisoned["q.lora_A"][0, 0] = bad_value
    good, bad = parse_replies(
        [reply(1, metrics=train_metrics(10), arrays=poisoned, site="bank-a")], {}, CHECK
    )
    assert good == []
    assert bad == [
        FailedReply(1, "bank-a", "rejected", "malformed update: non-finite values in q.lora_A")
    ]


def test_update_beyond_the_norm_bound_is_rejected() -> None:
    """A scaled update (a model-replacement attack) fails the check; its honest twin passes."""
    honest = _adapter(5)
    scaled = {name: GLOBAL[name] + 1000 * (honest[name] - GLOBAL[name]) for name in SHAPES}
    good, bad = parse_replies(
        [
            reply(1, metrics=train_metrics(40), arrays=honest, site="bank-a"),
            reply(2, metrics=train_metrics(40), arrays=scaled, site="bank-b"),
        ],
        {},
        CHECK,
    )
    assert [r.site for r in good] == ["bank-a"]
    assert [(f.site, f.status) for f in bad] == [("bank-b", "rejected")]
    assert bad[0].reason.startswith("malformed update: update norm ")
    assert "exceeds the bound" in bad[0].reason


# ------------------------------------------------- parse_replies with a stand-in check ---


class RecordingCheck:
    """A check_update stand-in: records what it was given, answers as told."""

    def __init__(self, norm: float = 0.5, error: str | None = None) -> None:
        self.norm = norm
        self.error = error
        self.calls: list[tuple[ArrayRecord | None, dict[str, float]]] = []

    def __call__(
        self, record: ArrayRecord | None, metrics: dict[str, float]
    ) -> tuple[AdapterArrays, float]:
        self.calls.append((record, metrics))
        if self.error is not None:
            raise UpdateError(self.error)
        assert record is not None
        return record_to_arrays(record), self.norm


def test_check_update_gets_the_arrays_record_and_the_parsed_metrics() -> None:
    check = RecordingCheck(norm=0.25)
    arrays = _adapter(1)
    good, bad = parse_replies(
        [reply(3, metrics=train_metrics(50, steps=2), arrays=arrays, site="bank-a")], {}, check
    )
    assert bad == []
    ((record, metrics),) = check.calls
    assert isinstance(record, ArrayRecord)
    assert set(record) == set(SHAPES)
    assert metrics["steps"] == 2.0
    assert metrics["num-examples"] == 50.0
    assert good[0].norm == 0.25
    assert good[0].arrays is not None
    np.testing.assert_array_equal(good[0].arrays["q.lora_B"], arrays["q.lora_B"])


def test_check_update_gets_none_when_the_reply_has_no_adapter() -> None:
    check = RecordingCheck(error="reply carries no adapter")
    _, bad = parse_replies([reply(3, metrics=train_metrics(50), site="bank-a")], {}, check)
    assert [record for record, _ in check.calls] == [None]
    assert bad == [
        FailedReply(3, "bank-a", "rejected", "malformed update: reply carries no adapter")
    ]


def test_update_error_from_the_check_rejects_only_that_reply() -> None:
    check = RecordingCheck(error="payload of 9999 bytes exceeds the limit of 10")
    good, bad = parse_replies(
        [
            reply(3, metrics=train_metrics(50), arrays=_adapter(1), site="bank-a"),
            reply(4, metrics=train_metrics(50), arrays=_adapter(2), site="bank-b"),
        ],
        {},
        check,
    )
    assert good == []
    assert bad == [
        FailedReply(
            node,
            site,
            "rejected",
            "malformed update: payload of 9999 bytes exceeds the limit of 10",
        )
        for node, site in ((3, "bank-a"), (4, "bank-b"))
    ]


def test_the_check_is_not_run_for_errors_bad_metrics_or_identity_problems() -> None:
    check = RecordingCheck()
    known = {1: "bank-a"}
    replies = [
        error_reply(7, SITE_MISCONFIGURED, "no data"),
        reply(8, metrics={"num-examples": 5}, arrays=_adapter(1), site="bank-q"),
        reply(1, metrics=train_metrics(50), arrays=_adapter(2), site="bank-z"),
    ]
    good, bad = parse_replies(replies, known, check, TrainMetrics)
    assert good == []
    assert [(f.node_id, f.status) for f in bad] == [(7, "failed"), (8, "rejected"), (1, "rejected")]
    assert check.calls == []


def test_a_check_that_breaks_rejects_that_reply_only(caplog: pytest.LogCaptureFixture) -> None:
    """A reply is another party's data: whatever it makes a check raise, the round goes
    on without it, and the traceback is in the coordinator's log for the developers."""

    def broken(
        record: ArrayRecord | None, metrics: dict[str, float]
    ) -> tuple[AdapterArrays, float]:
        raise KeyError("steps")

    with caplog.at_level("ERROR"):
        good, bad = parse_replies(
            [reply(3, metrics=train_metrics(50), arrays=_adapter(1))], {}, broken
        )
    assert good == []
    assert [(f.status, f.reason) for f in bad] == [
        ("rejected", "the reply could not be checked (KeyError)")
    ]
    assert "checking a reply of node-3 failed" in caplog.text


# ---------------------------------------------------------------- readable_reason ---

RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=48213, ip=10.0.0.7, "
    "actor_id=5c1e9a0e4f, repr=<flwr.simulation.ray_transport.ray_actor.ClientAppActor "
    "object at 0x7f3c2a1b5e50>)\n"
    '  File "/opt/venv/lib/python3.11/site-packages/flwr/simulation/ray_transport/'
    'ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "\x1b[1m\x1b[31mflwr.clientapp.client_app.ClientAppException\x1b[0m: \n"
    "Exception ClientAppException occurred. Message: "
    "the site's process died during training (exit code 137)'>"
)
"""What Flower's simulation engine puts in an error reply when a ClientApp raised
(vce_api: str(type(ex)) + ":<'" + str(ex) + "'>", with Ray's coloured traceback)."""


def test_readable_reason_keeps_the_message_of_a_remote_traceback() -> None:
    assert "\x1b[" in RAY_REASON and "\n" in RAY_REASON
    assert readable_reason(RAY_REASON) == "the site's process died during training (exit code 137)"


def test_readable_reason_of_flowers_plain_client_app_format() -> None:
    """run_clientapp's format: "<class 'X'>:<'message'>", with ClientAppException's prefix."""
    reason = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
        "Exception ClientAppException occurred. Message: site data folder is empty'>"
    )
    assert readable_reason(reason) == "site data folder is empty"


@pytest.mark.parametrize("reason", [None, ""])
def test_readable_reason_without_a_reason(reason: str | None) -> None:
    assert readable_reason(reason) == "no reason given"


@pytest.mark.parametrize(
    "reason",
    [
        "  \n\t ",
        "\x1b[0m",
        "\x1b[31m \x1b[0m\n",
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nMessage: '>",
    ],
)
def test_readable_reason_with_nothing_readable_left(reason: str) -> None:
    """Whitespace, colour codes or an empty remote message are no reason either."""
    assert readable_reason(reason) == "no reason given"


def test_readable_reason_of_a_sites_own_one_line_reason_is_unchanged() -> None:
    reason = "site hospital-b has spent its privacy budget (ε 8.0 of 8.0)"
    assert readable_reason(reason) == reason


def test_readable_reason_folds_whitespace_and_strips_colours() -> None:
    reason = "\x1b[31mdisk\x1b[0m   full:\n\n  no space\tleft "
    assert readable_reason(reason) == "disk full: no space left"


def test_readable_reason_caps_long_text() -> None:
    text = readable_reason("Message: " + "x" * 5000 + "'>")
    assert len(text) == MAX_REASON_CHARS
    assert text == "x" * (MAX_REASON_CHARS - 1) + "…"
    exactly = "y" * MAX_REASON_CHARS
    assert readable_reason(exactly) == exactly
    assert readable_reason(exactly + "y") == "y" * (MAX_REASON_CHARS - 1) + "…"


def test_error_replies_carry_the_readable_reason() -> None:
    good, bad = parse_replies([error_reply(6, 0, RAY_REASON)], {6: "hospital-a"}, CHECK)
    assert good == []
    assert bad == [
        FailedReply(
            6, "hospital-a", "failed", "the site's process died during training (exit code 137)"
        )
    ]


# ---------------------------------------------------------------- missing_replies ---


def test_missing_replies_are_the_silent_nodes_by_name() -> None:
    replies = [
        reply(2, metrics=eval_metrics(40, 0.5, 0.5), message_type=MessageType.EVALUATE),
        error_reply(4, REFUSED_BY_POLICY, "no"),  # an error reply is an answer
        reply(9, metrics=eval_metrics(40, 0.5, 0.5)),  # not asked: not this function's concern
    ]
    missing = missing_replies([4, 3, 2, 1], replies, {3: "bank-c", 2: "bank-b"}, 30.0)
    assert missing == [
        FailedReply(1, "node-1", "timed-out", "no reply within 30 s"),
        FailedReply(3, "bank-c", "timed-out", "no reply within 30 s"),
    ]


def test_missing_replies_when_everyone_answered_or_nobody_was_asked() -> None:
    replies = [reply(n, metrics=eval_metrics(40, 0.5, 0.5)) for n in (1, 2)]
    assert missing_replies({1, 2}, replies, {}, 10) == []
    assert missing_replies(set(), replies, {}, 10) == []
    assert missing_replies(set(), [], {}, 10) == []


@pytest.mark.parametrize(("timeout", "text"), [(3600.0, "3600 s"), (2.5, "2.5 s"), (90, "90 s")])
def test_missing_replies_name_the_timeout(timeout: float, text: str) -> None:
    (missing,) = missing_replies(iter([5]), [], {}, timeout)
    assert missing == FailedReply(5, "node-5", "timed-out", f"no reply within {text}")


# ---------------------------------------------------------------- rollback_reason ---


def test_no_rollback_without_a_best_round() -> None:
    assert rollback_reason(0.1, None, None, 0.03) is None
    assert rollback_reason(0.1, 0.9, None, 0.03) is None


def test_a_drop_beyond_the_allowance_rolls_back() -> None:
    reason = rollback_reason(0.70, 0.80, 1, 0.03)
    assert reason is not None
    assert "accuracy 0.700" in reason
    assert "0.030 below" in reason
    assert "(0.800, round 1)" in reason
    assert "round 1 adapter is kept" in reason


def test_exactly_best_minus_drop_is_not_a_rollback() -> None:
    assert rollback_reason(0.80 - 0.03, 0.80, 1, 0.03) is None
    assert rollback_reason(0.5, 0.75, 2, 0.25) is None  # every number exact in binary
    assert rollback_reason(math.nextafter(0.5, 0.0), 0.75, 2, 0.25) is not None


@pytest.mark.parametrize("accuracy", [0.78, 0.80, 0.95])
def test_a_drop_within_the_allowance_or_a_gain_is_kept(accuracy: float) -> None:
    assert rollback_reason(accuracy, 0.80, 1, 0.03) is None


def test_a_zero_allowance_rolls_back_any_drop() -> None:
    assert rollback_reason(0.80, 0.80, 1, 0.0) is None
    assert rollback_reason(0.7999, 0.80, 1, 0.0) is not None


# ------------------------------------------------------------------ weighted_mean ---


@pytest.mark.parametrize(
    ("values", "weights"),
    [
        ([0.5], [3.0]),
        ([0.2, 0.8], [1.0, 1.0]),
        ([0.1, 0.4, 0.9], [100.0, 20.0, 5.0]),
        ([1.0, 2.0, 3.0], [0.0, 0.0, 2.0]),
    ],
)
def test_weighted_mean_matches_numpy(values: list[float], weights: list[float]) -> None:
    got = weighted_mean(values, weights)
    assert isinstance(got, float)
    assert got == pytest.approx(float(np.average(values, weights=weights)), rel=1e-12)


def test_weighted_mean_random() -> None:
    rng = np.random.default_rng(0)
    values, weights = rng.random(50), rng.integers(1, 500, 50).astype(float)
    assert weighted_mean(list(values), list(weights)) == pytest.approx(
        float(np.average(values, weights=weights)), rel=1e-12
    )


@pytest.mark.parametrize("weights", [[0.0, 0.0], [], [1.0, -1.0]])
def test_weighted_mean_needs_a_positive_sum(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean([1.0] * len(weights), weights)


def test_weighted_mean_needs_one_weight_per_value() -> None:
    with pytest.raises(ValueError):
        weighted_mean([1.0, 2.0], [1.0, 2.0, 3.0])


def test_metric_record_copies_the_values() -> None:
    values = {"eval-loss": 0.25, "sites": 3.0}
    record = metric_record(values)
    assert isinstance(record, MetricRecord)
    assert dict(record) == values
    values["eval-loss"] = 9.0
    assert record["eval-loss"] == 0.25


def test_a_node_cannot_change_or_borrow_a_site_name() -> None:
    known: dict[int, str] = {}
    first = [reply(1, site="bank-a", metrics=eval_metrics(5, 0.1, 0.9))]
    assert parse_replies(first, known, check_update=None)[1] == []
    good, bad = parse_replies(
        [
            reply(1, site="bank-b", metrics=eval_metrics(5, 0.1, 0.9)),
            reply(2, site="bank-a", metrics=eval_metrics(5, 0.1, 0.9)),
        ],
        known,
        check_update=None,
    )
    assert good == []
    assert [(f.node_id, f.status) for f in bad] == [(1, "rejected"), (2, "rejected")]
    assert "now claims to be bank-b" in bad[0].reason
    assert "already used by another node" in bad[1].reason
    assert known == {1: "bank-a"}


@pytest.mark.parametrize(
    "claimed", ["Bank-A", "bank_a", "b", "evil\u2028x", "a" * 64, "../etc", "bank a", ""]
)
def test_a_claimed_name_that_is_not_a_site_id_is_not_taken(claimed: str) -> None:
    """Site names go into signed logs and file names: only site ids are accepted."""
    known: dict[int, str] = {}
    _, bad = parse_replies([reply(4, metrics=None, site=claimed)], known, CHECK)
    assert known == {}
    assert bad[0].site == "node-4"


# ------------------------------------------------------------------ receipts ---


def test_a_receipt_hashes_the_arrays_as_the_site_does() -> None:
    adapter = _adapter(3)
    receipt = update_receipt(reply(5, metrics=train_metrics(40, epsilon=0.7), arrays=adapter))
    assert receipt.sha256 == adapter_sha256(adapter)
    assert (receipt.examples, receipt.epsilon) == (40.0, 0.7)


def test_a_receipt_reuses_decoded_arrays_and_never_decodes_an_oversized_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = _adapter(4)
    message = reply(6, metrics=train_metrics(40), arrays=adapter)

    def no_decoding(record: ArrayRecord) -> AdapterArrays:
        raise AssertionError("the payload was decoded")

    monkeypatch.setattr("server.strategy_utils.record_to_arrays", no_decoding)
    # Arrays validation already decoded: hashed as they are, not decoded again.
    assert update_receipt(message, arrays=adapter).sha256 == adapter_sha256(adapter)
    # Over the payload limit: the bytes as they came, with no decoding.
    record = message.content.array_records["arrays"]
    oversized = update_receipt(message, max_payload_bytes=record_payload_bytes(record) - 1)
    expected = hashlib.sha256(
        b"".join(name.encode() + bytes(array.data) for name, array in record.items())
    ).hexdigest()
    assert oversized.sha256 == "raw:" + expected
