"""dicom-classification: a transformers image classifier over a site's scans.

The default backbone is fedlora's demo ViT (1 channel, pretrained on public synthetic
images, :mod:`common.tasks.imaging_pretext`). A deployment can bring any local
checkpoint of the architectures in :data:`IMAGE_ARCHITECTURES` (ViT, DeiT, DINOv2, Swin,
ConvNeXt), with 1 or 3 input channels, at its own input size and normalisation
(:func:`common.tasks.image_input.image_input`); ``fedlora model init dicom-classification
--from DIR`` gives it the task's head.

Where LoRA goes depends on the architecture (:func:`lora_targets_for`); the head that
trains in full is ``classifier`` in every one of them (a linear layer over the pooled
features), which a loaded base is checked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTForImageClassification

from common.errors import ConfigError
from common.tasks.base import TaskSpec, name_classes
from common.tasks.image_input import image_input

HEAD = "classifier"
"""The classification head's module name, the same in every supported architecture."""
ATTENTION_TARGETS = ("q_proj", "v_proj")
POINTWISE_TARGETS = ("pwconv1", "pwconv2")
MLP_TARGETS = ("fc1", "fc2")
WINDOW_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ImageArchitecture:
    """One image-classification family fedlora trains: its transformers class (by name,
    imported on first use) and the modules LoRA adapts by default."""

    class_name: str
    lora_targets: tuple[str, ...]
    per_window: tuple[str, ...] = ()
    """Linear layers that run on windows folded into the batch axis (Swin's windowed
    attention sees batch x windows rows): Opacus's hooks would take each window for a
    person, so LoRA there is refused."""

    def model_class(self) -> type[PreTrainedModel]:
        found: type[PreTrainedModel] = getattr(transformers, self.class_name)
        return found


IMAGE_ARCHITECTURES: dict[str, ImageArchitecture] = {
    # Vision transformers: the query and value projections of every attention block,
    # LoRA's original placement (and the demo ViT's); transformers 5 names them
    # q_proj / v_proj.
    "vit": ImageArchitecture("ViTForImageClassification", ATTENTION_TARGETS),
    "deit": ImageArchitecture("DeiTForImageClassification", ATTENTION_TARGETS),
    "dinov2": ImageArchitecture("Dinov2ForImageClassification", ATTENTION_TARGETS),
    "dinov2_with_registers": ImageArchitecture(
        "Dinov2WithRegistersForImageClassification", ATTENTION_TARGETS
    ),
    # Swin attends within windows that it folds into the batch axis, so per-sample
    # gradients of LoRA on its attention would be per window (Opacus's hooks see
    # batch x windows rows; the test of issue #820's kind catches it). Its MLP runs on
    # whole images: LoRA on both of its linear layers, in every block.
    "swin": ImageArchitecture("SwinForImageClassification", MLP_TARGETS, WINDOW_ATTENTION),
    # ConvNeXt has no attention: its blocks are a 7x7 depthwise conv (49
    # weights per channel) and an MLP of two pointwise convs written as linear layers,
    # which hold almost all of the block's weights; LoRA goes there.
    "convnext": ImageArchitecture("ConvNextForImageClassification", POINTWISE_TARGETS),
    "convnextv2": ImageArchitecture("ConvNextV2ForImageClassification", POINTWISE_TARGETS),
}
"""``model_type`` (config.json) -> how fedlora trains it."""


def image_architecture(model_type: str) -> ImageArchitecture:
    """The supported architecture of ``model_type``, or a ConfigError naming them all."""
    found = IMAGE_ARCHITECTURES.get(model_type)
    if found is None:
        raise ConfigError(
            f"{model_type!r} image models are not supported by the imaging task; "
            f"supported: {', '.join(sorted(IMAGE_ARCHITECTURES))}"
        )
    return found


def image_model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class a saved image base is loaded as: the architecture's classifier, chosen
    by fedlora rather than by config.json's ``architectures`` (a distilled DeiT names
    its two-headed teacher variant, which has no ``classifier``)."""
    return image_architecture(config.model_type).model_class()


def lora_targets_for(config: PretrainedConfig) -> tuple[str, ...]:
    """Default LoRA targets of an image base (see :data:`IMAGE_ARCHITECTURES`)."""
    return image_architecture(config.model_type).lora_targets


def check_lora_targets(config: PretrainedConfig, targets: Sequence[str]) -> None:
    """Refuse LoRA on layers whose per-sample gradients DP-SGD cannot get right here."""
    architecture = image_architecture(config.model_type)
    folded = sorted(set(targets) & set(architecture.per_window))
    if folded:
        raise ConfigError(
            f"LoRA on {', '.join(folded)} of a {config.model_type} model is refused: those "
            "layers run on image windows folded into the batch, so DP-SGD would clip "
            f"each window instead of each person; use {', '.join(architecture.lora_targets)}"
        )


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


def _example_image(config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """One image of the model's channels and side, from config.json (``model init``
    writes both there, and a loaded base is checked to agree with its processor)."""
    side = config.image_size
    if not isinstance(side, int):
        raise ValueError(f"the imaging task takes square images; image_size is {side}")
    return {"pixel_values": torch.zeros(1, int(config.num_channels), side, side)}


def new_head(model: PreTrainedModel, classes: list[str]) -> None:
    """Replace the head by a zero-initialised one for ``classes``: before federated
    training the model predicts no class over another, whatever the backbone knows."""
    old = model.get_submodule(HEAD)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"the model's {HEAD} is a {type(old).__name__}, not a linear layer")
    head = nn.Linear(old.in_features, len(classes), dtype=old.weight.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(model, HEAD, head)
    name_classes(model.config, classes)


def fit_input_side(model: PreTrainedModel, side: int) -> PreTrainedModel:
    """The model rebuilt for ``side`` x ``side`` inputs when config.json says another
    size than its processor (a DINOv2 checkpoint: position embeddings for its 518-pixel
    pretraining, a processor that crops 224).

    Position-embedding tables are resampled once by the model's own
    ``interpolate_pos_encoding`` (what its forward would do at every call), so that
    config.image_size is the input the sites feed and the export traces. Models whose
    weights do not depend on the size (ConvNeXt, Swin) only get the new image_size.
    """
    config = model.config
    old = config.image_size
    if old == side:
        return model
    if not isinstance(old, int):
        raise ConfigError(f"config.json image_size {old!r} is not a square size")
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    state = model.state_dict()
    for name, module in model.named_modules():
        table = getattr(module, "position_embeddings", None)
        if not isinstance(table, nn.Parameter):
            continue
        if not hasattr(module, "interpolate_pos_encoding"):
            raise ConfigError(
                f"the model's {name} position embeddings are for {old}-pixel inputs and "
                f"cannot be resampled to {side}, its processor's size"
            )
        special = table.shape[1] - (old // patch) ** 2
        dummy = torch.zeros(1, special + (side // patch) ** 2, table.shape[2], dtype=table.dtype)
        with torch.no_grad():
            state[f"{name}.position_embeddings"] = module.interpolate_pos_encoding(
                dummy, side, side
            ).contiguous()
    new_config = config.__class__.from_dict({**config.to_dict(), "image_size": side})
    rebuilt = type(model)(new_config)
    nn.Module.to(rebuilt, next(model.parameters()).dtype)  # keep the checkpoint's dtype
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"the model cannot be refitted from {old}- to {side}-pixel inputs: {exc}"
        ) from None
    return rebuilt


def _export_kernels(model: nn.Module) -> None:
    """Position embeddings as stored, not resampled, while the export traces: the
    transformers ViT family resamples them at every traced call (so that a graph would
    take other sizes), and DINOv2-with-registers does so with an antialiased bicubic
    kernel that ONNX cannot express. The artifact's input size is fixed, and a base that
    fedlora loads has its tables for exactly that size (see :func:`fit_input_side`)."""
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        resample = getattr(module, "interpolate_pos_encoding", None)
        if isinstance(table, nn.Parameter) and callable(resample):
            # A plain attribute on the instance: it shadows the method of the class.
            object.__setattr__(
                module, "interpolate_pos_encoding", _stored_when_sizes_match(module, resample)
            )


def _stored_when_sizes_match(
    module: nn.Module, resample: Callable[[torch.Tensor, int, int], torch.Tensor]
) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    def positions(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        table = module.position_embeddings
        assert isinstance(table, torch.Tensor)
        if embeddings.shape[1] == table.shape[1] and height == width:
            return table
        return resample(embeddings, height, width)

    return positions


def _check_image_base(model: PreTrainedModel, directory: Path) -> None:
    """What a site needs of an image base before it trains: a supported architecture,
    loaded as the class with the ``classifier`` head, and one input size that its
    processor and config.json agree on (the loader feeds one, the export traces the
    other)."""
    architecture = image_architecture(model.config.model_type)
    if type(model).__name__ != architecture.class_name:
        raise ConfigError(
            f"the base model in {directory} is a {type(model).__name__}; the imaging task "
            f"trains {architecture.class_name} (make it with `fedlora model init "
            "dicom-classification --from DIR`)"
        )
    head = model.get_submodule(HEAD)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"the base model in {directory} has no linear {HEAD} head")
    expected = image_input(directory)
    if model.config.image_size != expected.size:
        raise ConfigError(
            f"the base model in {directory} says image_size {model.config.image_size} in "
            f"config.json but its preprocessor_config.json feeds {expected.size}-pixel "
            "images: make it with `fedlora model init dicom-classification --from DIR`, "
            "which fits the two"
        )


IMAGING_TASK = TaskSpec(
    name="dicom-classification",
    data_kind="dicom",
    model_class=ViTForImageClassification,
    input_names=("pixel_values",),
    default_lora_targets=ATTENTION_TARGETS,
    head_modules=(HEAD,),
    demo_config=demo_vit_config,
    example_inputs=_example_image,
    lora_targets_for=lora_targets_for,
    check_lora_targets=check_lora_targets,
    model_class_for=image_model_class,
    after_load=_check_image_base,
    prepare_export=_export_kernels,
)
