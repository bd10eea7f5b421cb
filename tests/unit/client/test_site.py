"""A site's rules and its ClientApp: refusals, budget, calibration, and what leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from peft import get_peft_model_state_dict

from client.app import PRIVACY_STATE_KEY, build_client_app
from client.site import PrivacyState, Site
from common.adapters import arrays_to_record, record_to_arrays
from common.config import FederationConfig, LoraSettings, load_site_config
from common.errors import PolicyError, UpdateError
from common.protocol import (
    EVALUATE_METRICS,
    REFUSED_BY_POLICY,
    SITE_ID_KEY,
    TRAIN_METRICS,
    RoundRequest,
)
from common.tasks import TASKS, model_fingerprint
from server.run import full_model_bytes
from tests.conftest import write_site_config


def _site(scenario, workspace, tmp_path, site_id="hospital-a", **privacy) -> Site:
    return Site(
        load_site_config(write_site_config(scenario, workspace, site_id, tmp_path, **privacy))
    )


def _request(site: Site, server_round: int = 1, **overrides: object) -> RoundRequest:
    federation = FederationConfig(
        task=site.task.name,
        base_model=site.config.site.base_model,
        rounds=3,
        batch_size=16,
        lora=LoraSettings(r=4),
        **overrides,  # type: ignore[arg-type]
    )
    return RoundRequest.for_round(
        federation,
        model_fingerprint(site.config.site.base_model),
        server_round,
        site.task.default_lora_targets,
    )


def _global_adapter(site: Site, request: RoundRequest) -> dict[str, np.ndarray]:
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), request.lora
    )
    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def test_train_returns_an_adapter_within_budget(small_scenario, site_workspace, tmp_path) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, epsilon=6.0)
    request = _request(site)
    adapter = _global_adapter(site, request)
    outcome = site.train(request, adapter, PrivacyState(history=[]))
    assert set(outcome.adapter) == set(adapter)
    assert 0 < outcome.epsilon <= 6.0
    assert outcome.privacy.history and outcome.privacy.run_noise_multiplier is not None


def test_noise_is_calibrated_once_per_run_for_all_planned_rounds(
    small_scenario, site_workspace, tmp_path
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, epsilon=5.0)
    request = _request(site)
    records = site.load_data().train.accepted
    privacy = PrivacyState(history=[])
    sigmas, epsilons = [], []
    for server_round in (1, 2, 3):
        plan, privacy, epsilon_after = site.plan_round(
            _request(site, server_round), records, privacy
        )
        sigmas.append(plan.noise_multiplier)
        epsilons.append(epsilon_after)
        privacy = PrivacyState(
            [
                *privacy.history,
                (plan.noise_multiplier, plan.sample_rate(records), plan.steps(records)),
            ],
            privacy.run_noise_multiplier,
        )
    assert sigmas[0] == sigmas[1] == sigmas[2]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 5.0
    assert epsilons[2] > 4.9  # the plan uses the budget, not a fraction of it
    assert request.total_rounds == 3


def test_a_round_over_budget_is_refused(small_scenario, site_workspace, tmp_path) -> None:
    site = _site(small_scenario, site_workspace, tmp_path, epsilon=0.5)
    request = _request(site, dp={"noise_multiplier": 0.3})
    with pytest.raises(PolicyError, match=r"over the site's budget of 0\.50"):
        site.train(request, _global_adapter(site, request), PrivacyState(history=[]))


def test_foreign_task_and_base_model_are_refused(small_scenario, site_workspace, tmp_path) -> None:
    site = _site(small_scenario, site_workspace, tmp_path)
    request = _request(site)
    adapter = _global_adapter(site, request)
    wrong_task = RoundRequest(**{**request.__dict__, "task": "tabular-classification"})
    with pytest.raises(PolicyError, match="serves task 'dicom-classification'"):
        site.train(wrong_task, adapter, PrivacyState(history=[]))
    wrong_base = RoundRequest(**{**request.__dict__, "base_model_sha256": "0" * 64})
    with pytest.raises(PolicyError, match="base model"):
        site.train(wrong_base, adapter, PrivacyState(history=[]))


def test_too_few_people_is_refused(small_scenario, site_workspace, tmp_path) -> None:
    path = write_site_config(small_scenario, site_workspace, "hospital-a", tmp_path)
    text = path.read_text().replace("min_cohort = 20", "min_cohort = 500")
    path.write_text(text)
    site = Site(load_site_config(path))
    request = _request(site)
    with pytest.raises(PolicyError, match="fewer than its minimum cohort of 500"):
        site.train(request, _global_adapter(site, request), PrivacyState(history=[]))
    with pytest.raises(PolicyError, match="refuses to report metrics"):
        site.evaluate(request, _global_adapter(site, request))


def test_a_global_adapter_of_the_wrong_shape_is_rejected(
    small_scenario, site_workspace, tmp_path
) -> None:
    site = _site(small_scenario, site_workspace, tmp_path)
    request = _request(site)
    adapter = _global_adapter(site, request)
    name = next(iter(adapter))
    adapter[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(UpdateError, match="shape"):
        site.evaluate(request, adapter)


# ------------------------------------------------------------------ ClientApp ---


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _message(site: Site, request: RoundRequest, kind: str) -> Message:
    content = RecordDict(
        {
            "arrays": arrays_to_record(_global_adapter(site, request)),
            "config": request.to_record(),
        }
    )
    return Message(content, dst_node_id=1, message_type=kind)


def _context(config_path: Path) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(config_path)},
        state=RecordDict(),
        run_config={},
    )


def test_client_app_sends_only_the_adapter_and_keeps_its_accountant(
    small_scenario, site_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, site_workspace, "hospital-a", tmp_path)
    site = Site(load_site_config(config_path))
    request = _request(site)
    app = build_client_app()
    context = _context(config_path)

    reply = app(_message(site, request, MessageType.TRAIN), context)
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
    assert dict(reply.content.config_records["site"]) == {SITE_ID_KEY: "hospital-a"}
    text = json.dumps({k: dict(v) for k, v in reply.content.metric_records.items()})
    assert "MRN" not in text and "^" not in text
    assert set(TRAIN_METRICS) <= set(reply.content.metric_records["metrics"])
    # The accountant's history was stored in the node state before the reply went out.
    stored = context.state[PRIVACY_STATE_KEY]
    assert isinstance(stored, ConfigRecord) and len(stored["steps"]) == 1  # type: ignore[arg-type]
    second = app(_message(site, _request(site, 2), MessageType.TRAIN), context)
    assert (
        second.content.metric_records["metrics"]["epsilon"]
        > reply.content.metric_records["metrics"]["epsilon"]
    )


def test_client_app_turns_a_refusal_into_an_error_reply(
    small_scenario, site_workspace, tmp_path
) -> None:
    config_path = write_site_config(small_scenario, site_workspace, "bank-a", tmp_path, epsilon=0.2)
    site = Site(load_site_config(config_path))
    request = _request(site, dp={"noise_multiplier": 0.5})
    reply = build_client_app()(_message(site, request, MessageType.TRAIN), _context(config_path))
    assert reply.has_error()
    assert reply.error.code == REFUSED_BY_POLICY
    assert "bank-a refuses round 1" in (reply.error.reason or "")


def test_client_app_evaluates_on_held_out_people(small_scenario, site_workspace, tmp_path) -> None:
    config_path = write_site_config(small_scenario, site_workspace, "bank-b", tmp_path)
    site = Site(load_site_config(config_path))
    reply = build_client_app()(
        _message(site, _request(site), MessageType.EVALUATE), _context(config_path)
    )
    metrics = reply.content.metric_records["metrics"]
    assert set(EVALUATE_METRICS) <= set(metrics)
    assert metrics["num-examples"] == site.load_data().holdout.accepted
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0


def test_tasks_registry_has_both_site_kinds() -> None:
    assert {TASKS.get(name).site_kind for name in TASKS.names()} == {"hospital", "bank"}
