"""The cost of privacy at a site: DP-SGD (Opacus) against the same non-private training.

For each task, the largest site of the default scenario trains its LoRA adapter with the
one DP trainer, once per configuration, each in a fresh process:

- ``non-private``: the same model, optimizer, batch size and data, no clipping or noise;
- ``hooks``, ``functorch``, ``ghost``: DP-SGD with each of Opacus's ways of getting
  per-sample gradient norms.

Figures: seconds per optimiser step (the whole ``train`` call, Opacus's set-up included,
over the steps taken) and peak resident memory during training. Ratios are against
``non-private``. Targets: time ≤ 1.3×, memory ≤ 1.3×.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.fixtures import Template
from benchmarks.measure import isolated, measured, mib, verdict
from client.site import Site
from client.training import DPTrainer, TrainingPlan
from common.config import LoraSettings, load_site_config

logger = logging.getLogger("benchmarks.dp_overhead")

MODES = ("non-private", "hooks", "functorch", "ghost")
BATCH_SWEEP = (2, 4)
"""Full runs also time hooks at these multiples of the scenario's batch: Opacus's cost
per step is mostly fixed, so its share falls as the step grows."""
TARGETS = {"time": 1.3, "memory": 1.3}
SITES = {"dicom-classification": "hospital-north", "tabular-classification": "bank-alpha"}
DP_NOISE = 1.0
"""σ for the measurement (the cost of a step does not depend on it)."""


def train_once(
    site_config: Path, mode: str, steps: int, batch_size: int, lora: LoraSettings
) -> dict[str, Any]:
    """One configuration in this (fresh) process: a warm-up epoch, then the timed run of
    enough epochs for at least ``steps`` steps (Opacus's set-up is then a small part)."""
    site = Site(load_site_config(site_config))
    loaded = site.load_data()
    data = loaded.train
    plan = TrainingPlan(
        epochs=1,
        batch_size=batch_size,
        learning_rate=0.1,
        max_grad_norm=1.0,
        noise_multiplier=DP_NOISE,
        accountant="rdp",
        grad_sample_mode="hooks" if mode == "non-private" else mode,
        private=mode != "non-private",
        seed=0,
    )
    plan = replace(plan, epochs=max(1, math.ceil(steps / plan.batches_per_epoch(data.persons))))
    model = site.task.wrap_with_lora(site.task.load_base_model(site.config.site.base_model), lora)
    trainer = DPTrainer(model, site.task.input_names, loaded.class_weights)
    torch.manual_seed(0)
    trainer.train(data, replace(plan, epochs=1), [])  # warm-up
    with measured() as section:
        result = trainer.train(data, plan, [])
    return {
        "steps": result.steps,
        "seconds": section.seconds,
        "seconds_per_step": section.seconds / max(result.steps, 1),
        "peak_bytes": section.peak_bytes,
        "start_bytes": section.start_bytes,
        "people": data.persons,
    }


def run(template: Template, quick: bool) -> dict[str, Any]:
    prepared, _ = template.run("dp-overhead")
    figures: dict[str, Any] = {"targets": TARGETS, "tasks": {}}
    for task, site_id in SITES.items():
        config = next(p for p in prepared.site_configs[task] if p.stem == site_id)
        batch_size = prepared.federations[task].batch_size
        steps = 15 if quick else 40
        modes: dict[str, Any] = {}
        for mode in MODES:
            logger.info("dp_overhead: %s, %s", task, mode)
            try:
                modes[mode] = isolated(
                    train_once, config, mode, steps, batch_size, prepared.federations[task].lora
                )
            except RuntimeError as exc:
                if mode == "non-private":
                    raise
                modes[mode] = {"error": str(exc)}  # a mode Opacus cannot run on this model
        figures["tasks"][task] = summarise(modes, batch_size, site_id)
        figures["tasks"][task]["batch_sweep"] = (
            {} if quick else batch_sweep(config, steps, batch_size, prepared.federations[task].lora)
        )
    figures["default_mode"] = choose_default(figures["tasks"])
    figures["meets_targets"] = all(entry["meets_targets"] for entry in figures["tasks"].values())
    return figures


def batch_sweep(
    config: Path, steps: int, batch_size: int, lora: LoraSettings
) -> dict[str, dict[str, float]]:
    """hooks against non-private at larger batches: how the ratio depends on the step."""
    sweep: dict[str, dict[str, float]] = {}
    for factor in BATCH_SWEEP:
        batch = factor * batch_size
        logger.info("dp_overhead: batch %d", batch)
        plain = isolated(train_once, config, "non-private", steps, batch, lora)
        private = isolated(train_once, config, "hooks", steps, batch, lora)
        sweep[str(batch)] = {
            "non_private_ms": 1000 * plain["seconds_per_step"],
            "hooks_ms": 1000 * private["seconds_per_step"],
            "time_ratio": private["seconds_per_step"] / plain["seconds_per_step"],
        }
    return sweep


def summarise(modes: dict[str, Any], batch_size: int, site: str) -> dict[str, Any]:
    """Ratios of each DP mode against non-private; a task meets the targets when its
    default mode (hooks) does."""
    base = modes["non-private"]
    entry: dict[str, Any] = {"site": site, "batch_size": batch_size, "modes": modes}
    for mode, values in modes.items():
        if mode == "non-private" or "error" in values or "error" in base:
            continue
        values["time_ratio"] = values["seconds_per_step"] / base["seconds_per_step"]
        values["memory_ratio"] = values["peak_bytes"] / base["peak_bytes"]
        values["added_memory_ratio"] = max(values["peak_bytes"] - values["start_bytes"], 1) / max(
            base["peak_bytes"] - base["start_bytes"], 1
        )
        values["meets_targets"] = bool(
            verdict(values["time_ratio"], TARGETS["time"])
            and verdict(values["memory_ratio"], TARGETS["memory"])
        )
    entry["meets_targets"] = bool(modes.get("hooks", {}).get("meets_targets"))
    return entry


def choose_default(tasks: dict[str, Any]) -> str | None:
    """The mode with the smallest worst-case time ratio over the tasks that meets the
    memory target everywhere: the figures' choice for TrainingPlan's default."""
    best: tuple[float, str] | None = None
    for mode in MODES[1:]:
        ratios = [t["modes"][mode].get("time_ratio") for t in tasks.values()]
        memory = [t["modes"][mode].get("memory_ratio") for t in tasks.values()]
        if any(r is None for r in ratios) or any(
            m is None or m > TARGETS["memory"] for m in memory
        ):
            continue
        worst = max(r for r in ratios if r is not None)
        if best is None or worst < best[0]:
            best = (worst, mode)
    return best[1] if best else None


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(measurement, figure, target, met) lines for the combined table."""
    lines: list[tuple[str, str, str, bool | None]] = []
    for task, entry in figures["tasks"].items():
        base = entry["modes"]["non-private"]
        if "error" in base:
            lines.append((f"{task} non-private", base["error"], "", None))
            continue
        lines.append(
            (
                f"{task} non-private",
                f"{1000 * base['seconds_per_step']:.1f} ms/step, {mib(base['peak_bytes'])} MiB",
                "baseline",
                None,
            )
        )
        for mode in MODES[1:]:
            values = entry["modes"][mode]
            if "error" in values:
                lines.append((f"{task} {mode}", values["error"][:60], "", None))
                continue
            lines.append(
                (
                    f"{task} {mode}",
                    f"time {values['time_ratio']:.2f}×, memory {values['memory_ratio']:.2f}× "
                    f"({1000 * values['seconds_per_step']:.1f} ms/step, "
                    f"{mib(values['peak_bytes'])} MiB; added {values['added_memory_ratio']:.2f}×)",
                    "≤ 1.3×, ≤ 1.3×",
                    values["meets_targets"],
                )
            )
        for batch, values in entry.get("batch_sweep", {}).items():
            lines.append(
                (
                    f"{task} hooks at batch {batch}",
                    f"time {values['time_ratio']:.2f}× ({values['hooks_ms']:.1f} vs "
                    f"{values['non_private_ms']:.1f} ms/step)",
                    "",
                    None,
                )
            )
    lines.append(("default grad-sample mode", str(figures["default_mode"]), "", None))
    return lines
