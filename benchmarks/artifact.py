"""The int8 artifact against its fp32 export, per task, on the default scenario.

One invocation runs the default scenario (or reads a finished run with ``--run``) and,
for each task, measures side by side:

- size: ``model.int8.onnx`` against the fp32 ONNX export of the same merged model;
- accuracy and ROC AUC of both on the pooled held-out data of the task's sites (a local
  simulation may read every site), next to the federated check the sites reported;
- CPU latency of onnxruntime at batch 1 and batch 32, the two models timed in
  alternation on the same records (median per call).

Targets (issue 6, imaging): size ≤ 0.30, accuracy loss ≤ 1 point, latency ≤ 0.7×.

    python -m benchmarks.artifact [--run RUN_DIR] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.results import record
from client.site import Site
from common.artifact import MODEL_INT8, Manifest
from common.cli import configure_logging
from common.config import load_site_config
from common.inference import OnnxClassifier, classification_metrics
from server.distribution import ARTIFACTS_DIR, EXPORTS_DIR
from server.export import MODEL_FP32
from server.run import RESULT_DIR
from simulations.runner import prepare, run_task
from simulations.scenario import load_scenario

logger = logging.getLogger("benchmarks.artifact")

TARGETS = {"dicom-classification": {"size": 0.30, "accuracy_loss": 0.01, "latency": 0.7}}
BATCHES = (1, 32)


def run_default(root: Path, rounds: int | None) -> Path:
    """The default scenario, as ``fedlora simulate`` runs it."""
    scenario = load_scenario("default")
    run_dir = root / "run"
    prepared = prepare(scenario, run_dir, root / "data", rounds=rounds)
    for task, federation in prepared.federations.items():
        logger.info("training %s", task)
        run_task(
            federation, prepared.site_configs[task], run_dir, behaviours=prepared.behaviours[task]
        )
    return run_dir


def pooled_holdout(run_dir: Path, task: str, sites: list[str]) -> tuple[dict[str, Any], Any]:
    features: dict[str, list[npt.NDArray[np.generic]]] = {}
    labels = []
    for site_id in sites:
        holdout = Site(load_site_config(run_dir / "sites" / f"{site_id}.toml")).load_data().holdout
        for name, values in holdout.features.items():
            features.setdefault(name, []).append(values)
        labels.append(holdout.labels)
    return {k: np.concatenate(v) for k, v in features.items()}, np.concatenate(labels)


def latency(
    models: dict[str, OnnxClassifier], batch: dict[str, Any], calls: int
) -> dict[str, float]:
    """Median seconds per call, the models called in alternation so drift hits both."""
    timings: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        for _ in range(5):
            model.session.run(None, batch)
    for _ in range(calls):
        for name, model in models.items():
            started = time.perf_counter()
            model.session.run(None, batch)
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def measure_task(run_dir: Path, task: str, threads: int | None, calls: int) -> dict[str, Any]:
    result = json.loads((run_dir / RESULT_DIR / f"{task}.json").read_text())
    fp32_path = run_dir / EXPORTS_DIR / task / MODEL_FP32
    int8_path = run_dir / ARTIFACTS_DIR / task / MODEL_INT8
    manifest = Manifest.model_validate_json(
        (run_dir / ARTIFACTS_DIR / task / "manifest.json").read_bytes()
    )
    models = {
        "fp32": OnnxClassifier(fp32_path, threads=threads),
        "int8": OnnxClassifier(int8_path, threads=threads),
    }
    features, labels = pooled_holdout(run_dir, task, result["sites"])
    scores = {
        name: classification_metrics(model.logits(features), labels)
        for name, model in models.items()
    }
    figures: dict[str, Any] = {
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
        "holdout_records": len(labels),
        "fp32": scores["fp32"],
        "int8": scores["int8"],
        "federated_check": manifest.metrics.model_dump() if manifest.metrics else None,
    }
    figures["size_ratio"] = figures["int8_bytes"] / figures["fp32_bytes"]
    accuracy = {name: float(values["accuracy"] or 0.0) for name, values in scores.items()}
    figures["accuracy_loss_points"] = 100 * (accuracy["fp32"] - accuracy["int8"])
    fp32_auc, int8_auc = scores["fp32"]["auc"], scores["int8"]["auc"]
    figures["auc_change"] = None if fp32_auc is None or int8_auc is None else int8_auc - fp32_auc
    for size in BATCHES:
        rows = np.arange(size) % len(labels)
        batch = {name: np.ascontiguousarray(values[rows]) for name, values in features.items()}
        seconds = latency(models, batch, calls)
        figures[f"latency_b{size}_ms"] = {k: 1000 * v for k, v in seconds.items()}
        figures[f"latency_ratio_b{size}"] = seconds["int8"] / seconds["fp32"]
    targets = TARGETS.get(task)
    if targets:
        figures["meets_targets"] = bool(
            figures["size_ratio"] <= targets["size"]
            and figures["accuracy_loss_points"] <= 100 * targets["accuracy_loss"]
            and all(figures[f"latency_ratio_b{b}"] <= targets["latency"] for b in BATCHES)
        )
    return figures


def print_table(tasks: dict[str, dict[str, Any]]) -> None:
    lines = [
        f"{'task':24} {'size int8/fp32':>15} {'acc fp32':>9} {'acc int8':>9} {'Δ points':>9} "
        f"{'AUC Δ':>8} {'lat b1 (ms)':>16} {'ratio':>6} {'lat b32 (ms)':>16} {'ratio':>6}  target"
    ]
    for task, f in tasks.items():
        auc = "—" if f["auc_change"] is None else f"{f['auc_change']:+.4f}"
        b1, b32 = f["latency_b1_ms"], f["latency_b32_ms"]
        verdict = {True: "met", False: "MISSED", None: "—"}[f.get("meets_targets")]
        lines.append(
            f"{task:24} {f['size_ratio']:15.3f} {f['fp32']['accuracy']:9.4f} "
            f"{f['int8']['accuracy']:9.4f} {-f['accuracy_loss_points'] + 0.0:+9.2f} {auc:>8} "
            f"{b1['fp32']:7.2f}→{b1['int8']:7.2f} {f['latency_ratio_b1']:6.2f} "
            f"{b32['fp32']:7.2f}→{b32['int8']:7.2f} {f['latency_ratio_b32']:6.2f}  {verdict}"
        )
    print("\n".join(lines))  # a benchmark's output is its table
    print(
        "\nsize: model.int8.onnx / fp32 ONNX of the same merged model; accuracy and AUC on the "
        "pooled held-out data of the task's sites; latency: onnxruntime CPU, median per call, "
        "the two models timed in alternation. Imaging targets: size ≤ 0.30, loss ≤ 1 point, "
        "latency ≤ 0.7×."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=Path, help="Measure this finished run instead of running one."
    )
    parser.add_argument("--quick", action="store_true", help="Train 2 rounds per task (faster).")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: all cores)."
    )
    parser.add_argument("--calls", type=int, default=200, help="Timed calls per model and batch.")
    args = parser.parse_args(argv)
    configure_logging(verbose=False)
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="fedlora-artifact-") as scratch:
        run_dir = args.run or run_default(Path(scratch), 2 if args.quick else None)
        tasks = {
            task.name: measure_task(run_dir, task.name, args.threads, args.calls)
            for task in sorted((run_dir / ARTIFACTS_DIR).iterdir())
            if task.is_dir() and not task.name.startswith(".")
        }
    print_table(tasks)
    record("artifact", {"quick": args.quick, "threads": args.threads, "tasks": tasks})
    return tasks


if __name__ == "__main__":
    main()
