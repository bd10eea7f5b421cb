"""A site's rules and its ClientApp: refusals, budget, calibration, and what leaves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict
from peft import PeftModel, get_peft_model_state_dict

from client.app import build_client_app
from client.cli import check_report
from client.ledger import PrivacyLedger
from client.site import Site
from common.adapters import (
    adapter_sha256,
    arrays_to_record,
    is_lora_a,
    record_to_arrays,
    seeded_lora_a,
    without_lora_a,
)
from common.audit.log import read_entries, verify_log
from common.config import FederationConfig, LoraSettings, load_site_config
from common.errors import ConfigError, PolicyError, UpdateError
from common.protocol import (
    AUDIT_HEAD_HASH,
    AUDIT_HEAD_SEQ,
    AUDIT_KEY,
    REFUSED_BY_POLICY,
    SITE_ID_KEY,
    SITE_MISCONFIGURED,
    RoundRequest,
)
from common.replies import EVALUATE_METRICS, TRAIN_METRICS
from common.signing import fingerprint, load_public_key
from common.tasks import TASKS, model_fingerprint
from server.run import full_model_bytes
from tests.conftest import write_site_config
from tests.unit.client.rounds import initial_adapter, node_context, round_request, site_message


def _site(scenario, workspace, tmp_path, site_id="hospital-a", **privacy) -> Site:
    return Site(
        load_site_config(write_site_config(scenario, workspace, site_id, tmp_path, **privacy))
    )


@pytest.mark.slow  # trains a DP round of the pretrained imaging model (10+ s)
def test_train_returns_an_adapter_within_budget(small_scenario, site_workspace, tmp_path) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, epsilon=6.0)
    request = round_request(site)
    adapter = initial_adapter(site, request)
    outcome = site.train(request, adapter, run="run-1")
    assert set(outcome.adapter) == set(adapter)
    assert 0 < outcome.epsilon <= 6.0
    # The round is in the ledger on disk, and in the site's log.
    ledger = site.open_ledger(site.load_data().dataset)
    assert [(e.run, e.round) for e in ledger.state.entries] == [("run-1", 1)]
    assert ledger.epsilon() == pytest.approx(outcome.epsilon)
    assert [e["event"] for e in site.audit.events()] == [
        "run-planned",
        "policy-decision",
        "data-summary",
        "training-done",
    ]


def _charge(ledger: PrivacyLedger, site: Site, request: RoundRequest, run: str) -> float:
    """Plan a round and charge it to the ledger without training (what train() records)."""
    people = site.load_data().train.persons
    plan = site.plan_round(request, people, ledger, run)
    training = plan.training
    ledger.record_round(
        run,
        request.server_round,
        (training.noise_multiplier, training.sample_rate(people), training.steps(people)),
    )
    return plan.training.noise_multiplier


@pytest.mark.slow  # trains several DP rounds
def test_noise_is_calibrated_once_per_run_for_all_planned_rounds(
    small_scenario, site_workspace, tmp_path
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, epsilon=5.0)
    ledger = site.open_ledger(site.load_data().dataset)
    sigmas, epsilons = [], []
    for server_round in (1, 2, 3):
        sigmas.append(_charge(ledger, site, round_request(site, server_round), "run-1"))
        epsilons.append(ledger.epsilon())
    assert sigmas[0] == sigmas[1] == sigmas[2]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 5.0
    assert epsilons[2] > 4.9  # the plan uses the budget, not a fraction of it
    # A fourth round was never planned: the run cannot overspend what it asked for (a
    # request past total_rounds never parses; the planner refuses such a round anyway).
    fourth = round_request(site, 3).model_copy(update={"server_round": 4})
    with pytest.raises(PolicyError, match=r"over the site's budget|planned to reach"):
        site.plan_round(fourth, site.load_data().train.persons, ledger, "run-1")


@pytest.mark.slow  # trains rounds over two runs and a restart (15 s)
def test_budget_accumulates_across_runs_and_restarts(
    small_scenario, site_workspace, tmp_path
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, epsilon=5.0)
    dataset = site.load_data().dataset
    per_run = {"dp": {"epsilon_per_run": 2.0}}
    for run in ("run-1", "run-2"):
        ledger = Site(site.config).open_ledger(dataset)  # a restarted daemon each run
        for server_round in (1, 2, 3):
            _charge(ledger, site, round_request(site, server_round, **per_run), run)
    ledger = site.open_ledger(dataset)
    assert [r["run"] for r in ledger.runs()] == ["run-1", "run-2"]
    assert ledger.runs()[0]["epsilon_after"] == pytest.approx(2.0, abs=0.05)
    assert ledger.epsilon() == pytest.approx(4.0, abs=0.1)
    with pytest.raises(PolicyError, match=r"asks for ε=2\.00 but only 1\.0\d? .*left"):
        site.train(round_request(site, 1, **per_run), {}, run="run-3")
    assert site.audit.events()[-1]["event"] in ("policy-decision", "budget-refused")


def test_a_round_over_budget_is_refused_and_logged(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path, epsilon=0.5)
    request = round_request(site, dp={"noise_multiplier": 0.3})
    with pytest.raises(PolicyError, match=r"over the site's budget of 0\.50"):
        site.train(request, initial_adapter(site, request), run="run-1")
    refusal = site.audit.events()[-1]
    assert (
        refusal["event"] in ("policy-decision", "budget-refused") and "budget" in refusal["reason"]
    )
    assert site.open_ledger(site.load_data().dataset).state.entries == []


def test_foreign_task_and_base_model_are_refused(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path)
    request = round_request(site)
    adapter = initial_adapter(site, request)
    wrong_task = request.model_copy(update={"task": "tabular-classification"})
    with pytest.raises(PolicyError, match="serves task 'dicom-classification'"):
        site.train(wrong_task, adapter, run="run-1")
    wrong_base = request.model_copy(update={"base_model_sha256": "0" * 64})
    with pytest.raises(PolicyError, match="base model"):
        site.train(wrong_base, adapter, run="run-1")


def test_too_few_people_is_refused(small_scenario, untrained_workspace, tmp_path) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "hospital-a", tmp_path)
    text = path.read_text().replace("min_cohort = 20", "min_cohort = 500")
    path.write_text(text)
    site = Site(load_site_config(path))
    request = round_request(site)
    with pytest.raises(PolicyError, match="fewer than its minimum cohort of 500"):
        site.train(request, initial_adapter(site, request), run="run-1")
    with pytest.raises(PolicyError, match="refuses to report metrics"):
        site.evaluate(request, initial_adapter(site, request), run="run-1")


def test_a_global_adapter_of_the_wrong_shape_is_rejected(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path)
    request = round_request(site)
    adapter = initial_adapter(site, request)
    name = next(iter(adapter))
    adapter[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(UpdateError, match="shape"):
        site.evaluate(request, adapter, run="run-1")


# ------------------------------------------------------------------ ClientApp ---


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.mark.slow  # trains through the ClientApp
def test_client_app_sends_only_the_adapter_and_keeps_its_accountant(
    small_scenario, site_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, site_workspace, "hospital-a", tmp_path)
    site = Site(load_site_config(config_path))
    request = round_request(site)
    app = build_client_app()
    context = node_context(config_path)

    reply = app(site_message(site, request, MessageType.TRAIN), context)
    assert not reply.has_error(), reply.error
    # The payload is the LoRA state and the head, nothing else.
    assert list(reply.content.array_records) == ["arrays"]
    arrays = record_to_arrays(reply.content.array_records["arrays"])
    assert arrays and all(("lora_" in k) or ("classifier" in k) for k in arrays)
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), request.lora
    )
    payload = sum(a.nbytes for a in arrays.values())
    assert payload < 0.2 * full_model_bytes(model)
    # Aggregate numbers and the public site name only: nothing identifying.
    # (and where in its own audit log the update was recorded: a number and a hash)
    assert set(reply.content.config_records["site"]) == {
        SITE_ID_KEY,
        AUDIT_HEAD_SEQ,
        AUDIT_HEAD_HASH,
    }
    assert reply.content.config_records["site"][SITE_ID_KEY] == "hospital-a"
    text = json.dumps({k: dict(v) for k, v in reply.content.metric_records.items()})
    assert "MRN" not in text and "^" not in text
    assert set(TRAIN_METRICS) <= set(reply.content.metric_records["metrics"])
    # The round was charged to the site's ledger on disk before the reply went out.
    ledger = site.open_ledger(site.load_data().dataset)
    assert len(ledger.state.entries) == 1
    second = app(site_message(site, round_request(site, 2), MessageType.TRAIN), context)
    assert (
        second.content.metric_records["metrics"]["epsilon"]
        > reply.content.metric_records["metrics"]["epsilon"]
    )


@pytest.mark.slow  # calibrates (PRV) and trains through the ClientApp
def test_the_site_audits_joining_training_and_refusing_with_its_own_key(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    config_path = write_site_config(
        small_scenario, untrained_workspace, "bank-a", tmp_path, epsilon=3.0
    )
    site = Site(load_site_config(config_path))
    app, context = build_client_app(), node_context(config_path)

    introduction = app(
        Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context
    )
    details = introduction.content.config_records["site"]
    key = load_public_key(site.config.site.audit_key_path)
    assert details[AUDIT_KEY] == fingerprint(key)
    assert (site.config.site.audit_key_path.stat().st_mode & 0o777) == 0o600

    request = round_request(site)
    reply = app(site_message(site, request, MessageType.TRAIN), context)
    sent = record_to_arrays(reply.content.array_records["arrays"])
    # A second run asking for more ε than is left is refused: a budget refusal.
    with pytest.raises(PolicyError, match="asks for"):
        site.train(round_request(site, 1, dp={"epsilon_per_run": 2.9}), {}, run="run-2")

    events = site.audit.events()
    run = str(introduction.metadata.run_id)
    assert [e["event"] for e in events] == [
        "run-joined",
        "run-planned",
        "policy-decision",
        "data-summary",
        "training-done",
        "budget-refused",
    ]
    assert events[0] == {
        "event": "run-joined",
        "run": run,
        "task": "tabular-classification",
        "audit_key": fingerprint(key),
    }
    done = events[4]
    assert {value.dtype for value in sent.values()} == {np.dtype(request.update_dtype)}
    assert request.update_dtype == "float16"  # the federation default: half the bytes
    assert done["update_sha256"] == adapter_sha256(sent)  # what the coordinator will hash
    metrics = reply.content.metric_records["metrics"]
    assert done["epsilon_after"] == metrics["epsilon"] and done["epsilon_before"] == 0.0
    assert done["records"] == metrics["num-examples"] and done["round"] == 1
    summary = events[3]
    data = site.load_data()
    assert summary["records"] == len(data.all.labels)
    assert summary["people"] == data.all.persons
    assert sum(summary["class_counts"].values()) == len(data.all.labels)
    assert events[5]["run"] == "run-2" and "asks for ε=2.90" in events[5]["reason"]
    # The reply names the log entry the update was recorded in (the coordinator keeps it).
    logged = next(e for e in read_entries(site.audit.path) if e["event"] == "training-done")
    identity = reply.content.config_records["site"]
    assert (identity[AUDIT_HEAD_SEQ], identity[AUDIT_HEAD_HASH]) == (logged["seq"], logged["hash"])
    # Signed by the site's key, with an intact chain and head; no path in it.
    verification = verify_log(site.audit.path, key)
    assert verification.ok, verification.findings
    assert str(tmp_path) not in site.audit.path.read_text()


def test_client_app_turns_a_refusal_into_an_error_reply(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    config_path = write_site_config(
        small_scenario, untrained_workspace, "bank-a", tmp_path, epsilon=0.2
    )
    site = Site(load_site_config(config_path))
    request = round_request(site, dp={"noise_multiplier": 0.5})
    reply = build_client_app()(
        site_message(site, request, MessageType.TRAIN), node_context(config_path)
    )
    assert reply.has_error()
    assert reply.error.code == REFUSED_BY_POLICY
    assert "bank-a refuses round 1" in (reply.error.reason or "")


def test_client_app_evaluates_on_held_out_people(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, untrained_workspace, "bank-b", tmp_path)
    site = Site(load_site_config(config_path))
    reply = build_client_app()(
        site_message(site, round_request(site), MessageType.EVALUATE), node_context(config_path)
    )
    metrics = reply.content.metric_records["metrics"]
    assert set(EVALUATE_METRICS) <= set(metrics)
    assert metrics["num-examples"] == site.load_data().holdout.accepted
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0


def test_tasks_registry_serves_every_kind_of_site_data() -> None:
    assert {TASKS.get(name).data_kind for name in TASKS.names()} == {"dicom", "table", "text"}


def test_a_task_that_does_not_fit_the_data_is_refused(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path)
    config = load_site_config(path)
    config = config.model_copy(
        update={"site": config.site.model_copy(update={"task": "text-classification"})}
    )
    with pytest.raises(ConfigError, match="trains on text data, but \\[data\\] describes table"):
        Site(config)


def test_local_errors_leave_the_site_without_paths(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path)
    site = Site(load_site_config(config_path))
    request = round_request(site)
    broken = tmp_path / "broken.toml"
    broken.write_text(config_path.read_text().replace("loans.csv", "missing.csv"))
    reply = build_client_app()(site_message(site, request, MessageType.TRAIN), node_context(broken))
    assert reply.has_error()
    assert reply.error.code == SITE_MISCONFIGURED
    assert "data is unusable" in (reply.error.reason or "")
    assert str(tmp_path) not in (reply.error.reason or "")


def test_the_noise_does_not_depend_on_anything_the_server_sends(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    """Same request, same data, same global adapter: different noise, so the coordinator
    cannot regenerate it from the round's seed."""
    site = _site(small_scenario, untrained_workspace, tmp_path, epsilon=50.0)
    request = round_request(site, dp={"noise_multiplier": 1.0})
    adapter = initial_adapter(site, request)
    first = site.train(request, adapter, run="run-a").adapter
    second = site.train(request, adapter, run="run-b").adapter
    assert any(not np.array_equal(first[name], second[name]) for name in first)


def test_changed_data_needs_an_operator_to_start_a_new_budget(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    from click.testing import CliRunner

    from common.cli import cli

    config_path = write_site_config(small_scenario, untrained_workspace, "bank-b", tmp_path)
    site = Site(load_site_config(config_path))
    dataset = site.load_data().dataset
    site.open_ledger(dataset).record_round("run-1", 1, (1.0, 0.1, 10))
    with pytest.raises(PolicyError, match="data changed since it last trained"):
        site.open_ledger("f" * 64)  # what a site sees once its files changed
    # The operator's explicit decision is logged, and the old history stays listed.
    changed = tmp_path / "renamed-export.parquet"  # a re-export: the same rows, a new file
    changed.write_bytes(site.config.data.path.read_bytes())
    text = config_path.read_text().replace(str(site.config.data.path), str(changed))
    config_path.write_text(text)
    result = CliRunner().invoke(cli, ["site", "budget", str(config_path), "--accept-new-data"])
    assert result.exit_code == 0, result.output
    moved = Site(load_site_config(config_path))
    assert moved.open_ledger(moved.load_data().dataset).epsilon() == 0.0
    assert moved.audit.events()[-1]["event"] == "new-data-accepted"
    report = json.loads(
        CliRunner().invoke(cli, ["site", "budget", str(config_path), "--json"]).stdout
    )
    assert len(report["datasets"]) == 2


def test_a_delta_not_below_one_over_people_is_refused(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path, delta=0.009)
    with pytest.raises(PolicyError, match="is not below 1/"):
        site.plan_round(
            round_request(site), 200, site.open_ledger(site.load_data().dataset), "run-1"
        )


# ------------------------------------------------------------------- FFA-LoRA ---

FFA_SEED = 11


def _ffa_federation(site: Site, seed: int = FFA_SEED) -> FederationConfig:
    return FederationConfig(
        task=site.task.name,
        base_model=site.config.site.base_model,
        rounds=1,
        batch_size=16,
        learning_rate=0.5,
        aggregator="fedavg-ffa",
        seed=seed,
        lora=LoraSettings(r=4),
    )


def _ffa_request(federation: FederationConfig, freeze_lora_a: bool = True) -> RoundRequest:
    spec = TASKS.get(federation.task)
    return RoundRequest.for_round(
        federation,
        model_fingerprint(federation.base_model),
        1,
        spec.default_lora_targets,
        freeze_lora_a=freeze_lora_a,
    )


def _server_initial(
    federation: FederationConfig,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(initial global adapter, its frozen A matrices), built as server/run.py builds them."""
    spec = TASKS.get(federation.task)
    torch.manual_seed(federation.seed)
    model = spec.wrap_with_lora(spec.load_base_model(federation.base_model), federation.lora)
    initial = {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
    frozen = seeded_lora_a({k: v.shape for k, v in initial.items()}, federation.seed)
    initial.update(frozen)
    return initial, frozen


@pytest.mark.slow  # calibrates (PRV) and trains a DP round (3 s)
def test_an_ffa_round_trains_b_only_and_keeps_the_run_seeded_a(
    small_scenario, untrained_workspace, tmp_path, monkeypatch
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path, site_id="bank-a")
    federation = _ffa_federation(site)
    request = _ffa_request(federation)
    initial, frozen = _server_initial(federation)
    assert frozen and all(is_lora_a(name) for name in frozen)
    sent = without_lora_a(initial)
    assert not any(is_lora_a(name) for name in sent)

    built: list[PeftModel] = []
    build_model = Site.build_model

    def keep_model(self: Site, request: RoundRequest, adapter: dict[str, np.ndarray]) -> PeftModel:
        model = build_model(self, request, adapter)
        built.append(model)
        return model

    monkeypatch.setattr(Site, "build_model", keep_model)
    outcome = site.train(request, sent, run="ffa-run")

    # Only B and the head come back, with the schema the coordinator sent.
    assert set(outcome.adapter) == set(sent)
    assert not any(is_lora_a(name) for name in outcome.adapter)
    for name, value in outcome.adapter.items():
        assert value.shape == sent[name].shape, name
        assert value.dtype == np.dtype(request.update_dtype), name  # the wire's precision
    b_names = [name for name in sent if ".lora_B." in name]
    assert len(b_names) == len(frozen)
    for name in b_names:
        assert not np.array_equal(outcome.adapter[name], sent[name]), f"{name} did not train"
    assert outcome.epsilon > 0

    # The site's model: A is the run's seeded A, frozen, and did not move in training.
    (model,) = built
    a_parameters = {n: p for n, p in model.named_parameters() if is_lora_a(n)}
    assert len(a_parameters) == len(frozen)
    assert not any(p.requires_grad for p in a_parameters.values())
    b_parameters = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert b_parameters and all(p.requires_grad for p in b_parameters)
    state = get_peft_model_state_dict(model)
    for name, value in frozen.items():
        np.testing.assert_array_equal(state[name].detach().numpy(), value, err_msg=name)
    # And what the site reports is the model it trained, in the run's update precision.
    for name, value in outcome.adapter.items():
        sent_as = state[name].detach().numpy().astype(request.update_dtype)
        np.testing.assert_array_equal(sent_as, value, err_msg=name)

    # Evaluation under FFA fills in the same A: it matches evaluating B with the seeded A
    # sent explicitly, and differs from B with another seed's A. (A global adapter comes
    # back in float32, as the coordinator aggregates.)
    trained = {name: value.astype(np.float32) for name, value in outcome.adapter.items()}
    ffa_eval = site.evaluate(request, trained, run="ffa-run")
    plain = _ffa_request(federation, freeze_lora_a=False)
    with_a = site.evaluate(plain, {**trained, **frozen}, run="ffa-run")
    assert ffa_eval.loss == pytest.approx(with_a.loss, rel=1e-6, abs=1e-7)
    assert ffa_eval.accuracy == with_a.accuracy
    other_a = seeded_lora_a({k: v.shape for k, v in initial.items()}, FFA_SEED + 1)
    with_other_a = site.evaluate(plain, {**trained, **other_a}, run="ffa-run")
    assert with_other_a.loss != pytest.approx(ffa_eval.loss, rel=1e-6, abs=1e-7)


@pytest.mark.slow  # calibrates (PRV) and trains a DP round first (3 s)
def test_an_ffa_request_with_lora_a_in_the_adapter_is_refused(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    site = _site(small_scenario, untrained_workspace, tmp_path, site_id="bank-a")
    federation = _ffa_federation(site)
    request = _ffa_request(federation)
    initial, _frozen = _server_initial(federation)
    with pytest.raises(UpdateError, match=r"unexpected tensors: .*lora_A"):
        site.train(request, initial, run="ffa-run")
    with pytest.raises(UpdateError, match=r"unexpected tensors: .*lora_A"):
        site.evaluate(request, initial, run="ffa-run")
    # Refused before training: nothing was charged to the site's budget.
    assert site.open_ledger(site.load_data().dataset).state.entries == []
    # The other way round: a plain request needs the A matrices.
    plain = _ffa_request(federation, freeze_lora_a=False)
    with pytest.raises(UpdateError, match=r"missing tensors: .*lora_A"):
        site.evaluate(plain, without_lora_a(initial), run="ffa-run")


@pytest.mark.slow  # calibrates (PRV) and trains through the ClientApp (3 s)
def test_the_client_app_runs_an_ffa_round(small_scenario, untrained_workspace, tmp_path) -> None:
    config_path = write_site_config(small_scenario, untrained_workspace, "bank-b", tmp_path)
    site = Site(load_site_config(config_path))
    federation = _ffa_federation(site)
    request = _ffa_request(federation)
    initial, _frozen = _server_initial(federation)
    sent = without_lora_a(initial)
    app = build_client_app()

    def message(kind: str) -> Message:
        content = RecordDict({"arrays": arrays_to_record(sent), "config": request.to_record()})
        return Message(content, dst_node_id=1, message_type=kind)

    reply = app(message(MessageType.TRAIN), node_context(config_path))
    assert not reply.has_error(), reply.error
    arrays = record_to_arrays(reply.content.array_records["arrays"])
    assert set(arrays) == set(sent)
    assert sum(a.nbytes for a in arrays.values()) < sum(a.nbytes for a in initial.values())

    evaluation = app(message(MessageType.EVALUATE), node_context(config_path))
    assert not evaluation.has_error(), evaluation.error
    assert 0.0 <= evaluation.content.metric_records["metrics"]["eval-accuracy"] <= 1.0


def test_classes_that_do_not_fit_the_model_are_a_problem_before_any_round(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path)
    text = path.read_text()
    path.write_text(text.replace('    "default",\n]', '    "default",\n    "late",\n]', 1))
    report = check_report(path)
    assert report["ok"] is False
    assert any("names 3 classes but the base model has 2 outputs" in p for p in report["problems"])
