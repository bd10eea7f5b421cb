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
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import ViTForImageClassification

from benchmarks.fixtures import vit_b16_config
from benchmarks.measure import isolated, measured, mib, verdict
from common.adapters import AdapterSchema, PackedAdapter, arrays_to_record, record_to_arrays
from common.config import LoraSettings, UpdateValidation
from common.protocol import SITE_REMAINING_BUDGET, RoundRequest
from common.tasks import TASKS
from server.aggregation import fedavg
from server.validation import NormReference, UpdateLimits, update_norm, validate_update

logger = logging.getLogger("benchmarks.aggregation")

COUNTS = (10, 100, 1000)
TARGET_SECONDS = 0.25
VALIDATION_TARGET_SECONDS = 0.3
"""Validation and aggregation of 1000 updates together (issue: one round loop)."""
MEMORY_GROWTH_LIMIT = 32 * 1024 * 1024
"""Growth of the aggregation's added peak from N=10 to N=1000 that still counts as 'does
not grow' (one float16 update is 1.2 MB; holding all 1000 would add 1.2 GB)."""
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


def stream(pool: list[PackedAdapter], count: int, copies: bool = False) -> Iterator[PackedAdapter]:
    """``count`` updates from the pool; with ``copies`` each is a buffer of its own (as
    decoded replies are), so an aggregator that kept them all would show it in memory."""
    for index in range(count):
        update = pool[index % len(pool)]
        yield AdapterSchema.of(update).unpack(update.flat.copy()) if copies else update


def stacked_mean(
    updates: Iterator[PackedAdapter], weights: list[float]
) -> npt.NDArray[np.floating]:
    """Stack every update, then one weighted mean over the stack."""
    stack = np.stack([update.flat.astype(np.float32) for update in updates])
    return (np.asarray(weights, np.float32) @ stack) / np.float32(sum(weights))


def aggregate_once(count: int, method: str, dtype: str, repeats: int) -> dict[str, Any]:
    """In a fresh process: peak memory over a first pass in which every update is its own
    buffer, then the median time of ``repeats`` passes over the pool (copying updates
    would time the copies, not the aggregation)."""
    schema = vit_b16_adapter_schema(dtype)
    pool = update_pool(schema, POOL)
    weights = [float(100 + index % 50) for index in range(count)]
    aggregate = fedavg if method == "streaming" else stacked_mean
    with measured() as memory:
        aggregate(stream(pool, count, copies=True), weights)
    timings = []
    for _ in range(repeats):
        with measured() as section:
            aggregate(stream(pool, count), weights)
        timings.append(section.seconds)
    return {
        "seconds": statistics.median(timings),
        "seconds_all": timings,
        "peak_bytes": memory.peak_bytes,
        "added_bytes": memory.added_bytes,
        "update_values": schema.elements,
    }


def packing_seconds(count: int, dtype: str) -> float:
    """What validation adds per update before aggregation: laying the decoded tensors out
    as one vector (``AdapterSchema.pack``), for ``count`` updates."""
    schema = vit_b16_adapter_schema(dtype)
    tensors = [dict(update) for update in update_pool(schema, POOL)]
    started = time.perf_counter()
    for index in range(count):
        schema.pack(tensors[index % POOL])
    return time.perf_counter() - started


def _round_request(dtype: str) -> RoundRequest:
    return RoundRequest(
        task="dicom-classification",
        base_model_sha256="0" * 64,
        server_round=1,
        total_rounds=3,
        local_epochs=1,
        batch_size=32,
        learning_rate=0.01,
        optimizer="sgd",
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        epsilon_per_run=SITE_REMAINING_BUDGET,
        lora_r=16,
        lora_alpha=32.0,
        lora_targets=["query", "value"],
        freeze_lora_a=False,
        seed=0,
        run_id="",
        update_dtype=dtype,
    )


def general_validation(
    record: Any, reference: dict[str, npt.NDArray[np.floating]], wire: AdapterSchema
) -> float:
    """The baseline: every check through NumPy's loader and per-tensor NumPy passes (what
    ``validate_update`` did before it read records directly)."""
    arrays = record_to_arrays(record)
    wire.check(arrays)
    packed = wire.pack(arrays)
    if any(not np.isfinite(value).all() for value in packed.values()):
        raise ValueError("non-finite")
    return update_norm(packed, reference)


def validation_seconds(count: int, baseline_count: int, dtype: str) -> dict[str, float]:
    """Seconds to validate ``count`` replies (Flower records, as they arrive) with
    ``validate_update``, beside the general path over ``baseline_count`` replies scaled
    to ``count``; the norms must agree."""
    schema = vit_b16_adapter_schema("float32")
    wire = schema.with_dtype(dtype)
    pool = update_pool(wire, POOL)
    records = [arrays_to_record(update) for update in pool]
    reference = {name: np.zeros(shape, np.float32) for name, shape, _ in schema.entries}
    request = _round_request(dtype)
    # A bound the honest pool keeps with room (as a derived bound is kept): the float32
    # norm decides each reply; replies within its error of the bound take the exact norm.
    bound = 2 * max(update_norm(update, reference) for update in pool)
    limits = UpdateLimits.for_run(UpdateValidation(max_update_norm=bound), schema)
    metrics = {
        "num-examples": 500.0,
        "steps": 10.0,
        "noise-multiplier": 1.0,
        "epsilon": 1.0,
        "epsilon-budget": 8.0,
        "delta": 1e-5,
    }
    started = time.perf_counter()
    packed_reference = NormReference.of(reference, schema)  # once per round
    norms = [
        validate_update(records[i % POOL], metrics, packed_reference, schema, request, limits)[1]
        for i in range(count)
    ]
    direct = time.perf_counter() - started
    started = time.perf_counter()
    general = [
        general_validation(records[i % POOL], reference, wire) for i in range(baseline_count)
    ]
    baseline = (time.perf_counter() - started) * count / baseline_count
    difference = max(abs(a - b) / b for a, b in zip(norms, general, strict=False))
    return {"seconds": direct, "general_seconds": baseline, "norm_difference": difference}


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
        "targets": {"seconds_at_1000": TARGET_SECONDS, "memory_growth_bytes": MEMORY_GROWTH_LIMIT},
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
    figures["memory_growth_bytes"] = (
        streaming["1000"]["added_bytes"] - streaming["10"]["added_bytes"]
    )
    figures["memory_growth"] = streaming["1000"]["peak_bytes"] / streaming["10"]["peak_bytes"]
    figures["validation_packing_seconds_at_1000"] = packing_seconds(1000, dtype)
    validation = validation_seconds(1000, 200 if quick else 1000, dtype)
    figures["validation_seconds_at_1000"] = validation["seconds"]
    figures["general_validation_seconds_at_1000"] = validation["general_seconds"]
    figures["validation_speedup"] = validation["general_seconds"] / validation["seconds"]
    figures["validation_norm_difference"] = validation["norm_difference"]
    figures["validation_and_aggregation_seconds"] = (
        validation["seconds"] + figures["seconds_at_1000"]
    )
    stacked = figures["methods"]["stacked"]
    largest = str(max(int(count) for count in stacked))
    figures["stacked_memory_growth"] = stacked[largest]["peak_bytes"] / stacked["10"]["peak_bytes"]
    figures["stacked_memory_growth_bytes"] = (
        stacked[largest]["added_bytes"] - stacked["10"]["added_bytes"]
    )
    figures["stacked_largest_count"] = int(largest)
    figures["max_relative_difference"] = check_same_result(dtype)
    figures["meets_targets"] = bool(
        verdict(figures["seconds_at_1000"], TARGET_SECONDS)
        and verdict(figures["memory_growth_bytes"], MEMORY_GROWTH_LIMIT)
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
            "streaming added peak, N=1000 minus N=10",
            f"{mib(figures['memory_growth_bytes'])} MiB (stacked, "
            f"N={figures['stacked_largest_count']}: "
            f"+{mib(figures['stacked_memory_growth_bytes'])} MiB)",
            "does not grow (≤ 32 MiB)",
            verdict(figures["memory_growth_bytes"], MEMORY_GROWTH_LIMIT),
        )
    )
    lines.append(
        (
            "validation's packing, 1000 updates",
            f"{figures['validation_packing_seconds_at_1000']:.3f} s (before aggregation, "
            "as replies are checked)",
            "",
            None,
        )
    )
    if "validation_seconds_at_1000" in figures:
        lines.append(
            (
                "validation, 1000 replies (Flower records)",
                f"{figures['validation_seconds_at_1000']:.3f} s, "
                f"{figures['validation_speedup']:.1f}× faster than NumPy's loader and "
                f"per-tensor passes ({figures['general_validation_seconds_at_1000']:.2f} s; "
                f"norms within {figures['validation_norm_difference']:.0e})",
                "",
                None,
            )
        )
        total = figures["validation_and_aggregation_seconds"]
        lines.append(
            (
                "validation + aggregation, 1000 replies",
                f"{total:.2f} s",
                f"≤ {VALIDATION_TARGET_SECONDS} s",
                verdict(total, VALIDATION_TARGET_SECONDS),
            )
        )
    return lines
