"""parse_replies and weighted_mean: every reply is accepted or failed with its reason."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.adapters import AdapterSchema
from common.protocol import BAD_GLOBAL_ADAPTER, REFUSED_BY_POLICY, SITE_MISCONFIGURED
from server.strategy_utils import (
    FailedReply,
    SiteReply,
    metric_record,
    parse_replies,
    weighted_mean,
)
from tests.unit.server.replies import error_reply, eval_metrics, metadata, reply, train_metrics

SHAPES = {"q.lora_A": (2, 6), "q.lora_B": (6, 2), "classifier.weight": (2, 6)}


def _adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


SCHEMA = AdapterSchema.of(_adapter())


def test_good_train_reply_is_parsed() -> None:
    arrays = _adapter(1)
    known: dict[int, str] = {}
    good, bad = parse_replies(
        [reply(11, metrics=train_metrics(120, loss=0.4), arrays=arrays, site="bank-a")],
        known,
        SCHEMA,
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
    # The node is now known by its site name.
    assert known == {11: "bank-a"}


def test_refused_reply_keeps_the_sites_reason() -> None:
    known = {5: "hospital-b"}
    reason = "site hospital-b has spent its privacy budget"
    good, bad = parse_replies([error_reply(5, REFUSED_BY_POLICY, reason)], known, SCHEMA)
    assert good == []
    assert bad == [FailedReply(5, "hospital-b", "refused", reason)]


@pytest.mark.parametrize("code", [SITE_MISCONFIGURED, BAD_GLOBAL_ADAPTER, 0, 3])
def test_other_error_codes_are_failures(code: int) -> None:
    good, bad = parse_replies([error_reply(6, code, "boom")], {}, SCHEMA)
    assert good == []
    assert bad == [FailedReply(6, "node-6", "failed", "boom")]


def test_error_without_reason() -> None:
    _, bad = parse_replies([error_reply(6, SITE_MISCONFIGURED, None)], {}, SCHEMA)
    assert bad[0].reason == "no reason given"


def test_error_reply_does_not_change_the_known_sites() -> None:
    known = {5: "hospital-b"}
    parse_replies([error_reply(7, REFUSED_BY_POLICY, "no")], known, SCHEMA)
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
    good, bad = parse_replies(replies, {}, SCHEMA)
    assert [r.site for r in good] == ["bank-a", "bank-c"]
    assert [r.metrics["num-examples"] for r in good] == [10.0, 30.0]
    assert bad == [FailedReply(2, "bank-b", "rejected", expected)]


def test_reply_without_metrics_is_rejected() -> None:
    good, bad = parse_replies([reply(4, metrics=None, arrays=_adapter(), site="b")], {}, SCHEMA)
    assert good == []
    assert bad == [FailedReply(4, "b", "rejected", "expected one metric record, got 0")]


def test_metrics_without_num_examples_are_rejected() -> None:
    metrics = train_metrics(10)
    del metrics["num-examples"]
    _, bad = parse_replies([reply(4, metrics=metrics, arrays=_adapter())], {}, SCHEMA)
    assert bad == [FailedReply(4, "node-4", "rejected", "reply lacks metric(s) num-examples")]


def test_two_metric_records_are_rejected() -> None:
    message = reply(4, metrics=train_metrics(10), arrays=_adapter())
    message.content["more"] = MetricRecord({"num-examples": 3})
    _, bad = parse_replies([message], {}, SCHEMA)
    assert [f.reason for f in bad] == ["expected one metric record, got 2"]


def test_train_reply_without_adapter_is_rejected() -> None:
    _, bad = parse_replies([reply(8, metrics=train_metrics(10), site="a1")], {}, SCHEMA)
    assert bad == [FailedReply(8, "a1", "rejected", "reply carries no adapter")]


def test_adapter_under_another_record_name_is_rejected() -> None:
    message = reply(8, metrics=train_metrics(10))
    message.content["weights"] = ArrayRecord()
    _, bad = parse_replies([message], {}, SCHEMA)
    assert [f.reason for f in bad] == ["reply carries no adapter"]


def test_evaluation_replies_carry_metrics_only() -> None:
    replies = [
        reply(1, metrics=eval_metrics(40, 0.7, 0.6), site="h1", message_type=MessageType.EVALUATE),
        reply(2, metrics=eval_metrics(60, 0.5, 0.9), site="h2", message_type=MessageType.EVALUATE),
        error_reply(3, REFUSED_BY_POLICY, "cohort too small", MessageType.EVALUATE),
    ]
    good, bad = parse_replies(replies, {}, schema=None)
    assert [(r.site, r.arrays) for r in good] == [("h1", None), ("h2", None)]
    assert good[1].metrics == {"num-examples": 60.0, "eval-loss": 0.5, "eval-accuracy": 0.9}
    assert bad == [FailedReply(3, "node-3", "refused", "cohort too small")]


def test_evaluation_ignores_arrays_it_did_not_ask_for() -> None:
    message = reply(1, metrics=eval_metrics(4, 0.1, 0.2), arrays={"junk": np.zeros(2)})
    good, bad = parse_replies([message], {}, schema=None)
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
    good, bad = parse_replies(replies, known, schema=None)
    assert [r.site for r in good] == ["hospital-a", "node-22"]
    assert [f.site for f in bad] == ["hospital-a", "node-23"]
    assert known == {21: "hospital-a"}  # a fallback name is never bound to a node


def test_site_name_learnt_in_training_names_a_later_error() -> None:
    known: dict[int, str] = {}
    parse_replies(
        [reply(9, metrics=train_metrics(5), arrays=_adapter(), site="bank-z")], known, SCHEMA
    )
    _, bad = parse_replies([error_reply(9, REFUSED_BY_POLICY, "budget")], known, schema=None)
    assert bad[0].site == "bank-z"


def test_site_record_without_a_text_name_is_ignored() -> None:
    message = reply(30, metrics=eval_metrics(1, 0.0, 1.0))
    message.content["site"] = ConfigRecord({"site-id": 7})
    good, _ = parse_replies([message], {30: "bank-q"}, schema=None)
    assert good[0].site == "bank-q"


def test_replies_may_be_a_generator() -> None:
    good, bad = parse_replies(
        (reply(n, metrics=eval_metrics(n, 0.1, 0.2)) for n in (1, 2, 3)), {}, schema=None
    )
    assert [r.node_id for r in good] == [1, 2, 3]
    assert bad == []


def test_empty_replies() -> None:
    assert parse_replies([], {}, SCHEMA) == ([], [])


def test_a_reply_with_empty_content_is_rejected() -> None:
    good, bad = parse_replies([Message(RecordDict(), metadata=metadata(3))], {}, SCHEMA)
    assert good == []
    assert bad == [FailedReply(3, "node-3", "rejected", "expected one metric record, got 0")]


def test_list_valued_metric_rejects_only_that_reply() -> None:
    metrics = {**train_metrics(10), "per-class": [0.1, 0.9]}
    replies = [
        reply(1, metrics=metrics, arrays=_adapter(), site="bank-a"),
        reply(2, metrics=train_metrics(20), arrays=_adapter(), site="bank-b"),
    ]
    good, bad = parse_replies(replies, {}, SCHEMA)
    assert [r.site for r in good] == ["bank-b"]
    assert [(f.site, f.status) for f in bad] == [("bank-a", "rejected")]


def test_non_finite_update_is_rejected() -> None:
    poisoned = _adapter(4)
    poisoned["q.lora_A"][0, 0] = np.nan
    good, bad = parse_replies(
        [reply(1, metrics=train_metrics(10), arrays=poisoned, site="bank-a")], {}, SCHEMA
    )
    assert good == []
    assert [(f.site, f.status) for f in bad] == [("bank-a", "rejected")]


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
    assert parse_replies(first, known, schema=None)[1] == []
    good, bad = parse_replies(
        [
            reply(1, site="bank-b", metrics=eval_metrics(5, 0.1, 0.9)),
            reply(2, site="bank-a", metrics=eval_metrics(5, 0.1, 0.9)),
        ],
        known,
        schema=None,
    )
    assert good == []
    assert [(f.node_id, f.status) for f in bad] == [(1, "rejected"), (2, "rejected")]
    assert "now claims to be bank-b" in bad[0].reason
    assert "already used by another node" in bad[1].reason
    assert known == {1: "bank-a"}
