"""The one DP trainer: what it trains, what it charges, and that it learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.data import SiteData, split_holdout
from client.privacy import epsilon_spent
from client.site import Site
from client.training import DPTrainer, TrainingPlan
from common.config import LoraSettings, load_site_config
from common.tasks import TASKS
from tests.conftest import write_site_config


def _hospital(small_scenario, site_workspace: Path, tmp_path: Path) -> Site:
    path = write_site_config(small_scenario, site_workspace, "hospital-a", tmp_path)
    return Site(load_site_config(path))


def _plan(**overrides: object) -> TrainingPlan:
    values: dict[str, object] = {
        "epochs": 1,
        "batch_size": 16,
        "learning_rate": 0.3,
        "max_grad_norm": 1.0,
        "noise_multiplier": 1.0,
        "accountant": "rdp",
    }
    values.update(overrides)
    return TrainingPlan(**values)  # type: ignore[arg-type]


def test_plan_matches_opacus_poisson_loader() -> None:
    plan = _plan(epochs=2, batch_size=16)
    assert plan.batches_per_epoch(100) == 7
    assert plan.sample_rate(100) == pytest.approx(1 / 7)
    assert plan.steps(100) == 14


def test_only_lora_and_head_change(small_scenario, untrained_workspace, tmp_path) -> None:
    site = _hospital(small_scenario, untrained_workspace, tmp_path)
    data = site.load_data()
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), LoraSettings(r=4)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    DPTrainer(model, site.task.input_names).train(data.train, _plan(), [])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    assert all(("lora_" in n) or ("classifier" in n) for n in changed), changed
    assert any("lora_B" in n for n in changed)


def test_history_is_extended_with_this_round(small_scenario, untrained_workspace, tmp_path) -> None:
    site = _hospital(small_scenario, untrained_workspace, tmp_path)
    data = site.load_data()
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), LoraSettings(r=4)
    )
    trainer = DPTrainer(model, site.task.input_names)
    plan = _plan(noise_multiplier=1.3)
    records = data.train.persons  # the privacy unit: people, not records
    earlier = [(2.0, 0.5, 3)]
    result = trainer.train(data.train, plan, earlier)
    assert result.steps == plan.steps(records)
    assert result.history[0] == earlier[0]
    sigma, rate, steps = result.history[-1]
    assert (sigma, steps) == (1.3, plan.steps(records))
    assert rate == pytest.approx(plan.sample_rate(records))
    # A second round carries the accountant on: ε only grows.
    second = trainer.train(data.train, plan, result.history)
    assert epsilon_spent(second.history, 1e-5, "rdp") > epsilon_spent(result.history, 1e-5, "rdp")
    assert sum(entry[2] for entry in second.history) == 3 + 2 * plan.steps(records)


def test_empty_poisson_batches_are_noise_steps() -> None:
    """With q = 1/40, most batches are empty; each is still a step the accountant sees."""
    spec = TASKS.get("tabular-classification")
    model = spec.model_class(
        spec.demo_config(num_numeric_features=2, categorical_cardinalities=[2])
    )
    peft_model = spec.wrap_with_lora(model, LoraSettings(r=2))
    rng = np.random.default_rng(0)
    data = SiteData(
        features={
            "numeric_values": rng.standard_normal((40, 2)).astype(np.float32),
            "categorical_ids": np.zeros((40, 1), dtype=np.int64),
        },
        labels=rng.integers(0, 2, 40).astype(np.int64),
        person_keys=[str(i) for i in range(40)],
        classes=["no", "yes"],
    )
    result = DPTrainer(peft_model, spec.input_names).train(data, _plan(batch_size=1), [])
    assert result.steps == 40
    assert result.history == [(1.0, pytest.approx(1 / 40), 40)]


def test_class_weights_scale_each_record_loss() -> None:
    trainer = DPTrainer(torch.nn.Identity(), ["x"], class_weights=[1.0, 3.0])
    logits = torch.zeros(2, 2)
    losses = trainer._per_sample_loss(logits, torch.tensor([0, 1]))
    assert losses.tolist() == pytest.approx([np.log(2), 3 * np.log(2)])


@pytest.mark.slow  # needs the pretrained imaging backbone (site_workspace)
def test_dp_training_learns_the_imaging_signal(small_scenario, site_workspace, tmp_path) -> None:
    site = _hospital(small_scenario, site_workspace, tmp_path)
    data = site.load_data()
    train, holdout = split_holdout(data.all, 0.25, seed=1)
    torch.manual_seed(0)
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), LoraSettings(r=8)
    )
    trainer = DPTrainer(model, site.task.input_names)
    baseline = trainer.evaluate(holdout).accuracy
    history: list = []
    for round_number in range(6):
        result = trainer.train(train, _plan(noise_multiplier=0.5, seed=round_number), history)
        history = result.history
    assert trainer.evaluate(holdout).accuracy >= max(0.8, baseline + 0.1)


def test_holdout_is_by_person_and_exact() -> None:
    keys = [f"p{i // 2}" for i in range(200)]  # 100 people, two records each
    data = SiteData(
        features={"x": np.arange(200, dtype=np.float32)},
        labels=np.zeros(200, dtype=np.int64),
        person_keys=keys,
        classes=["a", "b"],
    )
    train, holdout = split_holdout(data, 0.2, seed=0)
    assert holdout.persons == 20 and train.persons == 80
    assert not set(train.person_keys) & set(holdout.person_keys)
    again_train, _ = split_holdout(data, 0.2, seed=0)
    assert again_train.person_keys == train.person_keys


def _tabular(seed: int = 0, records: int = 40) -> tuple[torch.nn.Module, SiteData, tuple[str, ...]]:
    spec = TASKS.get("tabular-classification")
    torch.manual_seed(seed)
    model = spec.model_class(
        spec.demo_config(num_numeric_features=2, categorical_cardinalities=[2])
    )
    rng = np.random.default_rng(seed)
    numeric = rng.standard_normal((records, 2)).astype(np.float32)
    data = SiteData(
        features={
            "numeric_values": numeric,
            "categorical_ids": np.zeros((records, 1), dtype=np.int64),
        },
        labels=(numeric[:, 0] > 0).astype(np.int64),
        person_keys=[str(i) for i in range(records)],
        classes=["no", "yes"],
    )
    return spec.wrap_with_lora(model, LoraSettings(r=2)), data, tuple(spec.input_names)


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_every_grad_sample_mode_clips_to_the_same_step(mode: str) -> None:
    """Without noise, one full batch moves the weights the same in every Opacus mode:
    the modes differ in how per-sample norms are computed, not in what is clipped."""
    steps = {}
    for name in ("hooks", mode):
        model, data, inputs = _tabular()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        plan = _plan(batch_size=40, noise_multiplier=0.0, max_grad_norm=0.01, grad_sample_mode=name)
        result = DPTrainer(model, inputs).train(data, plan, [])
        assert result.steps == 1 and result.history[0][0] == 0.0
        steps[name] = {
            n: p.detach() - before[n] for n, p in model.named_parameters() if n in before
        }
    for name, moved in steps["hooks"].items():
        assert torch.allclose(steps[mode][name], moved, atol=1e-6), name


def test_ghost_clipping_takes_noise_steps_on_empty_batches() -> None:
    model, data, inputs = _tabular()
    plan = _plan(batch_size=1, grad_sample_mode="ghost")
    trainer = DPTrainer(model, inputs)
    result = trainer.train(data, plan, [])
    assert result.steps == 40
    assert result.history == [(1.0, pytest.approx(1 / 40), 40)]
    # Opacus's hooks are gone after a round: the same model trains again.
    assert trainer.train(data, plan, result.history).steps == 40


def test_a_plan_that_is_not_private_neither_clips_nor_charges() -> None:
    """The benchmarks' baseline: fixed batches, no Opacus, nothing for the accountant."""
    model, data, inputs = _tabular()
    # Adam at a small rate and a fixed seed: SGD with momentum at 0.05 diverged for some
    # shuffles (flaky), which said nothing about clipping.
    plan = _plan(
        batch_size=8,
        private=False,
        max_grad_norm=1e-6,
        learning_rate=0.01,
        optimizer="adam",
        seed=0,
    )
    earlier = [(2.0, 0.5, 3)]
    trainer = DPTrainer(model, inputs)
    first = trainer.evaluate(data).loss
    result = trainer.train(data, plan, earlier)
    assert result.steps == 5  # 40 people in batches of exactly 8
    assert result.history == earlier and result.round_entry == (0.0, 0.0, 5)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    # A clipping bound of 1e-6 would freeze a private run; this one learns (the loss
    # fell by 0.30-0.67 over twelve shuffle seeds).
    for _ in range(9):
        trainer.train(data, plan, [])
    assert trainer.evaluate(data).loss < first - 0.15
