"""What a finished run directory says, for a person: summary.json's task entries, the
plots (accuracy and ε per round) and the console table. A simulation and a deployment
(``fedlora coordinator run``) end with the same ones."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

from common.artifact import MODEL_INT8, VerifiedArtifact, verify_artifact
from common.audit.report import write_report
from common.audit.review import COORDINATOR_PUBLIC_KEY, verify_path
from common.errors import ArtifactError
from common.signing import load_public_key

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.distribution import ARTIFACTS_DIR
from server.reporting import FEDERATED
from server.run import RESULT_DIR
from server.strategy_utils import EXCLUSION_STATUSES


def read_result(run_dir: Path, task: str) -> dict[str, Any]:
    """What the ServerApp saved for ``task`` (``tasks/<task>.json``)."""
    return dict(json.loads((run_dir / RESULT_DIR / f"{task}.json").read_text()))


def task_entry(
    result: dict[str, Any], sites: list[str], artifact: dict[str, Any]
) -> dict[str, Any]:
    """summary.json's entry for one task's run."""
    return {
        "rounds_completed": result["rounds_completed"],
        "rounds_planned": result["rounds_planned"],
        "final": result["final"],
        "per_round": result["per_round"],
        "sites": sites,
        "aggregator": result["aggregator"],
        "base_model_sha256": result["base_model_sha256"],
        "adapter_bytes": result["adapter_bytes"],
        "model_parameters_bytes": result["model_parameters_bytes"],
        "exclusions": result["exclusions"],
        "excluded_updates": count_statuses(result["exclusions"], "train"),
        "rollbacks": result["rollbacks"],
        "failed_rounds": result["failed_rounds"],
        "lora_product_error": result["lora_product_error"],
        "artifact": artifact,
    }


def verify_released_artifact(
    run_dir: Path, task: str, released: dict[str, Any]
) -> tuple[dict[str, Any], VerifiedArtifact | None]:
    """Verify the task's artifact with the run's key, as a reviewer would. ``installed``
    lists the sites that reported a verified install."""
    directory = run_dir / ARTIFACTS_DIR / task
    reasons = {
        "check_failures": released.get("check_failures", {}),
        "install_failures": released.get("install_failures", {}),
    }
    status = released.get("status")
    if status in ("unchecked", "failed"):  # nothing was released: say why, not "tampered"
        why = released.get("error") or "no site could check it"
        return {
            "verified": False,
            "problem": f"not released ({why})",
            "installed": [],
            **reasons,
        }, None
    key = load_public_key(run_dir / COORDINATOR_PUBLIC_KEY)
    try:
        verified = verify_artifact(directory, key)
    except ArtifactError as exc:
        return {
            "verified": False,
            "problem": f"{exc.kind}: {exc}",
            "installed": [],
            **reasons,
        }, None
    manifest = verified.manifest
    metrics = manifest.metrics
    summary = {
        "verified": True,
        "checked": metrics is not None,
        "directory": str(directory.relative_to(run_dir)),
        "manifest_sha256": verified.manifest_sha256,
        "int8_bytes": manifest.files[MODEL_INT8].bytes,
        "fp32_bytes": manifest.quantization.fp32_onnx_bytes,
        "metrics": metrics.model_dump() if metrics else None,
        "installed": list(released.get("installed", [])),
        **reasons,
    }
    return summary, verified


def deployment_summary(
    run_dir: Path, tasks: list[str], wall_seconds: float, name: str
) -> dict[str, Any]:
    """summary.json for a deployment run: what the coordinator learned from the sites'
    replies (their reported ε, not their ledgers, which stay at the sites)."""
    entries: dict[str, Any] = {}
    sites: dict[str, Any] = {}
    for task in tasks:
        result = read_result(run_dir, task)
        released, _ = verify_released_artifact(run_dir, task, result.get("artifact") or {})
        names = sorted(set(result["sites"]) | set(result.get("site_kinds", {})))
        entries[task] = task_entry(result, names, released)
        for site in names:
            record = result["site_privacy"].get(site) or {}
            sites[site] = site_entry(
                result,
                site,
                kind=result.get("site_kinds", {}).get(site, ""),
                task=task,
                epsilon_spent=record.get("epsilon", 0.0),
                epsilon_budget=record.get("epsilon_budget", 0.0),
                delta=record.get("delta", 0.0),
            )
    return write_summary(run_dir, name, wall_seconds, entries, sites)


def site_entry(
    result: dict[str, Any],
    site: str,
    *,
    kind: str,
    task: str,
    epsilon_spent: float,
    epsilon_budget: float,
    delta: float,
    behaviour: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's entry for one site of a task's run; the privacy figures come from
    whoever may know them (the site's ledger in a simulation, its replies otherwise)."""
    record = result["site_privacy"].get(site) or {}
    excluded = count_statuses([r for r in result["exclusions"] if r["site"] == site], "train")
    return {
        "kind": kind,
        "task": task,
        "examples": record.get("examples", 0),
        "rounds_trained": record.get("rounds_trained", 0),
        "rounds_refused": excluded["refused"],
        "updates_excluded": sum(excluded.values()) - excluded["refused"],
        "epsilon_spent": epsilon_spent,
        "epsilon_budget": epsilon_budget,
        "behaviour": behaviour,
        "delta": delta,
    }


def write_summary(
    run_dir: Path,
    name: str,
    wall_seconds: float,
    tasks: dict[str, Any],
    sites: dict[str, Any],
) -> dict[str, Any]:
    """Write summary.json (the audit trail verified and its report written first)."""
    summary = {
        "scenario": name,
        "wall_seconds": round(wall_seconds, 1),
        "tasks": tasks,
        "sites": sites,
        "audit": audit_summary(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def audit_summary(run_dir: Path) -> dict[str, Any]:
    """Verify the run's audit trail and write its HTML report, as a reviewer would."""
    reports = verify_path(run_dir)
    report = write_report(run_dir, reports=reports)
    return {
        "logs": len(reports),
        "intact": all(r.verification.ok for r in reports),
        "problems": [
            f"{r.path.name}: {r.verification.first_problem}"
            for r in reports
            if not r.verification.ok
        ],
        "report": str(report.relative_to(run_dir)),
    }


def count_statuses(exclusions: list[dict[str, Any]], phase: str) -> dict[str, int]:
    """How many of a phase's exclusions had each status (refused, rejected, …)."""
    return {
        status: sum(1 for e in exclusions if e["phase"] == phase and e["status"] == status)
        for status in EXCLUSION_STATUSES
    }


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


Series = dict[str, list[tuple[int, float]]]


def plot_series(rows: list[dict[str, str]], task: str) -> tuple[Series, Series]:
    """Per site: (round, held-out accuracy) from evaluate rows, (round, ε) from train rows."""
    accuracy: Series = defaultdict(list)
    epsilon: Series = defaultdict(list)
    for row in rows:
        if row["task"] != task:
            continue
        point = int(row["round"])
        if row["phase"] == "evaluate" and row["accuracy"]:
            accuracy[row["site"]].append((point, float(row["accuracy"])))
        elif row["phase"] == "train" and row["epsilon"]:
            epsilon[row["site"]].append((point, float(row["epsilon"])))
    return accuracy, epsilon


def write_plots(run_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """One figure per task: federated and per-site accuracy, and ε per site vs budget."""
    rows = read_metrics(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    written: list[Path] = []
    for task in summary["tasks"]:
        accuracy, epsilon = plot_series(rows, task)
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        sites = sorted(s for s in summary["sites"] if summary["sites"][s]["task"] == task)
        colours = {site: f"C{index + 1}" for index, site in enumerate(sites)}
        colours[FEDERATED] = "C0"
        for site, points in sorted(accuracy.items()):
            federated = site == FEDERATED
            left.plot(
                *zip(*points, strict=True),
                marker="o",
                color=colours.get(site),
                linewidth=2.5 if federated else 1,
                alpha=1 if federated else 0.6,
                label="federated" if federated else site,
            )
        left.set(
            title=f"{task}: held-out accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1.02)
        )
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        top = 0.0
        for site in sites:
            budget = summary["sites"][site]["epsilon_budget"]
            top = max(top, budget)
            right.axhline(budget, color=colours[site], linestyle="--", alpha=0.5)
            if site in epsilon:
                right.plot(
                    *zip(*epsilon[site], strict=True), marker="o", color=colours[site], label=site
                )
            else:  # refused every round: its lifetime ε, flat
                right.axhline(
                    summary["sites"][site]["epsilon_spent"],
                    color=colours[site],
                    label=f"{site} (refused)",
                )
        right.set(
            title=f"{task}: lifetime ε per site (dashed: budget)",
            xlabel="round",
            ylabel="ε",
            ylim=(0, top * 1.08),
        )
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
        figure.tight_layout()
        path = plots / f"{task}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def round_progress(console: Console) -> Progress:
    """The progress display of a run: one bar per task, counting rounds."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def print_summary(
    summary: dict[str, Any], run_dir: Path, console: Console, kind: str = "simulation"
) -> None:
    """The console report of a finished run: the tasks and sites tables, then notes on
    faults, artifacts, exclusions and the audit trail."""
    tasks = _tasks_table(summary, kind)
    sites = _sites_table(summary)
    console.print(tasks)
    console.print(sites)
    console.print(
        "refused: rounds a site's policy or budget said no; excluded: updates rejected by "
        "validation, error replies and timeouts (reasons in metrics.csv)"
    )
    _print_faults(summary, console)
    _print_artifacts(summary, run_dir, console)
    _print_exclusions(summary, console)
    _print_audit(summary, run_dir, console)
    console.print(f"run directory: {run_dir}  ({summary['wall_seconds']:.0f} s)", markup=False)


_TASK_ROWS = (
    "aggregator",
    "rounds",
    "accuracy",
    "loss",
    "sites",
    "refused",
    "excluded",
    "rollbacks",
    "artifact",
    "size int8/fp32",
    "acc fp32→int8",
    "installed at",
)
"""The rows of the tasks table, top to bottom."""


def _tasks_table(summary: dict[str, Any], kind: str) -> Table:
    """One column per task, so the table stays narrow however many figures a task has."""
    tasks = Table(title=f"fedlora {kind} — {summary['scenario']!r}")
    tasks.add_column("")
    for name in summary["tasks"]:
        tasks.add_column(name, justify="right")
    columns = [_task_cells(task) for task in summary["tasks"].values()]
    for label in _TASK_ROWS:
        tasks.add_row(label, *(cells[label] for cells in columns))
    return tasks


def _task_cells(task: dict[str, Any]) -> dict[str, str]:
    """One task's column of the tasks table: row label -> cell."""
    excluded = task["excluded_updates"]
    artifact = task["artifact"]
    metrics = artifact.get("metrics")
    return {
        "aggregator": task["aggregator"],
        "rounds": f"{task['rounds_completed']}/{task['rounds_planned']}",
        "accuracy": f"{task['final']['accuracy']:.3f}",
        "loss": f"{task['final']['loss']:.3f}",
        "sites": str(len(task["sites"])),
        "refused": str(excluded["refused"]),
        "excluded": str(sum(excluded.values()) - excluded["refused"]),
        "rollbacks": str(len(task["rollbacks"])),
        "artifact": _artifact_status(artifact),
        "size int8/fp32": f"{artifact['int8_bytes'] / artifact['fp32_bytes']:.2f}"
        if artifact["verified"]
        else "—",
        "acc fp32→int8": f"{metrics['fp32']['accuracy']:.3f}→{metrics['int8']['accuracy']:.3f}"
        if metrics
        else "—",
        "installed at": f"{len(artifact['installed'])}/{len(task['sites'])} sites",
    }


def _artifact_status(artifact: dict[str, Any]) -> str:
    """The artifact's state, in console markup: verified, unchecked, not released or not
    verified."""
    if artifact["verified"]:
        return "verified" if artifact["checked"] else "[yellow]unchecked[/yellow]"
    if artifact["problem"].startswith("not released"):
        return "[yellow]not released[/yellow]"
    return "[red]NOT VERIFIED[/red]"


def _sites_table(summary: dict[str, Any]) -> Table:
    """One row per site: its records, rounds and ε."""
    deltas = sorted({f"{site['delta']:g}" for site in summary["sites"].values()})
    sites = Table(title=f"sites (δ = {', '.join(deltas)})")
    for column in ("site", "records", "rounds", "refused", "excluded", "ε spent", "ε budget"):
        sites.add_column(column, justify="left" if column == "site" else "right", no_wrap=True)
    for name, site in summary["sites"].items():
        sites.add_row(
            name,
            str(site["examples"]),
            str(site["rounds_trained"]),
            str(site["rounds_refused"]),
            str(site["updates_excluded"]),
            f"{site['epsilon_spent']:.2f}",
            f"{site['epsilon_budget']:.2f}",
        )
    return sites


def _print_faults(summary: dict[str, Any], console: Console) -> None:
    """The faults a scenario injected, if any."""
    faulty = [
        f"{name} ({_describe(site['behaviour'])})"
        for name, site in summary["sites"].items()
        if site.get("behaviour")
    ]
    if faulty:
        console.print("injected faults: " + ", ".join(faulty))


def _print_artifacts(summary: dict[str, Any], run_dir: Path, console: Console) -> None:
    """Where each task's artifact is (or why there is none), and the sites that did not
    take it."""
    for name, task in summary["tasks"].items():
        artifact = task["artifact"]
        if artifact["verified"]:
            console.print(f"{name} artifact: {run_dir / artifact['directory']}", markup=False)
        else:
            console.print(f"{name} artifact: {artifact['problem']}", markup=False)
        for site, reason in {
            **artifact.get("check_failures", {}),
            **artifact.get("install_failures", {}),
        }.items():
            console.print(f"  {site} did not take the artifact: {reason}", markup=False)


def _print_exclusions(summary: dict[str, Any], console: Console) -> None:
    """Per task, how many updates ended in each exclusion status (those that did)."""
    for name, task in summary["tasks"].items():
        counts = {k: v for k, v in task["excluded_updates"].items() if v}
        if counts:
            details = ", ".join(f"{count} {status}" for status, count in counts.items())
            console.print(f"{name}: {details}", markup=False)


def _print_audit(summary: dict[str, Any], run_dir: Path, console: Console) -> None:
    """Whether the audit trail verified, and where its report is."""
    audit = summary["audit"]
    if audit["intact"]:
        console.print(f"audit trail: {audit['logs']} signed logs verified intact")
    else:
        problems = escape("; ".join(audit["problems"]))
        console.print(f"[red]audit trail: NOT intact[/red]: {problems}")
    console.print(f"audit report: {run_dir / audit['report']}", markup=False)


def _describe(behaviour: dict[str, Any]) -> str:
    kind = behaviour["kind"]
    detail = {"scaled": f" ×{behaviour['factor']:g}", "slow": f" {behaviour['delay']:g} s"}
    since = f" from round {behaviour['from_round']}" if behaviour["from_round"] > 1 else ""
    return f"{kind}{detail.get(kind, '')}{since}"
