"""What Flower costs: a federated round in simulation against the sites' own work.

The Flower run is the end_to_end entry's ``fedlora simulate`` of the default scenario,
on fresh copies of the same sites. Each round's wall time is read from the coordinator's
signed audit log: from the round's ``round-started`` (train) to the next one's, so it
holds the whole round (sending the adapter, the sites' training, validation and
aggregation, the evaluation phase, the checkpoint); the last round, which ends with the
artifact, is left out. The baseline is the same sites' local training time for the same
round, summed over the sites: ``Site.train`` called directly, with nothing in between,
in the utility entry's federated DP run (the cost of a round does not depend on ε).

Figures: the ratio per round, the median over the steady rounds (round 2 on: round 1
also starts Ray and the ClientApp actors), round 1 alone, and the whole command against
all the local training. Target: ≤ 1.25×.
"""

from __future__ import annotations

import logging
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.measure import verdict
from common.audit.log import read_entries
from server.audit import coordinator_log_path

logger = logging.getLogger("benchmarks.framework")

TARGET = 1.25


def round_starts(log: Path) -> dict[int, float]:
    """Seconds (epoch) at which each round's training phase started, from the audit log."""
    starts: dict[int, float] = {}
    for entry in read_entries(log):
        data = entry.get("data", {})
        if entry.get("event") == "round-started" and data.get("phase") == "train":
            stamp = datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))
            starts.setdefault(int(data["round"]), stamp.timestamp())
    return starts


def round_seconds(starts: dict[int, float]) -> dict[int, float]:
    """Wall time of each round that another round followed."""
    return {r: starts[r + 1] - starts[r] for r in sorted(starts) if r + 1 in starts}


def run(
    run_dir: Path, run_seconds: float, local_train_seconds: dict[str, list[float]]
) -> dict[str, Any]:
    """``local_train_seconds``: task -> per round, the sites' summed local training time."""
    tasks: dict[str, Any] = {}
    for task, local in local_train_seconds.items():
        rounds = round_seconds(round_starts(coordinator_log_path(run_dir, task)))
        ratios = {r: seconds / local[r - 1] for r, seconds in rounds.items() if r <= len(local)}
        steady = [ratios[r] for r in ratios if r >= 2]
        tasks[task] = {
            "round_seconds": rounds,
            "local_train_seconds": local,
            "ratio_per_round": ratios,
            "ratio": statistics.median(steady) if steady else None,
            "first_round_ratio": ratios.get(1),
        }
        tasks[task]["meets_targets"] = bool(verdict(tasks[task]["ratio"], TARGET))
    local_total = sum(sum(local) for local in local_train_seconds.values())
    return {
        "target": TARGET,
        "tasks": tasks,
        "run_seconds": run_seconds,
        "run_ratio": run_seconds / local_total,
        "meets_targets": all(t["meets_targets"] for t in tasks.values()),
    }


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    lines: list[tuple[str, str, str, bool | None]] = []
    for task, f in figures["tasks"].items():
        steady = [s for r, s in f["round_seconds"].items() if int(r) >= 2]
        local = f["local_train_seconds"][1:]
        lines.append(
            (
                f"{task} Flower round / local training",
                f"{f['ratio']:.2f}× (median round {statistics.median(steady):.1f} s vs "
                f"{statistics.median(local):.1f} s; round 1 {f['first_round_ratio']:.2f}×)"
                if f["ratio"] is not None
                else "too few rounds",
                "≤ 1.25×",
                f["meets_targets"],
            )
        )
    lines.append(
        (
            "whole simulate command / all local training",
            f"{figures['run_ratio']:.2f}× ({figures['run_seconds']:.0f} s: Ray start-up, "
            "data checks, evaluation, artifacts included)",
            "",
            None,
        )
    )
    return lines
