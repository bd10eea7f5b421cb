"""The round request: built from the federation config, carried as a ConfigRecord."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from pydantic import ValidationError

from common.config import DPSettings, FederationConfig, LoraSettings
from common.errors import UpdateError
from common.protocol import (
    BAD_GLOBAL_ADAPTER,
    REFUSED_BY_POLICY,
    SITE_CALIBRATED,
    SITE_ID_KEY,
    SITE_MISCONFIGURED,
    RoundRequest,
)
from common.tasks import TASKS

TABULAR = TASKS.get("tabular-classification")
SHA = "ab" * 32


def _federation(**overrides: object) -> FederationConfig:
    values: dict[str, object] = {
        "task": "tabular-classification",
        "base_model": Path("/models/ft"),
        "rounds": 9,
        "local_epochs": 2,
        "batch_size": 48,
        "learning_rate": 0.05,
        "optimizer": "adam",
        "seed": 11,
        "lora": LoraSettings(r=4, alpha=8),
        "dp": DPSettings(max_grad_norm=0.7, epsilon_per_run=3.0),
    }
    values.update(overrides)
    return FederationConfig.model_validate(values)


def test_for_round_copies_the_federation_settings() -> None:
    request = RoundRequest.for_round(
        _federation(), SHA, 3, TABULAR.default_lora_targets, run_id="run-7"
    )
    assert request == RoundRequest(
        task="tabular-classification",
        base_model_sha256=SHA,
        server_round=3,
        total_rounds=9,
        local_epochs=2,
        batch_size=48,
        learning_rate=0.05,
        optimizer="adam",
        max_grad_norm=0.7,
        noise_multiplier=SITE_CALIBRATED,
        epsilon_per_run=3.0,
        lora_r=4,
        lora_alpha=8.0,
        lora_targets=["q_proj", "v_proj"],
        freeze_lora_a=False,
        seed=11,
        run_id="run-7",
        update_dtype="float16",  # the federation default: half the traffic
    )


def test_noise_multiplier_none_means_site_calibrated() -> None:
    request = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",))
    assert SITE_CALIBRATED == -1.0
    assert request.noise_multiplier == SITE_CALIBRATED


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.5])
def test_explicit_noise_multiplier_is_kept(sigma: float) -> None:
    federation = _federation(dp=DPSettings(noise_multiplier=sigma))
    request = RoundRequest.for_round(federation, SHA, 1, ("q_proj",))
    assert request.noise_multiplier == sigma


def test_lora_targets_default_to_the_tasks() -> None:
    request = RoundRequest.for_round(_federation(), SHA, 1, TABULAR.default_lora_targets)
    assert request.lora_targets == list(TABULAR.default_lora_targets)
    assert isinstance(request.lora_targets, list)


def test_explicit_lora_targets_win_over_the_tasks() -> None:
    federation = _federation(lora=LoraSettings(target_modules=["q_proj", "k_proj"]))
    request = RoundRequest.for_round(federation, SHA, 1, ("q_proj", "v_proj"))
    assert request.lora_targets == ["q_proj", "k_proj"]


def test_lora_property_rebuilds_the_settings() -> None:
    request = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj", "v_proj"))
    assert request.lora == LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    assert request.lora.dropout == 0.0


def test_to_record_uses_dashed_keys() -> None:
    record = RoundRequest.for_round(_federation(), SHA, 2, ("q_proj",)).to_record()
    assert isinstance(record, ConfigRecord)
    assert set(record) == {
        "task",
        "base-model-sha256",
        "server-round",
        "total-rounds",
        "local-epochs",
        "batch-size",
        "learning-rate",
        "optimizer",
        "max-grad-norm",
        "noise-multiplier",
        "epsilon-per-run",
        "lora-r",
        "lora-alpha",
        "lora-targets",
        "freeze-lora-a",
        "seed",
        "run-id",
        "update-dtype",
    }
    assert record["server-round"] == 2
    assert record["base-model-sha256"] == SHA
    assert record["noise-multiplier"] == -1.0
    assert record["lora-targets"] == ["q_proj"]
    assert record["freeze-lora-a"] is False


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_lora_a_is_carried_over_the_wire(freeze: bool) -> None:
    request = RoundRequest.for_round(_federation(), SHA, 2, ("q_proj",), freeze_lora_a=freeze)
    assert request.freeze_lora_a is freeze
    record = request.to_record()
    contents = {key: obj.deflate() for key, obj in get_all_nested_objects(record).items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ConfigRecord)
    again = RoundRequest.from_record(inflated)
    assert again == request
    assert again.freeze_lora_a is freeze


@pytest.mark.parametrize("value", [1, 0, "true", 1.0])
def test_freeze_lora_a_must_be_a_bool(value: object) -> None:
    record = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",)).to_record()
    record["freeze-lora-a"] = value  # type: ignore[assignment]
    with pytest.raises(UpdateError, match="freeze_lora_a must be true or false"):
        RoundRequest.from_record(record)


@pytest.mark.parametrize("sigma", [None, 1.3])
def test_record_round_trip(sigma: float | None) -> None:
    federation = _federation(dp=DPSettings(noise_multiplier=sigma))
    request = RoundRequest.for_round(federation, SHA, 4, TABULAR.default_lora_targets)
    again = RoundRequest.from_record(request.to_record())
    assert again == request
    assert again.model_dump() == request.model_dump()
    assert isinstance(again.lora_targets, list)


def test_record_round_trip_through_a_copy() -> None:
    request = RoundRequest.for_round(_federation(), SHA, 4, TABULAR.default_lora_targets)
    copied = ConfigRecord(dict(request.to_record()))
    assert RoundRequest.from_record(copied) == request


def test_record_round_trip_over_flowers_wire_format() -> None:
    request = RoundRequest.for_round(_federation(), SHA, 4, TABULAR.default_lora_targets)
    record = request.to_record()
    contents = {key: obj.deflate() for key, obj in get_all_nested_objects(record).items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ConfigRecord)
    assert RoundRequest.from_record(inflated) == request


@pytest.mark.parametrize(
    "key", ["base-model-sha256", "lora-targets", "freeze-lora-a", "seed", "task"]
)
def test_missing_key_is_named(key: str) -> None:
    record = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",)).to_record()
    del record[key]
    with pytest.raises(UpdateError) as info:
        RoundRequest.from_record(record)
    assert str(info.value) == f"round configuration lacks {key!r}"


def test_underscored_keys_are_not_accepted() -> None:
    request = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",))
    record = ConfigRecord(dict(request.model_dump()))
    with pytest.raises(UpdateError, match="lacks 'base-model-sha256'"):
        RoundRequest.from_record(record)


def test_error_codes_are_distinct_and_outside_flowers_range() -> None:
    codes = {REFUSED_BY_POLICY, SITE_MISCONFIGURED, BAD_GLOBAL_ADAPTER}
    assert len(codes) == 3
    assert min(codes) >= 4000
    assert SITE_ID_KEY == "site-id"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("noise-multiplier", float("nan"), "noise_multiplier"),
        ("noise-multiplier", 0.0, "noise_multiplier"),
        ("noise-multiplier", -3.0, "noise_multiplier"),
        ("epsilon-per-run", float("inf"), "epsilon_per_run"),
        ("epsilon-per-run", 0.0, "epsilon_per_run"),
        ("max-grad-norm", float("nan"), "max_grad_norm"),
        ("learning-rate", -1.0, "learning_rate"),
        ("local-epochs", 0, "local_epochs"),
        ("batch-size", 0, "batch_size"),
        ("server-round", 10, "past total_rounds"),
    ],
)
def test_a_site_rejects_values_no_honest_coordinator_sends(
    key: str, value: float, message: str
) -> None:
    record = RoundRequest.for_round(_federation(), SHA, 3, TABULAR.default_lora_targets).to_record()
    record[key] = value
    with pytest.raises(UpdateError, match=message):
        RoundRequest.from_record(record)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 1001.0])
def test_a_federation_cannot_ask_for_a_noise_level_every_site_refuses(sigma: float) -> None:
    with pytest.raises(ValidationError, match="noise_multiplier"):
        DPSettings(noise_multiplier=sigma)


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch-size", True), ("seed", 1.5), ("lora-targets", "q_proj"), ("freeze-lora-a", 1)],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(key: str, value: object) -> None:
    record = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",)).to_record()
    record[key] = value  # type: ignore[assignment]
    with pytest.raises(UpdateError, match=key.replace("-", "_")):
        RoundRequest.from_record(record)


@pytest.mark.parametrize("run_id", ["", "1234567890", "run-2026.11_a"])
def test_a_run_id_of_plain_characters_is_accepted(run_id: str) -> None:
    request = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",), run_id=run_id)
    assert RoundRequest.from_record(request.to_record()).run_id == run_id


@pytest.mark.parametrize("run_id", ["../x", "a" * 65, "run 1", 7])
def test_a_run_id_that_could_name_a_path_or_is_not_text_is_refused(run_id: object) -> None:
    record = RoundRequest.for_round(_federation(), SHA, 1, ("q_proj",)).to_record()
    record["run-id"] = run_id  # type: ignore[assignment]
    with pytest.raises(UpdateError, match="run_id"):
        RoundRequest.from_record(record)


def test_a_record_from_a_coordinator_without_update_dtype_asks_for_float32() -> None:
    record = RoundRequest.for_round(_federation(), SHA, 2, ("q_proj",)).to_record()
    del record["update-dtype"]
    assert RoundRequest.from_record(record).update_dtype == "float32"
    del record["seed"]
    with pytest.raises(UpdateError, match="lacks 'seed'"):
        RoundRequest.from_record(record)


def test_an_unknown_update_dtype_is_refused() -> None:
    record = RoundRequest.for_round(_federation(), SHA, 2, ("q_proj",)).to_record()
    record["update-dtype"] = "int8"
    with pytest.raises(UpdateError, match="update_dtype must be one of float32, float16"):
        RoundRequest.from_record(record)
