"""text-classification: decoder LLMs (DeepSeek-V3, and the R1 distills' Qwen2 and Llama)
with a sequence-classification head, LoRA on their attention projections.

The base model directory holds the model *and its tokenizer*, as a downloaded
checkpoint does; sites tokenise their own texts with it, and the coordinator's copy is
the same files (the directory's fingerprint covers both). A causal-LM checkpoint loads
too: its ``lm_head`` is dropped and a classification head (``score``) is added, which
the coordinator initialises and sends with the first round's adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from common.errors import ConfigError
from common.files import hash_file
from common.tasks.base import TaskSpec

logger = logging.getLogger(__name__)

ARCHITECTURES = ("deepseek_v3", "qwen2", "llama")
"""``model_type`` values this task is built and tested for."""
PAD_TOKEN = "[PAD]"
UNKNOWN_TOKEN = "[UNK]"
TEXT_INPUTS = ("input_ids", "attention_mask")
GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""A tokenizer's vocabulary file, one of which a model directory must hold."""
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5"})


def lora_targets_for(config: PretrainedConfig) -> tuple[str, ...]:
    """Attention projections to adapt: DeepSeek-V3's query (``q_proj``, or ``q_b_proj``
    when the query is low-rank as in the full V3) and its key/value up-projection
    ``kv_b_proj`` (multi-head latent attention); the query and value projections of
    Qwen2 and Llama."""
    if config.model_type == "deepseek_v3":
        query = "q_b_proj" if getattr(config, "q_lora_rank", None) else "q_proj"
        return (query, "kv_b_proj")
    return ("q_proj", "v_proj")


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The base model's own tokenizer, from its directory (never from a hub), padding on
    the right (the head reads the last real token; positions stay 0, 1, …)."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"base model directory {directory} has no tokenizer: expected one of "
            f"{', '.join(TOKENIZER_FILES)} next to config.json"
        )
    try:
        # A generic tokenizers file (tokenizer_class TokenizersBackend) is loaded as it
        # is; AutoTokenizer would take the model's class from config.json and add that
        # family's special tokens to it.
        settings_file = directory / "tokenizer_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        if settings.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"base model directory {directory} has no usable tokenizer (expected "
            f"tokenizer.json or the model's tokenizer files next to config.json): {exc}"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {directory} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # Llama-family tokenizers define no pad
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_fingerprint(directory: Path) -> str:
    """SHA-256 over the tokenizer's files in a model directory (everything but the
    weights and config.json): prediction checks it still has the tokenizer of training."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES:
            continue
        digest.update(path.name.encode() + b"\0")
        hash_file(digest, path)
    return digest.hexdigest()


def _check_model_and_tokenizer(model: PreTrainedModel, directory: Path) -> None:
    """Refuse architectures this task is not built for and a tokenizer that does not fit
    the model; set the pad id the head uses to find each text's last token."""
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"base model in {directory} is a {model_type!r} model; the text task supports "
            f"{', '.join(ARCHITECTURES)}"
        )
    tokenizer = load_tokenizer(directory)
    embedding = model.get_input_embeddings()
    vocabulary = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else 0
    if vocabulary and len(tokenizer) > vocabulary:
        raise ConfigError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's "
            f"embedding only {vocabulary}: they do not belong together"
        )
    pad = tokenizer.pad_token_id
    configured = model.config.pad_token_id
    if configured is not None and configured != pad:
        raise ConfigError(
            f"config.json has pad_token_id {configured}, the tokenizer pads with {pad}: "
            "set one to the other"
        )
    model.config.pad_token_id = pad


def _export_kernels(model: nn.Module) -> None:
    """Plain attention and the batched-matmul expert kernel: the default grouped-matmul
    MoE kernel calls ``histc``, which ONNX cannot express."""
    config = getattr(model, "config", None)
    if config is None:
        return
    model.set_attn_implementation("eager")  # type: ignore[operator]
    if getattr(config, "n_routed_experts", None):
        config._experts_implementation = "batched_mm"


def demo_text_config(
    *,
    architecture: str = "qwen2",
    vocab_size: int,
    num_labels: int = 2,
    hidden_size: int = 64,
    layers: int = 2,
    max_tokens: int = 512,
    pad_token_id: int = 0,
) -> PretrainedConfig:
    """A tiny model of the named architecture, the real one's shape in miniature:
    grouped-query attention for Qwen2 and Llama; for DeepSeek-V3 latent attention
    (``kv_b_proj``) and, after a dense first layer, mixture-of-experts layers."""
    if hidden_size % 8:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of 8")
    shared: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": max(max_tokens, 64),
        "pad_token_id": pad_token_id,
        "bos_token_id": None,
        "eos_token_id": None,
        "num_labels": num_labels,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
    }
    if architecture == "deepseek_v3":
        head = hidden_size // 4
        return DeepseekV3Config(
            **shared,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=hidden_size // 4,
            qk_rope_head_dim=head // 2,
            qk_nope_head_dim=head // 2,
            v_head_dim=head,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            moe_intermediate_size=hidden_size // 2,
            first_k_dense_replace=1,
        )
    if architecture == "qwen2":
        return Qwen2Config(**shared, num_key_value_heads=2)
    if architecture == "llama":
        return LlamaConfig(**shared, num_key_value_heads=2)
    raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


def build_word_tokenizer(words: Sequence[str], max_tokens: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed public vocabulary (lower-cased; punctuation
    split off; unknown words map to [UNK]): the demo's stand-in for a model's own."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocabulary = {PAD_TOKEN: 0, UNKNOWN_TOKEN: 1}
    for word in words:
        vocabulary.setdefault(word.lower(), len(vocabulary))
    backend = Tokenizer(WordLevel(vocab=vocabulary, unk_token=UNKNOWN_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNKNOWN_TOKEN,
        model_max_length=max_tokens,
        padding_side="right",
    )


def _example_text(config: PretrainedConfig) -> dict[str, torch.Tensor]:
    tokens = 8
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return {
        "input_ids": torch.full((1, tokens), 1 if pad != 1 else 2, dtype=torch.long),
        "attention_mask": torch.ones(1, tokens, dtype=torch.long),
    }


TEXT_TASK = TaskSpec(
    name="text-classification",
    data_kind="text",
    model_class=AutoModelForSequenceClassification,  # type: ignore[arg-type]
    input_names=TEXT_INPUTS,
    default_lora_targets=("q_proj", "v_proj"),
    head_modules=("score",),
    demo_config=demo_text_config,
    example_inputs=_example_text,
    sequence_inputs=TEXT_INPUTS,
    lora_targets_for=lora_targets_for,
    tolerated_keys=("score.", "lm_head."),
    after_load=_check_model_and_tokenizer,
    prepare_export=_export_kernels,
)
