"""fedlora's performance benchmarks: the cost of privacy and of federation.

    python -m benchmarks [--quick] [--only ENTRY ...] [--keep DIR]

Every figure is a ratio measured side by side in the same invocation. The table is
printed at the end and each entry is written to benchmarks/results.json under its name:

  dp_overhead         DP-SGD step time and peak memory against non-private training,
                      per task, for Opacus's hooks, functorch and ghost clipping
                      (targets ≤ 1.3× and ≤ 1.3×)
  traffic             the update a site sends per round against the full model, per task
                      and for ViT-B/16 (target ≤ 0.5% for ViT-B/16, r=16 on q and v)
  aggregation         aggregation time and peak memory for 10, 100, 1000 ViT-B/16
                      updates, streaming against stacking (≤ 0.25 s at 1000, flat memory)
  utility             accuracy of federated DP (ε=8), federated and centralised
                      non-private training, and the best site alone under DP
                      ((a)/(b) ≥ 0.95, (b)/(c) ≥ 0.97, (a) > (d))
  utility_real        real public data (scikit-learn's breast cancer table, statsmodels'
                      anes96 table, scikit-learn's digits written as DICOM), each split
                      across 3 sites (Dirichlet α=0.5) and run by `fedlora simulate` at
                      ε=4, against a centralised DP linear model (Opacus), the same
                      without DP and the best site alone (≥ 0.95× tables, ≥ 0.90×
                      images, above the best site)
  end_to_end          the default `fedlora simulate`: wall time and peak memory
  framework_overhead  a Flower round in simulation (end_to_end's run) against the
                      sites' local training (utility's run): ≤ 1.25×
  site_overhead       a site's time outside training per round, with its site service
                      against a site rebuilt per message, per task and at the real-size
                      text preset (≤ 1 s and ≤ 5% of the round after the first)

--quick runs every entry on smaller settings (half the people at each site, 3–4
rounds, fewer repeats) in under 5 minutes.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import (
    aggregation,
    dp_overhead,
    end_to_end,
    framework,
    site_overhead,
    traffic,
    utility,
    utility_real,
)
from benchmarks.fixtures import Template, make_template, scenario_document
from benchmarks.results import RESULTS, record
from common.cli import configure_logging

logger = logging.getLogger("benchmarks")

ENTRIES = (
    "dp_overhead",
    "traffic",
    "aggregation",
    "utility",
    "utility_real",
    "end_to_end",
    "framework_overhead",
    "site_overhead",
)
NEEDS = {"framework_overhead": ("utility", "end_to_end")}
"""framework_overhead compares end_to_end's Flower rounds with utility's local training."""
Row = tuple[str, str, str, bool | None]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure what privacy and federation cost: each figure a ratio "
        "against a baseline measured in the same run. Prints a table and writes "
        "benchmarks/results.json.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smaller settings (half the people per site, 3-4 rounds, fewer repeats): "
        "every entry in under 5 minutes.",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ENTRIES,
        metavar="ENTRY",
        help="Run only these entries (framework_overhead also runs utility and "
        f"end_to_end, which it compares). Entries: {', '.join(ENTRIES)}.",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="Keep the generated sites and run directories here (default: a temporary "
        "folder, removed at the end).",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="The results file to update (default: benchmarks/results.json).",
    )
    return parser.parse_args(argv)


def chosen_entries(only: list[str] | None) -> list[str]:
    """The entries to run, in order, with the ones they compare against."""
    chosen = [entry for entry in ENTRIES if not only or entry in only]
    needed = {need for entry in chosen for need in NEEDS.get(entry, ())}
    return [entry for entry in ENTRIES if entry in chosen or entry in needed]


def print_table(sections: dict[str, list[Row]]) -> None:
    width = max((len(row[0]) for rows in sections.values() for row in rows), default=20)
    verdicts = {True: "met", False: "MISSED", None: ""}
    lines = []
    for name, rows in sections.items():
        lines.append(f"\n{name}")
        for label, figure, target, met in rows:
            lines.append(f"  {label:<{width}}  {figure}  {target}  {verdicts[met]}".rstrip())
    print("\n".join(lines))  # a benchmark's output is its table


def run_entry(
    entry: str, template: Template, quick: bool, earlier: dict[str, Any]
) -> tuple[dict[str, Any], list[Row]]:
    """One entry's figures and table rows; ``earlier`` holds the entries already run."""
    if entry == "dp_overhead":
        values = dp_overhead.run(template, quick)
        return values, dp_overhead.rows(values)
    if entry == "traffic":
        values = traffic.run(template)
        return values, traffic.rows(values)
    if entry == "aggregation":
        values = aggregation.run(quick)
        return values, aggregation.rows(values)
    if entry == "utility":
        values = utility.run(template, quick)
        return values, utility.rows(values)
    if entry == "utility_real":
        values = utility_real.run(template.root / "utility_real", quick)
        return values, utility_real.rows(values)
    if entry == "end_to_end":
        values = end_to_end.run(template, quick)
        return values, end_to_end.rows(values)
    if entry == "site_overhead":
        values = site_overhead.run(template, quick)
        return values, site_overhead.rows(values)
    baseline = {
        task: task_figures["local_train_seconds_per_round"]
        for task, task_figures in earlier["utility"]["tasks"].items()
    }
    flower = earlier["end_to_end"]
    values = framework.run(Path(flower["run_dir"]), flower["seconds"], baseline)
    return values, framework.rows(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    configure_logging(verbose=False)
    logger.setLevel(logging.INFO)
    for name in (
        "benchmarks.dp_overhead",
        "benchmarks.aggregation",
        "benchmarks.utility",
        "benchmarks.utility_real",
        "benchmarks.site_overhead",
    ):
        logging.getLogger(name).setLevel(logging.INFO)
    chosen = chosen_entries(args.only)
    started = time.monotonic()
    figures: dict[str, Any] = {}
    sections: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-benchmarks-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        logger.info("generating the %sdefault scenario's sites", "quick " if args.quick else "")
        template = make_template(root, scenario_document(args.quick))
        for entry in chosen:
            logger.info("running %s", entry)
            entry_started = time.monotonic()
            values, rows = run_entry(entry, template, args.quick, figures)
            values = {
                "quick": args.quick,
                "benchmark_seconds": round(time.monotonic() - entry_started, 1),
                **values,
            }
            figures[entry] = values
            sections[entry] = rows
            record(entry, values, args.results or RESULTS)
    print_table(sections)
    print(f"\n{len(chosen)} entries in {time.monotonic() - started:.0f} s; written to results.json")
    return figures


if __name__ == "__main__":
    main()
