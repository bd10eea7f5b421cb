"""Robust and exact aggregation, measured on real federations (Flower Simulation Engine).

Five banks train the tabular task under DP. In the attacked runs one bank sends its
update multiplied by 1000. Side by side in one invocation:

- accuracy of ``fedavg`` and ``trimmed-mean`` (and ``median`` and the textbook
  ``trimmed-mean-symmetric``), honest and attacked,
  with the update-norm check and the rollback guard off so the aggregators alone are
  measured; and ``fedavg`` attacked with both on (the defaults);
- the LoRA product error ‖agg(B)·agg(A) − mean(B·A)‖ / ‖mean(B·A)‖ of each round's
  aggregate on the sites' real updates: plain ``fedavg`` against ``fedavg-ffa``.

Every run starts from copies of the same generated sites (same data, same held-out
split, fresh privacy ledgers), so only the aggregator and the attack differ.

    python -m benchmarks.robustness [--quick] [--repeats N] [--cases CASE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results import record
from client.site import SALT_FILE
from common.cli import configure_logging
from simulations.runner import prepare, run_task
from simulations.scenario import Scenario

logger = logging.getLogger("benchmarks.robustness")

TASK = "tabular-classification"
ATTACKER = "bank-5"


def scenario(rounds: int, customers: int) -> dict[str, Any]:
    return {
        "name": "robustness",
        "seed": 11,
        "tasks": {
            TASK: {
                "rounds": rounds,
                "batch_size": 128,
                "learning_rate": 0.3,
                "min_sites": 3,
                "dp": {"max_grad_norm": 0.5},
                # The aggregators alone: no norm check, no rollback guard.
                "validation": {"max_update_norm": "off"},
                "rollback": {"enabled": False},
            }
        },
        "sites": [
            {
                "id": f"bank-{index + 1}",
                "kind": "bank",
                "customers": customers,
                "default_rate": rate,
                "epsilon": 8.0,
            }
            for index, rate in enumerate((0.3, 0.35, 0.4, 0.45, 0.5))
        ],
    }


@dataclass(frozen=True)
class Case:
    name: str
    aggregator: str
    attacked: bool
    defenses: bool = False
    """The default defenses on: the derived update-norm check and the rollback guard."""

    @property
    def slug(self) -> str:
        """The case as a name for folders and result keys: ``fedavg-defenses-attacked``."""
        return self.name.replace(",", "").replace(" + ", "-").replace(" ", "-")


CASES = (
    Case("fedavg, honest", "fedavg", attacked=False),
    Case("trimmed-mean, honest", "trimmed-mean", attacked=False),
    Case("fedavg, attacked", "fedavg", attacked=True),
    Case("trimmed-mean, attacked", "trimmed-mean", attacked=True),
    Case("trimmed-mean-symmetric, attacked", "trimmed-mean-symmetric", attacked=True),
    Case("median, attacked", "median", attacked=True),
    Case("fedavg + defenses, attacked", "fedavg", attacked=True, defenses=True),
    Case("fedavg-ffa, honest", "fedavg-ffa", attacked=False),
)


def variant(base: dict[str, Any], case: Case) -> Scenario:
    document = json.loads(json.dumps(base))
    task = document["tasks"][TASK]
    task["aggregator"] = case.aggregator
    if case.defenses:
        task["validation"] = {"max_update_norm": "derived"}
        task["rollback"] = {"enabled": True}
    if case.attacked:
        attacker = next(s for s in document["sites"] if s["id"] == ATTACKER)
        attacker["behaviour"] = {"kind": "scaled", "factor": 1000.0}
    return Scenario.model_validate(document)


def prepare_template(base: dict[str, Any], root: Path) -> Path:
    """Generate the sites and base model once, with fixed person-key salts."""
    template = root / "template"
    prepare(Scenario.model_validate(base), root / "template-run", template)
    for site in base["sites"]:
        state = template / "sites" / site["id"] / "state"
        state.mkdir(parents=True, exist_ok=True)
        (state / SALT_FILE).write_bytes(site["id"].encode().ljust(32, b"\0"))
    return template


def run_case(
    base: dict[str, Any], case: Case, template: Path, root: Path, repeat: int
) -> dict[str, Any]:
    folder = root / f"{case.slug}-{repeat}"
    data_dir, run_dir = folder / "data", folder / "run"
    shutil.copytree(template, data_dir)
    prepared = prepare(variant(base, case), run_dir, data_dir)
    started = time.monotonic()
    run_task(
        prepared.federations[TASK],
        prepared.site_configs[TASK],
        run_dir,
        behaviours=prepared.behaviours[TASK],
    )
    result = json.loads((run_dir / "tasks" / f"{TASK}.json").read_text())
    return {
        "accuracy": result["final"]["accuracy"],
        "rejected_updates": sum(1 for e in result["exclusions"] if e["status"] == "rejected"),
        "lora_product_errors": [float(v) for v in result["lora_product_error"].values()],
        "seconds": time.monotonic() - started,
    }


def combine(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One case over its repeats: DP noise differs run to run, so report the mean."""
    accuracies = [r["accuracy"] for r in repeats]
    errors = [e for r in repeats for e in r["lora_product_errors"]]
    return {
        "accuracy": sum(accuracies) / len(accuracies),
        "accuracies": accuracies,
        "rejected_updates": sum(r["rejected_updates"] for r in repeats),
        "lora_product_error_max": max(errors) if errors else None,
        "seconds": round(sum(r["seconds"] for r in repeats) / len(repeats), 1),
    }


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Accuracy changes in points against honest fedavg, and the LoRA product errors."""
    summary: dict[str, Any] = {"cases": results}
    if "fedavg, honest" not in results:
        return summary
    honest = results["fedavg, honest"]["accuracy"]
    summary["honest_fedavg_accuracy"] = honest
    slugs = {case.name: case.slug for case in CASES}
    for name, case in results.items():
        key = slugs[name].replace("-", "_")
        summary[f"{key}_change_points"] = round(100 * (case["accuracy"] - honest), 2)
    summary["fedavg_lora_product_error_max"] = results["fedavg, honest"]["lora_product_error_max"]
    if "fedavg-ffa, honest" in results:
        summary["ffa_lora_product_error_max"] = results["fedavg-ffa, honest"][
            "lora_product_error_max"
        ]
    return summary


def print_table(summary: dict[str, Any]) -> None:
    honest = summary.get("honest_fedavg_accuracy")
    lines = [
        f"{'case':34} {'accuracy (mean)':>15} {'vs honest fedavg':>17} {'rejected':>9} "
        f"{'LoRA product error':>19} {'s/run':>6}  accuracy per repeat"
    ]
    for name, case in summary["cases"].items():
        error = case["lora_product_error_max"]
        change = f"{100 * (case['accuracy'] - honest):+.1f} points" if honest else "—"
        lines.append(
            f"{name:34} {case['accuracy']:15.3f} {change:>17} {case['rejected_updates']:9d} "
            f"{error if error is not None else float('nan'):19.2e} {case['seconds']:6.0f}  "
            + ", ".join(f"{a:.3f}" for a in case["accuracies"])
        )
    print("\n".join(lines))  # a benchmark's output is its table
    print(  # the figures the README quotes
        "\nLoRA product error: max over the rounds of ‖agg(B)·agg(A) − mean(B·A)‖ / "
        "‖mean(B·A)‖ (fedavg-ffa target: ≤ 1e-6); accuracy: federated held-out accuracy "
        "of the final adapter, mean over the repeats"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="Fewer rounds and customers (a few minutes)."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Runs per case; accuracy is averaged (DP noise varies run to run).",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[case.name for case in CASES],
        metavar="CASE",
        help="Only these cases (default: all): " + "; ".join(case.name for case in CASES),
    )
    parser.add_argument(
        "--keep", type=Path, help="Keep the run directories here instead of a temporary folder."
    )
    args = parser.parse_args(argv)
    configure_logging(verbose=False)
    logger.setLevel(logging.INFO)
    rounds, customers = (4, 400) if args.quick else (10, 800)
    base = scenario(rounds, customers)
    cases = [case for case in CASES if not args.cases or case.name in args.cases]
    with tempfile.TemporaryDirectory(prefix="fedlora-robustness-") as scratch:
        root = args.keep or Path(scratch)
        template = prepare_template(base, root)
        results = {}
        for case in cases:
            repeats = []
            for repeat in range(args.repeats):
                logger.info("running %s (%d of %d)", case.name, repeat + 1, args.repeats)
                repeats.append(run_case(base, case, template, root, repeat))
            results[case.name] = combine(repeats)
    summary = summarise(results)
    print_table(summary)
    record(
        "robustness",
        {
            "quick": args.quick,
            "rounds": rounds,
            "customers": customers,
            "repeats": args.repeats,
            **summary,
        },
    )
    return summary


if __name__ == "__main__":
    main()
