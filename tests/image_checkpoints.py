"""Tiny random image checkpoints of every architecture the imaging task supports, saved
as a downloaded one is (``save_pretrained`` of the model and of its image processor),
for ``fedlora model init dicom-classification --from`` and the sites to load."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    BitImageProcessorPil,
    ConvNextConfig,
    ConvNextImageProcessorPil,
    ConvNextModel,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    PreTrainedModel,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SIDE = 32


@dataclass(frozen=True)
class Checkpoint:
    """How to make one kind of checkpoint, and what ``model init`` should make of it."""

    build: Callable[[], PreTrainedModel]
    processor: Callable[[], object] | None
    """An image processor to save beside it (None: a checkpoint without one)."""
    side: int = SIDE
    """The input side the processor (or config.json) says."""
    channels: int = 3


def _vit(channels: int) -> PreTrainedModel:
    config = ViTConfig(
        image_size=SIDE,
        patch_size=8,
        num_channels=channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,  # an "ImageNet" head of its own, which init replaces
    )
    return ViTForImageClassification(config)


def _deit() -> PreTrainedModel:
    """A distilled DeiT: config.json names the two-headed teacher variant."""
    config = DeiTConfig(
        image_size=SIDE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    return DeiTForImageClassificationWithTeacher(config)


def _dinov2() -> PreTrainedModel:
    """A DINOv2 backbone alone (no head), its position embeddings for 64-pixel inputs
    while its processor crops 32, as real DINOv2 checkpoints (518 vs 224)."""
    config = Dinov2Config(
        image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return Dinov2Model(config)


def _dinov2_registers() -> PreTrainedModel:
    config = Dinov2WithRegistersConfig(
        image_size=SIDE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_register_tokens=2,
    )
    return Dinov2WithRegistersForImageClassification(config)


def _swin() -> PreTrainedModel:
    config = SwinConfig(
        image_size=SIDE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        drop_path_rate=0.0,
        num_labels=5,
    )
    return SwinForImageClassification(config)


def _convnext() -> PreTrainedModel:
    """A ConvNeXt backbone alone."""
    return ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


def _convnextv2() -> PreTrainedModel:
    config = ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    return ConvNextV2ForImageClassification(config)


def _vit_processor(channels: int = 3) -> object:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([0.3], [0.2])
    return ViTImageProcessorPil(
        size={"height": SIDE, "width": SIDE}, image_mean=mean, image_std=std
    )


def _crop_processor() -> object:
    return BitImageProcessorPil(
        size={"shortest_edge": SIDE + 4},
        crop_size={"height": SIDE, "width": SIDE},
        do_center_crop=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def _convnext_processor() -> object:
    return ConvNextImageProcessorPil(
        size={"shortest_edge": SIDE}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )


CHECKPOINTS: dict[str, Checkpoint] = {
    "vit": Checkpoint(lambda: _vit(3), _vit_processor),
    "vit-grayscale": Checkpoint(lambda: _vit(1), lambda: _vit_processor(1), channels=1),
    "deit-distilled": Checkpoint(_deit, _vit_processor),
    "dinov2-backbone": Checkpoint(_dinov2, _crop_processor),
    "dinov2-registers": Checkpoint(_dinov2_registers, _crop_processor),
    "swin": Checkpoint(_swin, _vit_processor),
    "convnext-backbone": Checkpoint(_convnext, _convnext_processor),
    "convnextv2": Checkpoint(_convnextv2, None, side=224),
}
"""Name -> checkpoint. The ConvNeXt backbone's config.json keeps transformers' default
image_size (224) while its processor says 32 (init writes 32: no ConvNeXt weight
depends on it); ConvNeXt V2 comes without a processor, so its input is config.json's
224 with the demo normalisation."""
ARCHITECTURE_OF = {
    "vit": "vit",
    "vit-grayscale": "vit",
    "deit-distilled": "deit",
    "dinov2-backbone": "dinov2",
    "dinov2-registers": "dinov2_with_registers",
    "swin": "swin",
    "convnext-backbone": "convnext",
    "convnextv2": "convnextv2",
}


def save_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """Checkpoint ``name`` with random weights, saved as a download would be."""
    torch.manual_seed(seed)
    spec = CHECKPOINTS[name]
    spec.build().save_pretrained(directory)
    if spec.processor is not None:
        spec.processor().save_pretrained(directory)  # type: ignore[attr-defined]
    return directory
