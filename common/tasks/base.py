"""What a task is: a model family, its inputs, and where LoRA goes."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from common.config import DataKind, LoraSettings
from common.errors import ConfigError
from common.files import hash_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """Everything both sides must agree on for one kind of model.

    Data loading is not here: it is site-side (``client.data``) and keyed by the data
    format, so the server never imports a loader.
    """

    name: str
    data_kind: DataKind
    """The site data it trains on (``[data]`` of a site config, see common.config)."""
    model_class: type[PreTrainedModel]
    """What ``from_pretrained`` is called on: a model class, or a transformers Auto class."""
    input_names: tuple[str, ...]
    """Keyword arguments of the model's forward, in the order the loader produces them."""
    default_lora_targets: tuple[str, ...]
    head_modules: tuple[str, ...]
    """Trained in full (not LoRA) and sent with the adapter: the classifier head."""
    demo_config: Callable[..., PretrainedConfig]
    """Builds the small config used by the demo and the tests."""
    example_inputs: Callable[[Any], dict[str, torch.Tensor]]
    """One record's model inputs for a model config: what export traces with."""
    sequence_inputs: tuple[str, ...] = ()
    """Inputs whose second axis is free (token sequences): exported with a dynamic length."""
    lora_targets_for: Callable[[PretrainedConfig], tuple[str, ...]] | None = None
    """Default LoRA targets by architecture, when one task serves several."""
    check_lora_targets: Callable[[PretrainedConfig, Sequence[str]], None] | None = None
    """Refuses LoRA targets whose per-sample gradients Opacus would get wrong for an
    architecture (raises ConfigError), whoever chose them."""
    model_class_for: Callable[[PretrainedConfig], type[PreTrainedModel]] | None = None
    """The model class of a config, when one task serves several architectures (read
    from config.json before any weight is); ``model_class`` is then the demo's class."""
    tolerated_keys: tuple[str, ...] = ()
    """Weight-name prefixes a base checkpoint may lack or carry extra: a causal LM's
    ``lm_head`` and the new classification head of a text task. The head is trained and
    sent with the adapter, so every site starts from the coordinator's head."""
    after_load: Callable[[PreTrainedModel, Path], None] | None = None
    """Checks and settings that need the model's directory (a text model's tokenizer)."""
    prepare_export: Callable[[nn.Module], None] | None = None
    """Switches a merged model to export-friendly kernels before it is traced."""

    def _tolerated(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.tolerated_keys)

    def class_for(self, config: PretrainedConfig) -> type[PreTrainedModel]:
        """The class a model of this task with ``config`` is built and loaded as."""
        if self.model_class_for is not None:
            return self.model_class_for(config)
        return self.model_class

    def new_model(self, config: PretrainedConfig) -> PreTrainedModel:
        """A randomly initialised model of this task for ``config``."""
        model_class = self.class_for(config)
        if hasattr(model_class, "from_config"):  # a transformers Auto class
            built: PreTrainedModel = model_class.from_config(config)
            return built
        return model_class(config)

    def lora_targets(self, config: PretrainedConfig) -> tuple[str, ...]:
        if self.lora_targets_for is not None:
            return self.lora_targets_for(config)
        return self.default_lora_targets

    def load_base_model(self, directory: Path) -> PreTrainedModel:
        """Load the frozen base model from a local directory (never from a hub)."""
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"base model directory {directory} has no config.json "
                f"(expected a model saved with save_pretrained for task {self.name!r})"
            )
        model_class = self.model_class
        if self.model_class_for is not None:  # chosen from config.json, before any weight
            model_class = self.model_class_for(saved_config(directory))
        # float32 whatever the checkpoint's dtype: DP-SGD's clipping and noise need it.
        loaded: tuple[PreTrainedModel, dict[str, list[str]]] = model_class.from_pretrained(  # type: ignore[assignment]
            directory, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
        model, info = loaded
        problems: dict[str, list[str]] = {}
        for kind in ("missing_keys", "unexpected_keys"):
            keys = [str(key) for key in info.get(kind, [])]
            tolerated = [key for key in keys if self._tolerated(key)]
            if tolerated:
                logger.info("base model: %s %s (expected for this task)", kind, sorted(tolerated))
            rest = [key for key in keys if key not in tolerated]
            if rest:
                problems[kind] = rest
        if problems:
            # A partly random base model would train and "work"; refuse it instead.
            raise ConfigError(
                f"base model directory {directory} does not fit the {self.name} model: "
                + "; ".join(f"{k.replace('_', ' ')}: {sorted(v)[:3]}" for k, v in problems.items())
            )
        if self.after_load is not None:
            self.after_load(model, directory)
        model.eval()
        return model

    def build_demo_base_model(self, directory: Path, seed: int, **shape: Any) -> Path:
        """Create and save a small randomly initialised base model, as sites would load it."""
        torch.manual_seed(seed)
        model = self.new_model(self.demo_config(**shape))
        model.save_pretrained(directory)
        return directory

    def wrap_with_lora(self, model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
        """Freeze the base, add LoRA on the targets and make the head trainable."""
        targets = list(lora.target_modules or self.lora_targets(model.config))
        if self.check_lora_targets is not None:
            self.check_lora_targets(model.config, targets)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=lora.dropout,
            target_modules=targets,
            modules_to_save=list(self.head_modules),
            bias="none",
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations
                peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(
                f"LoRA targets {targets} do not fit the {self.name} model: {exc}"
            ) from None
        return peft_model


def name_classes(config: PretrainedConfig, classes: Sequence[str]) -> None:
    """Name a classifier's outputs after the task's classes (config.json's id2label,
    which also sets num_labels): ``fedlora model inspect`` and a reader of config.json
    see which output is which, in the order of the sites' ``data.classes``."""
    config.id2label = dict(enumerate(classes))
    config.label2id = {name: index for index, name in enumerate(classes)}


def saved_config(directory: Path) -> PretrainedConfig:
    """config.json of a saved transformers model, read without its weights."""
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"{directory} has no config.json (not a model saved with save_pretrained)"
        )
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"config.json in {directory} cannot be read: {exc}") from None
    return config


def model_outputs(config_file: Path) -> int:
    """Outputs of a saved classifier, read from its config.json without loading it:
    ``id2label``'s size, else ``num_labels``, else transformers' default of 2 (a causal
    LM checkpoint names none)."""
    try:
        settings = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file.name} of the base model cannot be read: {exc}") from None
    labels = settings.get("id2label")
    if labels:
        return len(labels)
    return int(settings.get("num_labels", 2))


def model_fingerprint(directory: Path) -> str:
    """SHA-256 over the names and bytes of every file of a saved model."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(b"\0")
        hash_file(digest, path)
    return digest.hexdigest()
