"""What a task is: a model family, its inputs, and where LoRA goes."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PretrainedConfig, PreTrainedModel

from common.config import LoraSettings, SiteKind
from common.errors import ConfigError
from common.files import hash_file


@dataclass(frozen=True)
class TaskSpec:
    """Everything both sides must agree on for one kind of model.

    Data loading is not here: it is site-side (``client.data``) and keyed by the data
    format, so the server never imports a loader.
    """

    name: str
    site_kind: SiteKind
    model_class: type[PreTrainedModel]
    input_names: tuple[str, ...]
    """Keyword arguments of the model's forward, in the order the loader produces them."""
    default_lora_targets: tuple[str, ...]
    head_modules: tuple[str, ...]
    """Trained in full (not LoRA) and sent with the adapter: the classifier head."""
    demo_config: Callable[..., PretrainedConfig]
    """Builds the small config used by the demo and the tests."""
    example_inputs: Callable[[Any], dict[str, torch.Tensor]]
    """One record's model inputs (zeros) for a model config: what export traces with."""

    def load_base_model(self, directory: Path) -> PreTrainedModel:
        """Load the frozen base model from a local directory (never from a hub)."""
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"base model directory {directory} has no config.json "
                f"(expected a model saved with save_pretrained for task {self.name!r})"
            )
        loaded: tuple[PreTrainedModel, dict[str, list[str]]] = self.model_class.from_pretrained(  # type: ignore[assignment]
            directory, local_files_only=True, output_loading_info=True
        )
        model, info = loaded
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
        if problems:
            # A partly random base model would train and "work"; refuse it instead.
            raise ConfigError(
                f"base model directory {directory} does not fit the {self.name} model: "
                + "; ".join(f"{k.replace('_', ' ')}: {sorted(v)[:3]}" for k, v in problems.items())
            )
        model.eval()
        return model

    def build_demo_base_model(self, directory: Path, seed: int, **shape: Any) -> Path:
        """Create and save a small randomly initialised base model, as sites would load it."""
        torch.manual_seed(seed)
        model = self.model_class(self.demo_config(**shape))
        model.save_pretrained(directory)
        return directory

    def wrap_with_lora(self, model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
        """Freeze the base, add LoRA on the targets and make the head trainable."""
        targets = list(lora.target_modules or self.default_lora_targets)
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


def model_fingerprint(directory: Path) -> str:
    """SHA-256 over the names and bytes of every file of a saved model."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(b"\0")
        hash_file(digest, path)
    return digest.hexdigest()
