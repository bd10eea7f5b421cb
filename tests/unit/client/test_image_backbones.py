"""Real image backbones at a site: every supported architecture, imported with
``model init --from``, loads as a site loads it, trains only LoRA and the head, gets
correct per-sample gradients under Opacus and exports to ONNX; and a ViT-B/16-shaped
3-channel base trains one DP round at a site."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from opacus import GradSampleModule
from peft import PeftModel, get_peft_model_state_dict
from transformers import Dinov2Model, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from client.models import BaseModelCache
from client.site import SALT_FILE, Site
from common.adapters import AdapterLayout
from common.config import LoraSettings, load_site_config
from common.errors import ConfigError
from common.model_init import import_image_checkpoint
from common.offline import quiet_onnxruntime
from common.tasks.image_input import image_input
from common.tasks.imaging import IMAGE_ARCHITECTURES, IMAGING_TASK
from server.export import export_model
from simulations.generators.dicom import write_hospital
from tests.image_checkpoints import (
    ARCHITECTURE_OF,
    CHECKPOINTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    save_checkpoint,
)
from tests.unit.client.rounds import initial_adapter, round_request
from tests.unit.client.test_dp_correctness import _reference_per_sample_grads

CLASSES = ["normal", "lesion", "other"]
BATCH = 4


def _imported(name: str, root: Path) -> Path:
    source = save_checkpoint(name, root / "checkpoint")
    out = root / "base"
    out.mkdir()
    return import_image_checkpoint(source, out, CLASSES)


def _site_model(base: Path, lora: LoraSettings) -> PeftModel:
    """The base as a site's process builds it for a round: loaded by its cache,
    wrapped, the coordinator's initial adapter written in."""
    initial = IMAGING_TASK.wrap_with_lora(IMAGING_TASK.load_base_model(base), lora)
    adapter = {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(initial).items()}
    return BaseModelCache(IMAGING_TASK, base).model(lora, AdapterLayout(), adapter)


def test_every_supported_architecture_has_a_test_checkpoint() -> None:
    assert set(ARCHITECTURE_OF.values()) == set(IMAGE_ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_an_imported_checkpoint_loads_at_a_site_and_trains_only_lora_and_its_head(
    name: str, tmp_path: Path
) -> None:
    base = _imported(name, tmp_path)
    spec = CHECKPOINTS[name]
    assert image_input(base).size == spec.side
    assert image_input(base).channels == spec.channels
    model = _site_model(base, LoraSettings(r=4))
    architecture = IMAGE_ARCHITECTURES[ARCHITECTURE_OF[name]]
    assert type(model.get_base_model()).__name__ == architecture.class_name

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if ".lora_A." in n or ".lora_B." in n]
    head = [n for n in trainable if ".classifier.modules_to_save." in n]
    assert lora and sorted(n.rsplit(".", 1)[1] for n in head) == ["bias", "weight"]
    assert sorted(lora + head) == sorted(trainable), "only LoRA and the head train"
    for target in architecture.lora_targets:
        assert any(f".{target}.lora_A." in n for n in lora), target
    assert sum(p.numel() for p in trainable.values()) > 0
    assert any(not p.requires_grad for p in model.parameters())

    # The new head is zero: before training, no class is preferred.
    example = IMAGING_TASK.example_inputs(model.config)
    assert example["pixel_values"].shape == (1, spec.channels, spec.side, spec.side)
    with torch.no_grad():
        logits = model(**example).logits
    assert logits.shape == (1, len(CLASSES))
    assert torch.count_nonzero(logits) == 0


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's fallbacks
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_opacus_per_sample_gradients_match_torch_func(name: str, tmp_path: Path) -> None:
    """Opacus issue #820 for every architecture: its per-sample gradients of LoRA and
    the head (ConvNeXt's LoRA sits on linear layers over 4-D activations) equal an
    independent torch.func computation."""
    base = _imported(name, tmp_path)
    model = IMAGING_TASK.wrap_with_lora(IMAGING_TASK.load_base_model(base), LoraSettings(r=4))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B and the head start at zero; make every gradient non-trivial
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.1)
    model.train()
    side, channels = CHECKPOINTS[name].side, CHECKPOINTS[name].channels
    inputs = {"pixel_values": torch.randn(BATCH, channels, side, side)}
    labels = torch.tensor([0, 1, 2, 1])
    reference = _reference_per_sample_grads(model, inputs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, loss_reduction="mean")
        logits = wrapped(**inputs).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for parameter_name, parameter in trainable:
        np.testing.assert_allclose(
            parameter.grad_sample.detach().numpy(),  # type: ignore[attr-defined]
            reference[parameter_name].numpy(),
            atol=1e-5,
            rtol=1e-4,
            err_msg=parameter_name,
        )
    wrapped._close()


def test_lora_on_swins_windowed_attention_is_refused(tmp_path: Path) -> None:
    """Those layers see batch x windows rows: Opacus would clip per window, not per
    person (the gradient test above fails for them), so not even a run may ask."""
    base = _imported("swin", tmp_path)
    with pytest.raises(ConfigError, match="clip each window instead of each person"):
        IMAGING_TASK.wrap_with_lora(
            IMAGING_TASK.load_base_model(base), LoraSettings(target_modules=["q_proj", "fc1"])
        )


def test_a_dinov2_backbone_is_fitted_to_its_processors_crop(tmp_path: Path) -> None:
    """Position embeddings for 64 pixels, a processor cropping 32: the imported base
    holds them resampled for 32 and computes what the checkpoint computes at 32."""
    base = _imported("dinov2-backbone", tmp_path)
    fitted = IMAGING_TASK.load_base_model(base)
    assert fitted.config.image_size == 32
    original = Dinov2Model.from_pretrained(tmp_path / "checkpoint").eval()
    assert original.config.image_size == 64
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(pixel_values=images).last_hidden_state
        got = fitted.dinov2(pixel_values=images).last_hidden_state
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["vit", "swin", "convnext-backbone", "dinov2-registers"])
def test_an_imported_backbone_exports_to_onnx_and_int8(name: str, tmp_path: Path) -> None:
    """The artifact's path (merge, ONNX, int8) for a ViT, a Swin, a ConvNeXt and the
    DINOv2 variant whose traced position resampling ONNX cannot express."""
    base = _imported(name, tmp_path)
    model = IMAGING_TASK.wrap_with_lora(IMAGING_TASK.load_base_model(base), LoraSettings(r=4))
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.1)
    example = IMAGING_TASK.example_inputs(model.config)
    exported = export_model(
        model,
        example,
        tmp_path / "model.fp32.onnx",
        tmp_path / "model.int8.onnx",
        IMAGING_TASK.head_modules,
        prepare=IMAGING_TASK.prepare_export,
    )
    spec = CHECKPOINTS[name]
    assert exported.inputs["pixel_values"].shape == ["batch", spec.channels, spec.side, spec.side]
    assert exported.quantization.kept_fp32 == ["/model/classifier/Gemm"]
    quiet_onnxruntime()
    import onnxruntime

    images = torch.randn(3, spec.channels, spec.side, spec.side)
    with torch.no_grad():
        expected = model(pixel_values=images).logits.numpy()
    fp32 = onnxruntime.InferenceSession(str(exported.fp32))
    int8 = onnxruntime.InferenceSession(str(exported.int8))
    got = fp32.run(None, {"pixel_values": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    quantized = int8.run(None, {"pixel_values": images.numpy()})[0]
    assert np.abs(quantized - expected).max() < 0.1


def _vit_b16(directory: Path) -> Path:
    """A ViT-B/16 of random weights at 224 pixels, 3 channels, with an ImageNet
    processor: the shape of google/vit-base-patch16-224, as downloaded."""
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, num_channels=3, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(directory)
    processor = ViTImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    processor.save_pretrained(directory)
    return directory


def _hospital_site(root: Path, base: Path) -> Site:
    """A hospital of 30 patients (1-channel CT scans at 64 pixels) whose base is
    ``base``: its loader turns the scans into the base's 3 x 224 x 224 input (no
    data.image_size: the base model decides)."""
    data = root / "data"
    write_hospital(
        data, patients=30, classes=CLASSES[:2], class_weights=[0.5, 0.5], seed=4, modality="CT"
    )
    state = root / "state"
    state.mkdir()
    (state / SALT_FILE).write_bytes(hashlib.sha256(b"vit-b16").digest())
    document = {
        "site": {
            "id": "hospital-vit",
            "kind": "hospital",
            "task": IMAGING_TASK.name,
            "base_model": str(base),
            "state_dir": str(state),
        },
        "data": {
            "format": "dicom",
            "path": str(data),
            "classes": CLASSES[:2],
            "labels": "csv",
        },
        "privacy": {"epsilon": 8.0, "delta": 1e-4},
        "policy": {"min_cohort": 20},
    }
    path = root / "hospital-vit.toml"
    path.write_text(tomli_w.dumps(document))
    return Site(load_site_config(path))


@pytest.mark.slow  # a 86M-parameter ViT-B/16 at 224 pixels, one DP round on CPU
def test_a_vit_b16_base_trains_one_dp_round_at_a_site(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    import_image_checkpoint(_vit_b16(tmp_path / "vit-b16"), base, CLASSES[:2])
    assert json.loads((base / "preprocessor_config.json").read_text())["image_mean"] == (
        IMAGENET_MEAN
    )
    site = _hospital_site(tmp_path, base)
    loaded = site.load_data()
    assert loaded.train.features["pixel_values"].shape[1:] == (3, 224, 224)

    request = round_request(site, dp={"noise_multiplier": 1.0})
    adapter = initial_adapter(site, request)
    threads = torch.get_num_threads()
    # The tests' one thread is for tiny models; more than there are cores would spin.
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    try:
        outcome = site.train(request, adapter, run="run-1")
    finally:
        torch.set_num_threads(threads)
    assert set(outcome.adapter) == set(adapter)
    assert outcome.result.steps >= 1 and outcome.result.batched > 0
    assert 0 < outcome.epsilon <= 8.0
    moved = [n for n in adapter if not np.array_equal(outcome.adapter[n], adapter[n])]
    assert any("classifier" in n for n in moved), "the head trained"
