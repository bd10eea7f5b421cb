"""The text task at real size: DP-SGD steps on a DeepSeek-R1 distill's shape.

    python -m benchmarks.text_real_size [--preset NAME] [--device cuda] [--batch 8]
                                        [--tokens 256] [--steps 4] [--layers N]

Nothing can be downloaded here, so the model has the published architecture of the
preset (every dimension of its config.json) with random weights; the cost of a step does
not depend on the weights' values. It is saved with ``save_pretrained`` together with a
tokenizer and loaded back through the task's own ``load_base_model``, the path a site's
downloaded directory takes; LoRA goes where the task puts it, and the site's one DP
trainer runs the steps, against the same trainer without DP in the same run. Reported:
seconds per step, peak memory (GPU allocator, or process RSS on CPU) and their ratios.
Written to benchmarks/results.json under ``text_real_size``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from benchmarks.measure import isolated, measured
from benchmarks.results import report
from client.data import SiteData
from client.training import DPTrainer, TrainingPlan
from common.cli import configure_logging
from common.config import LoraSettings
from common.tasks.text import TEXT_TASK, build_word_tokenizer

GIB = 1024**3

PRESETS: dict[str, dict[str, Any]] = {
    # config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-qwen-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 131072,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    # config.json of deepseek-ai/DeepSeek-R1-Distill-Llama-8B
    "r1-distill-llama-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


def save_base_model(preset: str, layers: int | None, directory: Path) -> int:
    """The preset's architecture with random weights and a tokenizer, saved as a
    downloaded checkpoint would be; returns the parameter count."""
    fields = dict(PRESETS[preset])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    tokenizer = build_word_tokenizer([f"word{i}" for i in range(1000)])
    config = AutoConfig.for_model(
        fields.pop("model_type"), **fields, num_labels=2, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = TEXT_TASK.new_model(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(parameter.numel() for parameter in model.parameters())


def synthetic_texts(people: int, tokens: int, vocabulary: int, seed: int) -> SiteData:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocabulary, size=(people, tokens), dtype=np.int64)
    return SiteData(
        features={"input_ids": ids, "attention_mask": np.ones_like(ids)},
        labels=rng.integers(0, 2, size=people, dtype=np.int64),
        person_keys=[f"person-{i}" for i in range(people)],
        classes=["routine", "urgent"],
    )


def train_mode(
    directory: Path, device_name: str, batch: int, tokens: int, steps: int, private: bool
) -> dict[str, Any]:
    """In a fresh process: load the base as a site does, wrap it with LoRA, then a
    one-step warm-up and the measured call. Seconds per step, and per text (Poisson
    batches vary in size), and the peak memory of the measured call."""
    device = torch.device(device_name)
    started = time.perf_counter()
    base = TEXT_TASK.load_base_model(directory)
    load_seconds = time.perf_counter() - started
    model = TEXT_TASK.wrap_with_lora(base, LoraSettings()).to(device)
    data = synthetic_texts(batch * steps, tokens, int(base.config.vocab_size), seed=0)
    trainer = DPTrainer(model, TEXT_TASK.input_names)
    plan = TrainingPlan(
        epochs=1,
        batch_size=batch,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        optimizer="adam",
        private=private,
        seed=0,
    )
    trainer.train(data.subset(np.arange(batch)), plan, [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with measured() as section:
        started = time.perf_counter()
        result = trainer.train(data, plan, [])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else section.peak_bytes
    return {
        "load_seconds": load_seconds,
        "seconds_per_step": seconds / max(result.steps, 1),
        "seconds_per_text": seconds / max(result.batched, 1),
        "peak_gib": peak / GIB,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_targets": list(TEXT_TASK.lora_targets(base.config)),
    }


def run(
    preset: str, device_name: str, batch: int, tokens: int, steps: int, layers: int | None
) -> dict[str, Any]:
    """Save the model once, then each mode in its own process (so neither's memory
    peak starts from what the other left allocated)."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "base"
        started = time.perf_counter()
        parameters = save_base_model(preset, layers, directory)
        save_seconds = time.perf_counter() - started
        baseline, dp = (
            isolated(train_mode, directory, device_name, batch, tokens, steps, private)
            for private in (False, True)
        )
    device = torch.device(device_name)
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "layers": layers or PRESETS[preset]["num_hidden_layers"],
        "parameters": parameters,
        "trainable_parameters": dp["trainable"],
        "lora_targets": dp["lora_targets"],
        "batch": batch,
        "tokens": tokens,
        "save_seconds": round(save_seconds, 1),
        "load_seconds": round(dp["load_seconds"], 1),
        "dp_seconds_per_step": round(dp["seconds_per_step"], 4),
        "non_private_seconds_per_step": round(baseline["seconds_per_step"], 4),
        "dp_seconds_per_text": round(dp["seconds_per_text"], 4),
        "non_private_seconds_per_text": round(baseline["seconds_per_text"], 4),
        "time_ratio_per_text": round(dp["seconds_per_text"] / baseline["seconds_per_text"], 3),
        "dp_peak_gib": round(dp["peak_gib"], 2),
        "non_private_peak_gib": round(baseline["peak_gib"], 2),
        "memory_ratio": round(dp["peak_gib"] / baseline["peak_gib"], 3),
        "dp_tokens_per_second": round(tokens / dp["seconds_per_text"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.text_real_size",
        description="DP-SGD steps of the text task on a DeepSeek-R1 distill's architecture "
        "(random weights), against the same trainer without DP.",
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="r1-distill-qwen-1.5b", help="Model shape."
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where to train (default: cuda when present, else cpu).",
    )
    parser.add_argument("--batch", type=int, default=8, help="Expected texts per step.")
    parser.add_argument("--tokens", type=int, default=256, help="Tokens per text.")
    parser.add_argument("--steps", type=int, default=4, help="Measured steps per mode.")
    parser.add_argument(
        "--layers", type=int, help="Keep only this many decoder layers (default: all)."
    )
    parser.add_argument(
        "--no-record", action="store_true", help="Do not write benchmarks/results.json."
    )
    arguments = parser.parse_args(argv)
    configure_logging(False)
    figures = run(
        arguments.preset,
        arguments.device,
        arguments.batch,
        arguments.tokens,
        arguments.steps,
        arguments.layers,
    )
    report("text_real_size", figures, keep=not arguments.no_record)


if __name__ == "__main__":
    main()
