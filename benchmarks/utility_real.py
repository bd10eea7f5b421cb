"""What fedlora learns from real public data, against linear baselines measured alongside.

Each dataset of :mod:`benchmarks.real_data` is handled as a new user would handle it: a
site config describing the whole dataset, ``fedlora model init`` for its base (the
table's schema with its public bounds; the default imaging backbone with the dataset's
classes), then a scenario that splits it by person across three sites with label skew
(Dirichlet α = 0.5, flwr-datasets via the project's own partitioner), run by
``fedlora simulate`` in a subprocess at ε = 4 per run (δ = 1e-5), with the task
settings of the built-in default scenario. Scored on the pooled held-out records of
the three sites, as the federation's own evaluation is, and per site with the released
model (fp32 export) on each site's held-out records.

Baselines, on the very records the sites trained on (their cleaned model inputs):
- a centralised DP-SGD linear model (Opacus) at the same ε and δ, and the same model
  without DP (:mod:`benchmarks.linear_baseline`);
- the best single site under DP: fedlora's own site code (same model, settings and
  ledger rules) training alone, scored on everyone's held-out records.

Targets: federated DP ≥ 0.95 × the centralised DP linear model for tables, ≥ 0.90 × for
images, and above the best single site.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.linear_baseline import linear_baseline
from benchmarks.measure import verdict
from benchmarks.real_data import RealDataset, write_digits, write_table
from benchmarks.utility import federate, pooled
from client.site import SALT_FILE, Site
from common.config import load_federation_config, load_site_config
from common.inference import OnnxClassifier, classification_metrics
from simulations.scenario import load_scenario

logger = logging.getLogger("benchmarks.utility_real")

EPSILON, DELTA = 4.0, 1e-5
SITES, ALPHA = 3, 0.5
TARGETS = {"tabular-classification": 0.95, "dicom-classification": 0.90}
"""Federated DP accuracy over the centralised DP linear model's, at least."""
QUICK_ROUNDS = {"dicom-classification": 3, "tabular-classification": 4}
WRITERS = {
    "breast-cancer": lambda folder: write_table("breast-cancer", folder),
    "anes96": lambda folder: write_table("anes96", folder),
    "digits": write_digits,
}


def _fedlora(*arguments: str, cwd: Path) -> str:
    """Runs the ``fedlora`` console script of this environment; its output on failure."""
    command = [str(Path(sys.executable).with_name("fedlora")), *arguments]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(arguments[:2])} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def _task_settings(task: str, quick: bool) -> dict[str, Any]:
    """The default scenario's settings for ``task`` (rounds, epochs, batch, learning
    rate, clipping), at this benchmark's ε."""
    settings: dict[str, Any] = json.loads(load_scenario("default").model_dump_json())["tasks"][task]
    settings = {key: value for key, value in settings.items() if value is not None}
    settings["dp"] = {**settings.get("dp", {}), "epsilon_per_run": EPSILON}
    if quick:
        settings["rounds"] = QUICK_ROUNDS[task]
    return settings


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{ "
            + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
            + " }"
        )
    return json.dumps(value)


def _scenario(dataset: RealDataset, quick: bool) -> str:
    settings = _task_settings(dataset.task, quick)
    lines = [
        f'name = "real-{dataset.name}"',
        "seed = 1",
        f"[tasks.{dataset.task}]",
        *(f"{key} = {_toml_value(value)}" for key, value in settings.items()),
        "[[splits]]",
        f'source = "{dataset.whole_config.name}"',
        f"sites = {SITES}",
        'prefix = "site"',
        'mode = "dirichlet"',
        f"alpha = {ALPHA}",
        f"epsilon = {2 * EPSILON}",
        f"delta = {DELTA}",
    ]
    return "\n".join(lines) + "\n"


def _base_model(dataset: RealDataset, folder: Path) -> None:
    if dataset.task == "tabular-classification":
        options = ["--site", dataset.whole_config.name]
    else:
        options = ["--classes", ",".join(dataset.classes)]
    _fedlora("model", "init", dataset.task, *options, "--out", "base", cwd=folder)


def _per_site(sites: list[Site], model: Path) -> dict[str, dict[str, Any]]:
    """The released model (fp32 export) on each site's held-out records."""
    classifier = OnnxClassifier(model)
    scores = {}
    for site in sites:
        holdout = site.load_data().holdout
        metrics = classification_metrics(classifier.logits(holdout.features), holdout.labels)
        scores[site.site_id] = {"accuracy": metrics["accuracy"], "auc": metrics["auc"]}
    return scores


def _alone(folder: Path, run_dir: Path, sites: list[Site], task: str) -> dict[str, float]:
    """Each site alone under DP with fedlora's own code, fresh ledgers, scored on the
    pooled held-out records."""
    federation = load_federation_config(run_dir / "federation" / f"{task}.toml")
    holdout = pooled([site.load_data().holdout for site in sites])
    accuracy = {}
    for site in sites:
        state = folder / "alone" / site.site_id
        state.mkdir(parents=True)
        identity = site.config.site.model_copy(update={"state_dir": state})
        config = site.config.model_copy(update={"site": identity})
        # The same person-key salt, so the same people are held out as in the federation.
        shutil.copy2(site.config.site.state_dir / SALT_FILE, state / SALT_FILE)
        alone = Site(config)
        accuracy[site.site_id] = federate(
            federation, [alone], holdout, private=True, run=f"alone-{site.site_id}"
        ).final
    return accuracy


def measure_dataset(name: str, root: Path, quick: bool) -> dict[str, Any]:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    dataset = WRITERS[name](folder)
    _base_model(dataset, folder)
    (folder / "study.toml").write_text(_scenario(dataset, quick))
    started = time.monotonic()
    _fedlora("simulate", "study.toml", "--out", "run", "--data-dir", "data", cwd=folder)
    seconds = time.monotonic() - started
    run_dir = folder / "run"
    summary = json.loads((run_dir / "summary.json").read_text())["tasks"][dataset.task]
    released = summary["artifact"]["metrics"]["fp32"]
    sites = [
        Site(load_site_config(path))
        for path in sorted((folder / "data" / "sites").glob("*/site.toml"))
    ]
    loaded = [site.load_data() for site in sites]
    train, holdout = (
        pooled([part.train for part in loaded]),
        pooled([part.holdout for part in loaded]),
    )
    central_dp = linear_baseline(train, holdout, (EPSILON, DELTA))
    central = linear_baseline(train, holdout, None)
    alone = _alone(folder, run_dir, sites, dataset.task)
    best_site = max(alone, key=alone.__getitem__)
    federated = float(released["accuracy"])
    ratio = federated / central_dp.accuracy
    figures = {
        "task": dataset.task,
        "records": dataset.records,
        "sites": {
            site.site_id: len(part.train.labels) + len(part.holdout.labels)
            for site, part in zip(sites, loaded, strict=True)
        },
        "rounds": summary["rounds_completed"],
        "simulate_seconds": round(seconds, 1),
        "federated_dp": {"accuracy": federated, "auc": released["auc"]},
        "centralised_dp_linear": {"accuracy": central_dp.accuracy, "auc": central_dp.auc},
        "centralised_linear": {"accuracy": central.accuracy, "auc": central.auc},
        "alone_dp": alone,
        "best_single_site": best_site,
        "per_site": _per_site(sites, run_dir / "exports" / dataset.task / "model.fp32.onnx"),
        "federated_over_centralised_dp": round(ratio, 4),
        "target": TARGETS[dataset.task],
        "adapter_bytes": summary["adapter_bytes"],
    }
    figures["meets_targets"] = ratio >= TARGETS[dataset.task] and federated > alone[best_site]
    logger.info(
        "%s: federated %.3f, centralised DP linear %.3f", name, federated, central_dp.accuracy
    )
    return figures


def run(root: Path, quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    datasets = {name: measure_dataset(name, root, quick) for name in (only or list(WRITERS))}
    return {
        "epsilon": EPSILON,
        "delta": DELTA,
        "sites": SITES,
        "alpha": ALPHA,
        "datasets": datasets,
        "meets_targets": all(figures["meets_targets"] for figures in datasets.values()),
    }


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    lines: list[tuple[str, str, str, bool | None]] = []
    for name, f in figures["datasets"].items():
        fed, dp, central = f["federated_dp"], f["centralised_dp_linear"], f["centralised_linear"]
        lines.append(
            (
                f"{name} accuracy fed DP / central DP linear / central linear",
                f"{fed['accuracy']:.3f} / {dp['accuracy']:.3f} / {central['accuracy']:.3f}",
                "",
                None,
            )
        )
        lines.append(
            (
                f"{name} fed DP / central DP linear",
                f"{f['federated_over_centralised_dp']:.3f}",
                f"≥ {f['target']:.2f}",
                verdict(f["federated_over_centralised_dp"], f["target"], at_least=True),
            )
        )
        best = f["best_single_site"]
        lines.append(
            (
                f"{name} fed DP > best site alone",
                f"{fed['accuracy']:.3f} vs {f['alone_dp'][best]:.3f} ({best})",
                "fed > alone",
                fed["accuracy"] > f["alone_dp"][best],
            )
        )
        per_site = ", ".join(
            f"{site} {s['accuracy']:.2f}/{'—' if s['auc'] is None else format(s['auc'], '.2f')}"
            for site, s in f["per_site"].items()
        )
        lines.append((f"{name} per site accuracy/AUC", per_site, "", None))
    return lines


def merged(earlier: dict[str, Any] | None, result: dict[str, Any]) -> dict[str, Any]:
    """``result``'s datasets over an earlier entry's (a run of some datasets only)."""
    if earlier is None or earlier.get("quick") != result.get("quick"):
        return result
    datasets = {**earlier.get("datasets", {}), **result["datasets"]}
    return {
        **result,
        "datasets": datasets,
        "meets_targets": all(figures["meets_targets"] for figures in datasets.values()),
    }


if __name__ == "__main__":
    import argparse
    import tempfile

    from benchmarks.results import RESULTS, record

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.utility_real", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="3-4 rounds instead of the default's")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(WRITERS),
        help="run these datasets; the others keep their figures in results.json",
    )
    parser.add_argument("--keep", type=Path, help="keep the datasets and runs in this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory(prefix="fedlora-utility-real-") as scratch:
        result = {"quick": args.quick, **run(args.keep or Path(scratch), args.quick, args.only)}
    earlier = json.loads(RESULTS.read_text()).get("utility_real") if RESULTS.exists() else None
    result = merged(earlier, result)
    for row in rows(result):
        print(" | ".join(str(cell) for cell in row))  # the benchmark's table
    record("utility_real", result)
