"""Fault injection for simulated sites: the corrupted adapters, the Flower mod around the
honest ClientApp, and the scenario fields that ask for them.

The ``crash`` kind trains a real model in a child process; the integration tests cover it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.adapters import (
    AdapterArrays,
    AdapterSchema,
    arrays_to_record,
    payload_bytes,
    record_to_arrays,
)
from common.config import FederationConfig, validate_model
from common.errors import ConfigError, UpdateError
from common.protocol import SITE_FAILED, RoundRequest
from simulations.faults import FaultInjection, corrupt_adapter, fault_mods
from simulations.runner import _generation_marker, generate_site_data
from simulations.scenario import BankSpec, Scenario, SiteBehaviour
from tests.conftest import SMALL_SCENARIO

CORRUPTING = ["nan", "inf", "wrong-shape", "missing-keys", "scaled", "oversized"]


def _sent() -> AdapterArrays:
    rng = np.random.default_rng(0)
    return {
        "m.layers.0.q.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "m.layers.0.q.lora_B.weight": np.zeros((8, 4), np.float32),
        "m.layers.0.v.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "m.layers.0.v.lora_B.weight": np.zeros((8, 4), np.float32),
        "m.classifier.weight": rng.standard_normal((2, 8)).astype(np.float32),
        "m.classifier.bias": np.zeros((2,), np.float32),
    }


def _trained(sent: AdapterArrays) -> AdapterArrays:
    rng = np.random.default_rng(1)
    return {
        name: (value + 0.01 * rng.standard_normal(value.shape)).astype(np.float32)
        for name, value in sent.items()
    }


def _copies(arrays: AdapterArrays) -> AdapterArrays:
    return {name: value.copy() for name, value in arrays.items()}


def _assert_same(got: AdapterArrays, expected: AdapterArrays) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].tobytes() == value.tobytes(), name


# ------------------------------------------------------------- corrupt_adapter ---


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_kinds_put_non_finite_values_in_one_tensor(kind: str) -> None:
    sent = _sent()
    trained = _trained(sent)
    kept = _copies(trained)
    corrupted = corrupt_adapter(kind, sent, trained, factor=1.0)
    assert set(corrupted) == set(trained)
    AdapterSchema.of(trained).check(corrupted)  # same names, shapes and dtypes
    bad = {name for name, value in corrupted.items() if not np.isfinite(value).all()}
    assert len(bad) == 1
    (name,) = bad
    value = corrupted[name]
    check = np.isnan if kind == "nan" else np.isposinf
    assert check(value).sum() == max(1, value.size // 10)
    # The rest of the tensor, and every other tensor, are what the site trained.
    np.testing.assert_array_equal(value[np.isfinite(value)], trained[name][np.isfinite(value)])
    for other in set(trained) - bad:
        np.testing.assert_array_equal(corrupted[other], trained[other])
    # The honest arrays were not modified in place.
    _assert_same(trained, kept)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_kinds_corrupt_even_a_single_element_tensor(kind: str) -> None:
    sent = {"m.classifier.bias": np.zeros((1,), np.float32)}
    corrupted = corrupt_adapter(kind, sent, {"m.classifier.bias": np.ones(1, np.float32)}, 1.0)
    assert not np.isfinite(corrupted["m.classifier.bias"]).any()


def test_non_finite_kinds_corrupt_a_fortran_ordered_tensor() -> None:
    trained = {"m.x.lora_A.weight": np.asfortranarray(np.ones((4, 8), np.float32))}
    corrupted = corrupt_adapter("nan", trained, trained, 1.0)
    assert np.isnan(corrupted["m.x.lora_A.weight"]).any()


def test_wrong_shape_changes_one_shape_and_fails_the_schema() -> None:
    sent = _sent()
    trained = _trained(sent)
    kept = _copies(trained)
    corrupted = corrupt_adapter("wrong-shape", sent, trained, factor=1.0)
    assert set(corrupted) == set(trained)
    changed = [name for name in trained if corrupted[name].shape != trained[name].shape]
    assert len(changed) == 1
    assert corrupted[changed[0]].dtype == trained[changed[0]].dtype
    with pytest.raises(UpdateError, match="shape"):
        AdapterSchema.of(sent).check(corrupted)
    _assert_same(trained, kept)


def test_missing_keys_drops_tensors_and_fails_the_schema() -> None:
    sent = _sent()
    trained = _trained(sent)
    corrupted = corrupt_adapter("missing-keys", sent, trained, factor=1.0)
    assert set(corrupted) < set(trained)
    assert corrupted  # some tensors remain: a partial update, not an empty one
    for name, value in corrupted.items():
        np.testing.assert_array_equal(value, trained[name])
    with pytest.raises(UpdateError, match="missing tensors"):
        AdapterSchema.of(sent).check(corrupted)


@pytest.mark.parametrize("factor", [1000.0, -3.0, 0.5])
def test_scaled_is_the_update_times_the_factor(factor: float) -> None:
    sent = _sent()
    trained = _trained(sent)
    kept = _copies(trained)
    corrupted = corrupt_adapter("scaled", sent, trained, factor=factor)
    AdapterSchema.of(trained).check(corrupted)
    for name in trained:
        expected = (sent[name] + factor * (trained[name] - sent[name])).astype(np.float32)
        assert corrupted[name].tobytes() == expected.tobytes(), name
    update = np.concatenate([(trained[n] - sent[n]).ravel() for n in sorted(trained)])
    scaled = np.concatenate([(corrupted[n] - sent[n]).ravel() for n in sorted(trained)])
    assert np.linalg.norm(scaled) == pytest.approx(abs(factor) * np.linalg.norm(update), rel=1e-4)
    _assert_same(trained, kept)


def test_scaled_by_one_and_zero() -> None:
    sent = _sent()
    trained = _trained(sent)
    by_one = corrupt_adapter("scaled", sent, trained, factor=1.0)
    by_zero = corrupt_adapter("scaled", sent, trained, factor=0.0)
    for name in trained:
        np.testing.assert_allclose(by_one[name], trained[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(by_zero[name], sent[name])


def test_oversized_adds_a_tensor_beyond_twice_the_payload() -> None:
    sent = _sent()
    trained = _trained(sent)
    corrupted = corrupt_adapter("oversized", sent, trained, factor=1.0)
    assert set(trained) < set(corrupted)
    assert payload_bytes(corrupted) > 2 * payload_bytes(trained)
    assert payload_bytes(corrupted) > 2 * AdapterSchema.of(sent).payload_bytes
    for name in trained:
        np.testing.assert_array_equal(corrupted[name], trained[name])
    with pytest.raises(UpdateError, match="unexpected tensors"):
        AdapterSchema.of(sent).check(corrupted)


@pytest.mark.parametrize("kind", ["error", "crash", "slow", "bogus"])
def test_kinds_that_do_not_corrupt_an_adapter_are_refused(kind: str) -> None:
    sent = _sent()
    with pytest.raises(ValueError, match="does not corrupt an adapter"):
        corrupt_adapter(kind, sent, _trained(sent), factor=1.0)


# ---------------------------------------------------------------- the Flower mod ---


def _request(server_round: int) -> RoundRequest:
    federation = FederationConfig(task="tabular-classification", base_model=Path("/m"), rounds=5)
    return RoundRequest.for_round(federation, "0" * 64, server_round, ("q_proj",))


def _instruction(kind: str = MessageType.TRAIN, server_round: int = 1) -> Message:
    content = RecordDict(
        {"arrays": arrays_to_record(_sent()), "config": _request(server_round).to_record()}
    )
    return Message(content, dst_node_id=1, message_type=kind)


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


class HonestSite:
    """A fake ``call_next``: replies with the trained adapter and records its calls."""

    def __init__(self, error: bool = False) -> None:
        self.calls: list[tuple[Message, Context]] = []
        self.replies: list[Message] = []
        self.error = error

    def __call__(self, message: Message, context: Context) -> Message:
        self.calls.append((message, context))
        if self.error:
            reply = Message(Error(code=7, reason="refused by policy"), reply_to=message)
        else:
            sent = record_to_arrays(message.content.array_records["arrays"])
            content = RecordDict(
                {
                    "arrays": arrays_to_record(_trained(sent)),
                    "metrics": MetricRecord({"num-examples": 100, "steps": 5}),
                    "site": ConfigRecord({"site-id": "bank-a"}),
                }
            )
            reply = Message(content, reply_to=message)
        self.replies.append(reply)
        return reply


def _mod(*behaviours: SiteBehaviour | None) -> FaultInjection:
    def resolve_site(context: Context) -> Path:
        raise AssertionError("only the crash kind resolves a site")

    return FaultInjection(tuple(behaviours), resolve_site)


def _arrays(reply: Message) -> AdapterArrays:
    return record_to_arrays(reply.content.array_records["arrays"])


@pytest.mark.usefixtures("flower_task_identity")
def test_honest_partitions_pass_through_untouched() -> None:
    mod = _mod(None, SiteBehaviour(kind="nan"), SiteBehaviour(kind="error"))
    site = HonestSite()
    message, context = _instruction(), _context(0)
    reply = mod(message, context, site)
    assert site.calls == [(message, context)]
    assert reply is site.replies[0]
    _assert_same(_arrays(reply), _trained(_sent()))


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", [*CORRUPTING, "error", "slow"])
def test_evaluate_messages_stay_honest(kind: str) -> None:
    mod = _mod(SiteBehaviour(kind=kind, delay=0.5))  # type: ignore[arg-type]
    site = HonestSite()
    message = _instruction(MessageType.EVALUATE)
    started = time.monotonic()
    reply = mod(message, _context(0), site)
    assert time.monotonic() - started < 0.4
    assert len(site.calls) == 1 and site.calls[0][0] is message
    assert reply is site.replies[0]
    _assert_same(_arrays(reply), _trained(_sent()))


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", CORRUPTING)
def test_a_faulty_site_trains_then_its_reply_is_corrupted(kind: str) -> None:
    mod = _mod(None, SiteBehaviour(kind=kind, factor=10.0))  # type: ignore[arg-type]
    site = HonestSite()
    message = _instruction()
    reply = mod(message, _context(1), site)
    assert len(site.calls) == 1
    assert not reply.has_error()
    expected = corrupt_adapter(kind, _sent(), _trained(_sent()), 10.0)
    got = _arrays(reply)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # Everything but the adapter is the honest reply's.
    assert reply.content.metric_records["metrics"]["num-examples"] == 100
    assert reply.content.config_records["site"]["site-id"] == "bank-a"
    # The instruction's own arrays are not touched.
    _assert_same(record_to_arrays(message.content.array_records["arrays"]), _sent())


@pytest.mark.usefixtures("flower_task_identity")
def test_error_replies_without_training() -> None:
    mod = _mod(SiteBehaviour(kind="error"))
    site = HonestSite()
    message = _instruction()
    reply = mod(message, _context(0), site)
    assert site.calls == []
    assert reply.has_error()
    assert reply.error.code == SITE_FAILED
    assert "injected fault" in (reply.error.reason or "")
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.metadata.dst_node_id == message.metadata.src_node_id


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", ["scaled", "error"])
def test_from_round_is_respected(kind: str) -> None:
    mod = _mod(SiteBehaviour(kind=kind, from_round=3))  # type: ignore[arg-type]
    for server_round in (1, 2):
        site = HonestSite()
        reply = mod(_instruction(server_round=server_round), _context(0), site)
        assert reply is site.replies[0], server_round
        _assert_same(_arrays(reply), _trained(_sent()))
    for server_round in (3, 4):
        site = HonestSite()
        reply = mod(_instruction(server_round=server_round), _context(0), site)
        if kind == "error":
            assert reply.has_error() and site.calls == []
        else:
            expected = corrupt_adapter(kind, _sent(), _trained(_sent()), 1000.0)
            _assert_same(_arrays(reply), expected)


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", CORRUPTING)
def test_a_reply_that_is_already_an_error_is_passed_on(kind: str) -> None:
    mod = _mod(SiteBehaviour(kind=kind))  # type: ignore[arg-type]
    site = HonestSite(error=True)
    reply = mod(_instruction(), _context(0), site)
    assert len(site.calls) == 1
    assert reply is site.replies[0]
    assert reply.has_error() and reply.error.code == 7
    assert reply.error.reason == "refused by policy"


@pytest.mark.usefixtures("flower_task_identity")
def test_slow_replies_late_but_honestly() -> None:
    mod = _mod(SiteBehaviour(kind="slow", delay=0.05))
    site = HonestSite()
    started = time.monotonic()
    reply = mod(_instruction(), _context(0), site)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.05
    assert elapsed < 2.0
    assert len(site.calls) == 1
    assert reply is site.replies[0]
    _assert_same(_arrays(reply), _trained(_sent()))


@pytest.mark.usefixtures("flower_task_identity")
def test_slow_is_not_late_before_its_first_round() -> None:
    mod = _mod(SiteBehaviour(kind="slow", delay=0.5, from_round=2))
    started = time.monotonic()
    mod(_instruction(server_round=1), _context(0), HonestSite())
    assert time.monotonic() - started < 0.4


def test_fault_mods_is_empty_when_every_site_is_honest() -> None:
    def resolve_site(context: Context) -> Path:
        return Path("site.toml")

    assert fault_mods([], resolve_site) == []
    assert fault_mods([None, None, None], resolve_site) == []
    behaviours = [None, SiteBehaviour(kind="nan"), None]
    (mod,) = fault_mods(behaviours, resolve_site)
    assert isinstance(mod, FaultInjection)
    assert mod.behaviours == tuple(behaviours)
    assert mod.resolve_site is resolve_site


# ---------------------------------------------------------------- the scenario ---


def _scenario_with(behaviours: dict[int, object]) -> dict[str, object]:
    document = copy.deepcopy(SMALL_SCENARIO)
    for index, behaviour in behaviours.items():
        document["sites"][index]["behaviour"] = behaviour  # type: ignore[index]
    return document


def test_scenario_accepts_behaviours() -> None:
    scenario = Scenario.model_validate(
        _scenario_with(
            {
                0: {"kind": "slow", "delay": 2.5},
                2: {"kind": "scaled", "factor": -4, "from_round": 2},
                3: {"kind": "crash", "crash_after_steps": 3},
            }
        )
    )
    hospital, honest, bank, crashing = scenario.sites
    assert hospital.behaviour == SiteBehaviour(kind="slow", delay=2.5)
    assert honest.behaviour is None
    assert bank.behaviour is not None
    assert (bank.behaviour.kind, bank.behaviour.factor, bank.behaviour.from_round) == (
        "scaled",
        -4.0,
        2,
    )
    assert crashing.behaviour is not None and crashing.behaviour.crash_after_steps == 3


def test_behaviour_defaults() -> None:
    behaviour = SiteBehaviour(kind="scaled")
    assert behaviour.factor == 1000.0
    assert behaviour.delay == 0.0
    assert behaviour.crash_after_steps == 1
    assert behaviour.from_round == 1


def test_scenario_rejects_an_unknown_behaviour_kind_readably() -> None:
    document = _scenario_with({2: {"kind": "exploding"}})
    with pytest.raises(ConfigError) as info:
        validate_model(Scenario, document, "scenario.toml")
    message = str(info.value)
    assert message.startswith("scenario.toml is invalid:")
    line = next(line for line in message.splitlines() if "behaviour.kind" in line)
    assert line.startswith("  - sites.2.")
    assert "Input should be" in line
    for kind in ("'nan'", "'scaled'", "'slow'", "'crash'"):
        assert kind in line


@pytest.mark.parametrize(
    ("behaviour", "field"),
    [
        ({"kind": "slow", "delay": -1}, "behaviour.delay"),
        ({"kind": "crash", "crash_after_steps": 0}, "behaviour.crash_after_steps"),
        ({"kind": "nan", "from_round": 0}, "behaviour.from_round"),
        ({"kind": "nan", "when": 2}, "behaviour.when: unknown key"),
        ({"factor": 3.0}, "behaviour.kind: required, but missing"),
    ],
)
def test_scenario_rejects_bad_behaviour_fields(behaviour: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"  - sites\.0\.hospital\.{field}"):
        validate_model(Scenario, _scenario_with({0: behaviour}), "scenario.toml")


def test_generation_marker_ignores_the_behaviour(tmp_path: Path) -> None:
    honest = Scenario.model_validate(SMALL_SCENARIO)
    faulty = Scenario.model_validate(_scenario_with({2: {"kind": "nan", "from_round": 2}}))
    honest_spec, faulty_spec = honest.sites[2], faulty.sites[2]
    assert isinstance(honest_spec, BankSpec) and isinstance(faulty_spec, BankSpec)
    assert faulty_spec.behaviour is not None
    assert _generation_marker(honest_spec, honest) == _generation_marker(faulty_spec, faulty)
    # It does change with what shapes the data (so the comparison above can fail).
    bigger = honest_spec.model_copy(update={"customers": honest_spec.customers + 1})
    assert _generation_marker(bigger, honest) != _generation_marker(honest_spec, honest)
    # And so the data a faulty site trains on is the data it had when honest.
    site_dir = tmp_path / "bank-a"
    assert generate_site_data(honest_spec, honest, site_dir) is True
    assert generate_site_data(faulty_spec, faulty, site_dir) is False
    assert generate_site_data(bigger, honest, site_dir) is True
