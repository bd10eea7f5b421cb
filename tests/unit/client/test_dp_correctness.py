"""DP-SGD does what it claims, checked against independent computations.

(a) Opacus's per-sample gradients of the LoRA parameters, and their clipped sum, equal a
    torch.func reference for each task's model. Some Opacus x peft version pairs have
    silently corrupted LoRA per-sample gradients (Opacus issue #820); this would catch it.
(b) The clipping bound and the noise standard deviation are the configured ones, checked
    statistically on the optimizer the trainer builds.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch.func import functional_call, grad, vmap

from client.data import SiteData
from client.training import DPTrainer, TrainingPlan
from common.config import LoraSettings
from common.tasks import TASKS

BATCH = 6
CLIP = 0.05  # small, so that most per-sample gradients really are clipped


def _model_and_inputs(task: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``task``, or ``text-classification:<architecture>``."""
    task, _, architecture = task.partition(":")
    spec = TASKS.get(task)
    torch.manual_seed(0)
    if task == "dicom-classification":
        config = spec.demo_config(image_size=16, hidden_size=32)
        inputs = {"pixel_values": torch.randn(BATCH, 1, 16, 16)}
    elif task == "text-classification":
        config = spec.demo_config(architecture=architecture, vocab_size=50, hidden_size=32)
        config._experts_implementation = "batched_mm"  # DeepSeek-V3's experts, vmap-able
        ids = torch.randint(1, 50, (BATCH, 10))
        ids[::2, 7:] = 0  # right padding on every other text
        inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    else:
        config = spec.demo_config(num_numeric_features=3, categorical_cardinalities=[2, 4])
        inputs = {
            "numeric_values": torch.randn(BATCH, 3),
            "categorical_ids": torch.tensor([[0, 1], [1, 4], [2, 0], [1, 2], [0, 3], [2, 4]]),
        }
    config._attn_implementation = "eager"  # torch.func's vmap over plain matmuls
    model = spec.wrap_with_lora(spec.new_model(config), LoraSettings(r=4))
    with torch.no_grad():  # LoRA B starts at zero; make every LoRA gradient non-trivial
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    model.train()  # Opacus records activations in training mode; every dropout here is 0
    return model, inputs


def _reference_per_sample_grads(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of_one(params: dict[str, torch.Tensor], sample: dict[str, Any], label: Any) -> Any:
        batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        logits = functional_call(model, {**params, **frozen, **buffers}, kwargs=batch).logits
        return torch.nn.functional.cross_entropy(logits, label.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0))(trainable, inputs, labels)


@pytest.mark.parametrize(
    "task",
    [
        "dicom-classification",
        "tabular-classification",
        "text-classification:deepseek_v3",
        "text-classification:qwen2",
        "text-classification:llama",
    ],
)
def test_opacus_lora_per_sample_gradients_match_torch_func(task: str) -> None:
    model, inputs = _model_and_inputs(task)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    reference = _reference_per_sample_grads(model, inputs, labels)
    assert any("lora_A" in n for n in reference) and any("lora_B" in n for n in reference)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, loss_reduction="mean")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = DPOptimizer(
            torch.optim.SGD([p for _, p in trainable], lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=CLIP,
            expected_batch_size=BATCH,
        )
        logits = wrapped(**inputs).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()

    # Raw per-sample gradients, parameter by parameter.
    for name, parameter in trainable:
        np.testing.assert_allclose(
            parameter.grad_sample.detach().numpy(),  # type: ignore[attr-defined]
            reference[name].numpy(),
            atol=1e-5,
            rtol=1e-4,
            err_msg=name,
        )
    # Clipped: each sample's whole gradient scaled to norm <= C, then summed.
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in reference.values()))
    factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    assert (norms > CLIP).sum() >= BATCH // 2, "the test should exercise clipping"
    optimizer.clip_and_accumulate()
    for name, parameter in trainable:
        expected = torch.einsum("i,i...->...", factors, reference[name])
        np.testing.assert_allclose(
            parameter.summed_grad.detach().numpy(),  # type: ignore[attr-defined]
            expected.numpy(),
            atol=1e-5,
            rtol=1e-4,
            err_msg=name,
        )


def _tiny_site_data(records: int = 64) -> SiteData:
    rng = np.random.default_rng(1)
    return SiteData(
        features={
            "numeric_values": rng.standard_normal((records, 3)).astype(np.float32),
            "categorical_ids": rng.integers(0, 3, (records, 2)).astype(np.int64),
        },
        labels=rng.integers(0, 2, records).astype(np.int64),
        person_keys=[f"p{i}" for i in range(records)],
        classes=["no", "yes"],
    )


def _trainer_optimizer(sigma: float, clip: float, batch: int) -> tuple[Any, int]:
    model, _ = _model_and_inputs("tabular-classification")
    trainer = DPTrainer(model, TASKS.get("tabular-classification").input_names)
    plan = TrainingPlan(
        epochs=1,
        batch_size=batch,
        learning_rate=0.1,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        accountant="rdp",
    )
    private = trainer.make_private(_tiny_site_data(), plan, [])
    return private, batch


def test_noise_standard_deviation_is_sigma_times_clip_over_batch() -> None:
    sigma, clip = 1.7, 0.5
    private, batch = _trainer_optimizer(sigma, clip, batch=16)
    optimizer = private.optimizer
    assert optimizer.noise_multiplier == sigma and optimizer.max_grad_norm == clip
    assert optimizer.expected_batch_size == batch
    samples = []
    for _ in range(20):
        for parameter in private.trainable:  # zero gradients: what remains is the noise
            parameter.grad_sample = parameter.new_zeros((batch, *parameter.shape))
        optimizer.pre_step()
        samples.append(torch.cat([p.grad.flatten() for p in private.trainable]))
        optimizer.zero_grad(set_to_none=True)
    noise = torch.cat(samples)
    assert noise.numel() > 20_000
    assert abs(float(noise.mean())) < 0.02 * sigma * clip / batch
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.03)


def _set_grad_samples(private: Any, batch: int, scale: torch.Tensor, seed: int) -> torch.Tensor:
    """Random per-sample gradients with per-sample norms set by ``scale``; returns the norms."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in private.trainable:
        direction = torch.randn((batch, *parameter.shape), generator=generator)
        parameter.grad_sample = direction * scale.view(-1, *[1] * parameter.dim())
    return torch.sqrt(
        sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in private.trainable)  # type: ignore[misc]
    )


def test_clipping_uses_the_configured_bound() -> None:
    clip, batch = 0.25, 8
    private, _ = _trainer_optimizer(0.0, clip, batch=batch)
    optimizer = private.optimizer
    scale = torch.exp(torch.linspace(-6, 4, batch))  # norms from far below to far above C
    norms = _set_grad_samples(private, batch, scale, seed=3)
    assert (norms < clip).any() and (norms > clip).any()
    optimizer.clip_and_accumulate()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    for parameter in private.trainable:
        expected = torch.einsum("i,i...->...", factors, parameter.grad_sample)
        torch.testing.assert_close(parameter.summed_grad, expected, atol=1e-6, rtol=1e-5)


def test_one_huge_gradient_contributes_exactly_the_bound() -> None:
    clip, batch = 0.25, 4
    private, _ = _trainer_optimizer(0.0, clip, batch=batch)
    scale = torch.tensor([1e4, 0.0, 0.0, 0.0])
    _set_grad_samples(private, batch, scale, seed=5)
    private.optimizer.clip_and_accumulate()
    total = torch.sqrt(sum(p.summed_grad.pow(2).sum() for p in private.trainable))  # type: ignore[misc]
    assert float(total) == pytest.approx(clip, rel=1e-5)
