"""dicom-classification: a single-channel ViT image classifier."""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification

from common.tasks.base import TaskSpec


def demo_vit_config(
    *,
    image_size: int = 32,
    num_labels: int = 2,
    hidden_size: int = 64,
    layers: int = 2,
    patch_size: int = 4,
) -> ViTConfig:
    """A ViT of standard shape (MLP 4x wide), small enough to train under DP on CPU."""
    return ViTConfig(  # type: ignore[call-arg]  # num_labels goes to PretrainedConfig
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )


def _example_image(config: ViTConfig) -> dict[str, torch.Tensor]:
    side = config.image_size
    if not isinstance(side, int):
        raise ValueError(f"the imaging task takes square images; image_size is {side}")
    return {"pixel_values": torch.zeros(1, int(config.num_channels), side, side)}


IMAGING_TASK = TaskSpec(
    name="dicom-classification",
    data_kind="dicom",
    model_class=ViTForImageClassification,
    input_names=("pixel_values",),
    default_lora_targets=("q_proj", "v_proj"),
    head_modules=("classifier",),
    demo_config=demo_vit_config,
    example_inputs=_example_image,
)
