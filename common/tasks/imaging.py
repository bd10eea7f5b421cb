"""dicom-classification: a single-channel ViT image classifier."""

from __future__ import annotations

from transformers import ViTConfig, ViTForImageClassification

from common.tasks.base import TaskSpec


def demo_vit_config(
    *, image_size: int = 32, num_labels: int = 2, hidden_size: int = 64, layers: int = 2
) -> ViTConfig:
    """A ViT small enough to train under DP on two CPU cores in seconds."""
    return ViTConfig(  # type: ignore[call-arg]  # num_labels goes to PretrainedConfig
        image_size=image_size,
        patch_size=4,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )


IMAGING_TASK = TaskSpec(
    name="dicom-classification",
    site_kind="hospital",
    model_class=ViTForImageClassification,
    input_names=("pixel_values",),
    default_lora_targets=("q_proj", "v_proj"),
    head_modules=("classifier",),
    demo_config=demo_vit_config,
)
