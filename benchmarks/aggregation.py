"""The coordinator's aggregation of N site updates of a ViT-B/16-sized adapter.

The updates are what validation hands the aggregator: each reply's adapter (r=16 on q
and v of ViT-B/16, plus the head: 591k values) decoded into one contiguous vector in
the run's update precision (float16 by default). They are simulated from a pool of
distinct random updates and yielded one at a time, as a stream, so the only memory that
can grow with N is the aggregator's own.

Side by side, for N = 10, 100 and 1000, each in a fresh process (peak memory):

- ``streaming``: ``server.aggregation.fedavg``, the aggregator runs use: one pass, one
  running sum (float32 partial sums folded into float64);
- ``stacked``: the textbook alternative that stacks every update first (N × adapter)
  and takes the weighted mean of the stack.

Targets: streaming ≤ 0.25 s at N = 1000, and peak memory that does not grow with N.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import ViTForImageClassification

from benchmarks.fixtures import vit_b16_config
from benchmarks.measure import isolated, measured, mib, verdict
from common.adapters import AdapterSchema, PackedAdapter
from common.config import LoraSettings
from common.tasks import TASKS
from server.aggregation import fedavg

logger = logging.getLogger("benchmarks.aggregation")

COUNTS = (10, 100, 1000)
TARGET_SECONDS = 0.25
MEMORY_GROWTH_LIMIT = 1.10
"""Peak at N=1000 over peak at N=10 that still counts as 'does not grow'."""
POOL = 16
METHODS = ("streaming", "stacked")


def vit_b16_adapter_schema(dtype: str) -> AdapterSchema:
    """The adapter a ViT-B/16 run exchanges: LoRA r=16 on q and v, and the head."""
    spec = TASKS.get("dicom-classification")
    with torch.device("meta"):  # shapes only: no 86M weights in memory
        model = ViTForImageClassification(vit_b16_config())
    peft_model = spec.wrap_with_lora(model, LoraSettings(r=16))
    shapes = {
        name.replace(".default", ""): tuple(parameter.shape)
        for name, parameter in peft_model.named_parameters()
        if parameter.requires_grad
    }
    return AdapterSchema(tuple((name, shapes[name], dtype) for name in sorted(shapes)))


def update_pool(schema: AdapterSchema, size: int, seed: int = 0) -> list[PackedAdapter]:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(schema.entries[0][2])
    return [
        schema.unpack((0.01 * rng.standard_normal(schema.elements)).astype(dtype))
        for _ in range(size)
    ]


def stream(pool: list[PackedAdapter], count: int) -> Iterator[PackedAdapter]:
    for index in range(count):
        yield pool[index % len(pool)]


def stacked_mean(
    updates: Iterator[PackedAdapter], weights: list[float]
) -> npt.NDArray[np.floating]:
    """Stack every update, then one weighted mean over the stack."""
    stack = np.stack([update.flat.astype(np.float32) for update in updates])
    return (np.asarray(weights, np.float32) @ stack) / np.float32(sum(weights))


def aggregate_once(count: int, method: str, dtype: str, repeats: int) -> dict[str, Any]:
    """In a fresh process: peak memory of the first aggregation, median time of all."""
    schema = vit_b16_adapter_schema(dtype)
    pool = update_pool(schema, POOL)
    weights = [float(100 + index % 50) for index in range(count)]
    timings = []
    peak = start = 0
    for repeat in range(repeats):
        with measured() as section:
            if method == "streaming":
                fedavg(stream(pool, count), weights)
            else:
                stacked_mean(stream(pool, count), weights)
        timings.append(section.seconds)
        if repeat == 0:
            peak, start = section.peak_bytes, section.start_bytes
    return {
        "seconds": statistics.median(timings),
        "seconds_all": timings,
        "peak_bytes": peak,
        "added_bytes": max(peak - start, 0),
        "update_values": schema.elements,
    }


def check_same_result(dtype: str) -> float:
    """Largest relative difference between the two methods (they must agree)."""
    schema = vit_b16_adapter_schema(dtype)
    pool = update_pool(schema, POOL)
    weights = [float(100 + index % 50) for index in range(100)]
    streamed = fedavg(stream(pool, 100), weights)
    packed = np.concatenate([streamed[name].reshape(-1) for name, _, _ in schema.entries])
    reference = stacked_mean(stream(pool, 100), weights)
    return float(np.max(np.abs(packed - reference)) / np.max(np.abs(reference)))


def run(quick: bool, dtype: str = "float16") -> dict[str, Any]:
    repeats = 3 if quick else 5
    figures: dict[str, Any] = {
        "update_dtype": dtype,
        "targets": {"seconds_at_1000": TARGET_SECONDS, "memory_growth": MEMORY_GROWTH_LIMIT},
        "methods": {method: {} for method in METHODS},
    }
    for method in METHODS:
        for count in COUNTS:
            if quick and method == "stacked" and count == max(COUNTS):
                continue  # --quick: 5 GB and several seconds that only repeat the point
            logger.info("aggregation: %s, N=%d", method, count)
            figures["methods"][method][str(count)] = isolated(
                aggregate_once, count, method, dtype, repeats
            )
    streaming = figures["methods"]["streaming"]
    figures["seconds_at_1000"] = streaming["1000"]["seconds"]
    figures["memory_growth"] = streaming["1000"]["peak_bytes"] / streaming["10"]["peak_bytes"]
    stacked = figures["methods"]["stacked"]
    largest = str(max(int(count) for count in stacked))
    figures["stacked_memory_growth"] = stacked[largest]["peak_bytes"] / stacked["10"]["peak_bytes"]
    figures["stacked_largest_count"] = int(largest)
    figures["max_relative_difference"] = check_same_result(dtype)
    figures["meets_targets"] = bool(
        verdict(figures["seconds_at_1000"], TARGET_SECONDS)
        and verdict(figures["memory_growth"], MEMORY_GROWTH_LIMIT)
    )
    return figures


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    lines: list[tuple[str, str, str, bool | None]] = []
    for method, by_count in figures["methods"].items():
        for count, values in by_count.items():
            at_target = method == "streaming" and count == "1000"
            lines.append(
                (
                    f"{method} N={count}",
                    f"{values['seconds']:.3f} s, peak {mib(values['peak_bytes'])} MiB "
                    f"(+{mib(values['added_bytes'])} MiB)",
                    "≤ 0.25 s" if at_target else "",
                    verdict(values["seconds"], TARGET_SECONDS) if at_target else None,
                )
            )
    lines.append(
        (
            "streaming peak N=1000 / N=10",
            f"{figures['memory_growth']:.2f}× (stacked, N={figures['stacked_largest_count']} / "
            f"N=10: {figures['stacked_memory_growth']:.2f}×)",
            "does not grow",
            verdict(figures["memory_growth"], MEMORY_GROWTH_LIMIT),
        )
    )
    return lines
