"""The rules both sides import: site ids, DP arithmetic, the adapter layout, replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import TensorDataset

from common import dp
from common.adapters import AdapterLayout, seeded_lora_a
from common.errors import UpdateError
from common.identifiers import is_site_id
from common.replies import (
    EVALUATE_METRICS,
    TRAIN_METRICS,
    ArtifactCheckMetrics,
    EvalMetrics,
    InstallMetrics,
    TrainMetrics,
)


@pytest.mark.parametrize("name", ["hospital-a", "b2", "a" * 63])
def test_site_ids_that_are_names(name: str) -> None:
    assert is_site_id(name)


@pytest.mark.parametrize("name", ["A", "-a", "a", "a" * 64, "../x", "a b", 7, None, "é-1"])
def test_site_ids_that_are_not(name: object) -> None:
    assert not is_site_id(name)


@pytest.mark.parametrize(("people", "batch"), [(1, 16), (15, 16), (16, 16), (17, 16), (1000, 7)])
def test_steps_and_sample_rate_are_opacus_own(people: int, batch: int) -> None:
    data = TensorDataset(torch.zeros(people, 1))
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(data, batch_size=batch))
    assert dp.sample_rate(people, batch) == loader.sample_rate
    assert dp.steps_per_round(people, batch, epochs=3) == 3 * len(loader)
    assert dp.expected_batch(people, batch) == max(1, int(people * loader.sample_rate))
    assert dp.max_steps_per_round(people, batch, 2) >= dp.steps_per_round(people, batch, 2)


def _adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "m.q.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "m.q.lora_B.weight": rng.normal(size=(8, 4)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 8)).astype(np.float32),
    }


def test_under_ffa_only_b_and_the_head_travel_and_a_is_regenerated() -> None:
    local = _adapter()
    layout = AdapterLayout(freeze_lora_a=True, seed=5)
    sent = layout.trained(local)
    assert set(sent) == {"m.q.lora_B.weight", "head.weight"}
    whole = layout.complete(sent, local)
    expected_a = seeded_lora_a({"m.q.lora_A.weight": (4, 8)}, 5)["m.q.lora_A.weight"]
    np.testing.assert_array_equal(whole["m.q.lora_A.weight"], expected_a)
    with pytest.raises(UpdateError):
        layout.complete(local, local)  # A must not be sent under FFA


def test_without_ffa_everything_travels() -> None:
    local = _adapter()
    layout = AdapterLayout()
    assert layout.trained(local) == local and layout.frozen(local) == {}
    assert set(layout.complete(local, local)) == set(local)
    with pytest.raises(UpdateError):
        layout.complete(layout.trained({k: v for k, v in local.items() if "head" not in k}), local)


def test_replies_round_trip_and_name_their_keys() -> None:
    train = TrainMetrics(
        num_examples=120, epsilon=1.5, epsilon_budget=8, delta=1e-5, noise_multiplier=1.1, steps=9
    )
    assert set(train.to_record()) == set(TRAIN_METRICS)
    assert TrainMetrics.from_values(dict(train.to_record())) == train
    assert EVALUATE_METRICS == ("num-examples", "eval-loss", "eval-accuracy")
    check = ArtifactCheckMetrics(
        num_examples=30, fp32_accuracy=0.9, fp32_loss=0.3, int8_accuracy=0.9, int8_loss=0.3
    )
    assert "fp32-auc" not in check.to_record()
    assert InstallMetrics.from_values({"installed": 1}).installed == 1


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"num-examples": 10, "eval-loss": 0.1}, r"reply lacks metric\(s\) eval-accuracy"),
        ({"num-examples": 10.5, "eval-loss": 0.1, "eval-accuracy": 1}, "positive whole"),
        ({"num-examples": 0, "eval-loss": 0.1, "eval-accuracy": 1}, "positive whole"),
        ({"num-examples": 10, "eval-loss": math.nan, "eval-accuracy": 1}, "not finite"),
        ({"num-examples": True, "eval-loss": 0.1, "eval-accuracy": 1}, "not a number"),
        ({"num-examples": 10, "eval-loss": "0.1", "eval-accuracy": 1}, "not a number"),
    ],
)
def test_a_reply_of_the_wrong_kind_is_refused_with_its_reason(values, reason) -> None:
    with pytest.raises(UpdateError, match=reason):
        EvalMetrics.from_values(values)
