"""The main job as a user runs it: ``fedlora simulate`` on the default scenario.

It runs as its own process (the installed ``fedlora`` command), on a fresh copy of the
generated sites (data and base models exist, as from the second run on; ledgers are
fresh). Wall time is the command's; peak memory is the largest sum of resident memory
over the command's whole process tree (Flower's simulation workers included), sampled
every 0.2 s, and the largest single process beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from typing import Any

import psutil
import tomli_w

from benchmarks.fixtures import Template
from benchmarks.measure import mib
from common.processes import executable, flower_environment
from simulations.scenario import Scenario

logger = logging.getLogger("benchmarks.end_to_end")

SAMPLE_SECONDS = 0.2


def tree_resident_bytes(process: psutil.Process) -> tuple[int, int]:
    """(sum, largest) resident bytes of a process and all its descendants."""
    sizes = []
    for member in [process, *process.children(recursive=True)]:
        try:
            sizes.append(member.memory_info().rss)
        except psutil.Error:  # it ended between listing and reading
            continue
    return sum(sizes), max(sizes, default=0)


def run(template: Template, quick: bool) -> dict[str, Any]:
    folder = template.root / "end-to-end"
    data_dir, run_dir = folder / "data", folder / "run"
    shutil.copytree(template.data_dir, data_dir)
    scenario_file = folder / "scenario.toml"
    document = Scenario.model_validate(template.document).model_dump(mode="json", exclude_none=True)
    scenario_file.write_text(tomli_w.dumps(document))
    command = [
        executable("fedlora"),
        "simulate",
        str(scenario_file),
        "--out",
        str(run_dir),
        "--data-dir",
        str(data_dir),
    ]
    logger.info("end_to_end: %s", " ".join(command[1:2]))
    peak_sum = peak_single = 0
    started = time.perf_counter()
    with (folder / "simulate.log").open("w") as log:
        child = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=flower_environment()
        )
        watched = psutil.Process(child.pid)
        while child.poll() is None:
            total, single = tree_resident_bytes(watched)
            peak_sum, peak_single = max(peak_sum, total), max(peak_single, single)
            time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        tail = (folder / "simulate.log").read_text()[-2000:]
        raise RuntimeError(f"fedlora simulate exited {child.returncode}:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "quick": quick,
        "seconds": wall,
        "run_dir": str(run_dir),
        "simulation_seconds": summary.get("wall_seconds"),
        "peak_tree_bytes": peak_sum,
        "peak_process_bytes": peak_single,
        "final_accuracy": {
            task: (entry.get("final") or {}).get("accuracy")
            for task, entry in summary.get("tasks", {}).items()
        },
    }


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    accuracy = ", ".join(
        f"{task} {value:.3f}" for task, value in figures["final_accuracy"].items() if value
    )
    return [
        (
            "fedlora simulate (default scenario)",
            f"{figures['seconds']:.0f} s wall, peak {mib(figures['peak_tree_bytes'])} MiB "
            f"(process tree; largest process {mib(figures['peak_process_bytes'])} MiB); "
            f"{accuracy}",
            "",
            None,
        )
    ]
