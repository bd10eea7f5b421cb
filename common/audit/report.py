"""``fedlora audit report``: one self-contained HTML page per run, built from its logs.

Everything shown is read from the signed logs (not from summary files an operator could
edit), next to the verdict of verifying them. Plots are inline SVG, styles and the
timeline filter inline too: the page opens from disk, offline, in any browser.

What a coordinator log says about its run is read by :mod:`common.audit.run_record`;
the page's fixed style sheet and script are in :mod:`common.audit.report_assets`.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.audit.reconcile import Reconciliation, reconcile
from common.audit.report_assets import SCRIPT, STYLE
from common.audit.review import (
    AUDIT_DIR,
    LogReport,
    entry_row,
    find_logs,
    in_time_order,
    real_number,
    verify_path,
)
from common.audit.run_record import MAX_ROUNDS_SHOWN, TaskRun, read_task_run, task_run
from common.errors import AuditError

__all__ = [
    "MAX_ROUNDS_SHOWN",
    "PARTICIPATION_MARKS",
    "REPORT_NAME",
    "SCRIPT",
    "STYLE",
    "TaskRun",
    "accuracy_plot",
    "epsilon_plot",
    "read_task_run",
    "render_report",
    "task_run",
    "write_report",
]

REPORT_NAME = "report.html"

PARTICIPATION_MARKS = {
    "accepted": ("✓", "accepted"),
    "rejected": ("✗", "rejected"),
    "refused": ("R", "refused"),
    "timed-out": ("T", "timed-out"),
    "failed": ("F", "failed"),
}


# ---------------------------------------------------------------------- plots ---


def _svg(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def accuracy_plot(run: TaskRun) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Text stays text in the SVG; a '$' in a (tampered) name is not read as math.
    with plt.rc_context({"svg.fonttype": "none", "text.parse_math": False}):
        figure, axis = plt.subplots(figsize=(5.5, 3.2))
        rounds = sorted(run.accuracy)
        axis.plot(rounds, [run.accuracy[r] for r in rounds], marker="o", label="accuracy")
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("round")
        axis.set_ylabel("federated accuracy")
        axis.grid(alpha=0.3)
        twin = axis.twinx()
        twin.plot(rounds, [run.loss[r] for r in rounds], color="tab:red", ls="--", label="loss")
        twin.set_ylabel("loss")
        axis.set_title(f"{run.task}: accuracy and loss per round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = axis.get_legend_handles_labels()
        twin_handles, twin_labels = twin.get_legend_handles_labels()
        axis.legend(
            handles + twin_handles, labels + twin_labels, fontsize="small", loc="center left"
        )
        return _svg(figure)


def epsilon_plot(run: TaskRun, budgets: dict[str, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Text stays text in the SVG; a '$' in a (tampered) name is not read as math.
    with plt.rc_context({"svg.fonttype": "none", "text.parse_math": False}):
        figure, axis = plt.subplots(figsize=(5.5, 3.2))
        for site in sorted(run.epsilon):
            rounds = sorted(run.epsilon[site])
            line = axis.plot(
                rounds, [run.epsilon[site][r] for r in rounds], marker="o", label=site
            )[0]
            if site in budgets:
                axis.axhline(budgets[site], color=line.get_color(), ls=":", lw=1)
        axis.set_xlabel("round")
        axis.set_ylabel("ε reported (lifetime)")
        axis.set_ylim(bottom=0)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(f"{run.task}: ε per site (dotted: budget)")
        axis.grid(alpha=0.3)
        if run.epsilon:
            axis.legend(fontsize="small")
        return _svg(figure)


# ----------------------------------------------------------------------- page ---


def _cell(value: object, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{escape('' if value is None else str(value))}</td>"


def _short(digest: object) -> str:
    text = "" if digest is None else str(digest)
    return text[:16] + "…" if len(text) > 16 else text


def _verification_section(reports: list[LogReport], pinned: bool) -> str:
    intact = all(report.verification.ok for report in reports)
    bad = [report for report in reports if not report.verification.ok]
    verdict = (
        f"All {len(reports)} audit logs intact: chains, signatures and signed heads verified."
        if intact
        else f"{len(bad)} of {len(reports)} audit logs are NOT intact: "
        + ", ".join(report.path.name for report in bad)
        + " (see below)."
    )
    if not pinned:
        verdict += (
            " No key was pinned: the coordinator's key came from this directory, so this "
            "shows integrity, not who signed (run `fedlora audit report --key`)."
        )
    rows = []
    for report in reports:
        verification = report.verification
        first = verification.first_problem
        rows.append(
            "<tr>"
            + _cell(report.path.name, "mono")
            + _cell(verification.actor)
            + _cell(verification.entries)
            + _cell(verification.key, "mono")
            + _cell(report.key_source)
            + _cell(
                "intact" if verification.ok else "NOT INTACT",
                "accepted" if verification.ok else "rejected",
            )
            + _cell("" if first is None else str(first))
            + "</tr>"
        )
    return (
        f'<div id="verification-status" class="status {"ok" if intact else "bad"}">'
        f"{escape(verdict)}</div>"
        '<h2>Verification</h2><table id="verification"><thead><tr><th>log</th><th>party</th>'
        "<th>entries</th><th>key</th><th>key checked against</th><th>status</th>"
        "<th>first problem</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _site_budgets(site_logs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    budgets: dict[str, float] = {}
    for site, entries in site_logs.items():
        for entry in entries:
            data = entry.get("data")
            if not isinstance(data, dict):
                continue
            budget = real_number(data.get("epsilon_budget"))
            if entry.get("event") == "training-done" and budget is not None:
                budgets[site] = budget
    return budgets


def _outcome(run: TaskRun) -> str:
    """How the run ended, in one line."""
    finished = run.finished or {}
    return (
        f"finished: {finished.get('rounds_completed')} rounds aggregated, final adapter from "
        f"round {finished.get('final_adapter_round')}, accuracy "
        f"{real_number(finished.get('accuracy')) or 0.0:.3f}"
        if run.finished
        else (f"FAILED ({run.failed.get('error')})" if run.failed else "not finished")
    )


def _facts_table(run: TaskRun) -> str:
    """What the run was and how it ended; the hashes tie the page to its config, base
    model and final adapter."""
    started, finished = run.started, run.finished or {}
    facts = [
        ("run", started.get("run")),
        ("task", run.task),
        ("planned rounds", started.get("planned_rounds")),
        ("aggregator", started.get("aggregator")),
        ("outcome", _outcome(run)),
        ("config hash", started.get("config_sha256")),
        ("base model hash", started.get("base_model_sha256")),
        ("final adapter hash", finished.get("final_adapter_sha256")),
    ]
    fact_rows = "".join(
        f"<tr><th>{escape(name)}</th>" + _cell(value, "mono" if "hash" in name else "") + "</tr>"
        for name, value in facts
    )
    return f"<table>{fact_rows}</table>"


def _participation_grid(run: TaskRun, sites: list[str]) -> str:
    """One row per site, one mark per round: what became of the site's update."""
    rounds = run.rounds
    grid_rows = []
    for site in sites:
        cells = []
        for server_round in rounds:
            status = run.participation[site].get(server_round)
            mark, css = PARTICIPATION_MARKS.get(status or "", ("", ""))
            cells.append(f'<td class="cell {css}" title="{escape(status or "absent")}">{mark}</td>')
        grid_rows.append(f"<tr><th>{escape(site)}</th>{''.join(cells)}</tr>")
    header = "".join(f"<th>{r}</th>" for r in rounds)
    return (
        "<h3>Participation per round</h3>"
        '<p class="muted">✓ accepted, ✗ rejected, R refused, T timed out, F failed.</p>'
        f'<table class="participation"><thead><tr><th>site</th>{header}</tr></thead><tbody>'
        + "".join(grid_rows)
        + "</tbody></table>"
    )


def _sites_table(
    run: TaskRun,
    sites: list[str],
    budgets: dict[str, float],
    site_logs: dict[str, list[dict[str, Any]]],
    coordinator_entries: list[dict[str, Any]],
) -> str:
    """Per site: its updates by outcome, its ε against its budget, its audit key, and
    whether its own log agrees with the coordinator's."""
    site_rows = []
    for site in sites:
        marks = list(run.participation[site].values())
        spent = run.epsilon[site][max(run.epsilon[site])] if run.epsilon[site] else None
        reconciliation = _reconcile_cell(coordinator_entries, site_logs.get(site))
        site_rows.append(
            "<tr>"
            + _cell(site)
            + _cell((run.sites.get(site) or {}).get("kind"))
            + _cell(marks.count("accepted"))
            + _cell(marks.count("rejected"))
            + _cell(marks.count("refused"))
            + _cell(marks.count("timed-out") + marks.count("failed"))
            + _cell("" if spent is None else f"{spent:.3f}")
            + _cell("" if site not in budgets else f"{budgets[site]:.2f}")
            + _cell(_short((run.sites.get(site) or {}).get("audit-key")), "mono")
            + reconciliation
            + "</tr>"
        )
    return (
        "<h3>Sites: ε and participation</h3>"
        "<table><thead><tr><th>site</th><th>kind</th><th>accepted</th><th>rejected</th>"
        "<th>refused</th><th>timed out / failed</th><th>ε (last reported)</th>"
        "<th>ε budget</th><th>audit key</th><th>reconciliation</th></tr></thead><tbody>"
        + "".join(site_rows)
        + "</tbody></table>"
    )


def _task_section(
    run: TaskRun,
    site_logs: dict[str, list[dict[str, Any]]],
    coordinator_entries: list[dict[str, Any]],
) -> str:
    budgets = _site_budgets(site_logs)
    sites = sorted(set(run.sites) | set(run.participation))
    # The tables before the plots: reading run.epsilon for every site adds the sites
    # that reported no ε to it, so the ε plot's legend lists every site.
    grid = _participation_grid(run, sites)
    site_table = _sites_table(run, sites, budgets, site_logs, coordinator_entries)
    rollbacks = "".join(
        f"<li>round {escape(str(r.get('round')))}: {escape(str(r.get('reason')))}</li>"
        for r in run.rollbacks
    )
    return (
        f'<section class="task" id="task-{escape(run.task)}"><h2>Task {escape(run.task)}</h2>'
        + _facts_table(run)
        + '<div class="plots">'
        f'<div class="plot accuracy-plot">{accuracy_plot(run)}</div>'
        f'<div class="plot epsilon-plot">{epsilon_plot(run, budgets)}</div></div>'
        + site_table
        + grid
        + (f"<h3>Rollbacks</h3><ul>{rollbacks}</ul>" if rollbacks else "")
        + "</section>"
    )


def _reconcile_cell(
    coordinator_entries: list[dict[str, Any]], site_entries: list[dict[str, Any]] | None
) -> str:
    if site_entries is None:
        return _cell("site log not in this run directory")
    try:
        result: Reconciliation = reconcile(coordinator_entries, site_entries)
    except AuditError as exc:
        return _cell(f"cannot reconcile: {exc}", "rejected")
    if result.ok:
        return _cell(f"{result.matched} update(s) match", "accepted")
    return _cell("; ".join(result.problems), "rejected")


def _options(values: list[str]) -> str:
    return "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in values)


def _timeline(entries: list[dict[str, Any]]) -> str:
    rows = [entry_row(entry) for entry in entries]
    sites = sorted({row["site"] for row in rows if row["site"]} | {row["log"] for row in rows})
    events = sorted({row["event"] for row in rows})
    body = "".join(
        f'<tr data-site="{escape(row["site"])}" data-log="{escape(row["log"])}" '
        f'data-event="{escape(row["event"])}" data-round="{escape(row["round"])}">'
        + _cell(row["time"].replace("T", " "), "nowrap")
        + _cell(row["log"], "nowrap")
        + _cell(row["seq"])
        + _cell(row["event"], "nowrap")
        + _cell(row["round"])
        + _cell(row["site"], "nowrap")
        + _cell(row["status"])
        + _cell(row["epsilon"])
        + _cell(_short(row["hash"]), "mono")
        + _cell(row["detail"])
        + "</tr>"
        for row in rows
    )
    return (
        "<h2>Timeline</h2>"
        '<div class="filters">'
        f'<label>party or site <select id="filter-site"><option value="">all</option>'
        f"{_options(sites)}</select></label>"
        f'<label>event <select id="filter-event"><option value="">all</option>'
        f"{_options(events)}</select></label>"
        '<label>round <input id="filter-round" size="4" inputmode="numeric"></label>'
        '<span id="timeline-count" class="muted"></span></div>'
        '<table id="timeline"><thead><tr><th>time (UTC)</th><th>log</th><th>seq</th>'
        "<th>event</th><th>round</th><th>site</th><th>status</th><th>ε</th><th>hash</th>"
        f"<th>detail</th></tr></thead><tbody>{body}</tbody></table>"
    )


def render_report(
    run_dir: Path,
    key: Ed25519PublicKey | None = None,
    reports: list[LogReport] | None = None,
) -> str:
    """The page, from one read of each log: the one that verifies it (``reports``, when
    the caller has just verified the run with the same ``key``)."""
    logs = find_logs(run_dir)
    reports = reports if reports is not None else verify_path(run_dir, key)
    entries = {report.path: report.entries for report in reports}
    site_logs = {
        str(entries[path][0].get("actor")): entries[path] for path in logs.sites if entries[path]
    }
    sections = [
        _task_section(task_run(path, entries[path]), site_logs, entries[path])
        for path in logs.coordinator
    ]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedlora audit report: {escape(run_dir.name)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Audit report: {escape(run_dir.name)}</h1>"
        f'<p class="muted">Generated {generated} by fedlora from the signed audit logs of '
        "this run directory. Every figure below is read from those logs.</p>"
        + _verification_section(reports, pinned=key is not None)
        + "".join(sections)
        + _timeline(in_time_order(entries.values()))
        + f"<script>{SCRIPT}</script></body></html>"
    )


def write_report(
    run_dir: Path,
    out: Path | None = None,
    key: Ed25519PublicKey | None = None,
    reports: list[LogReport] | None = None,
) -> Path:
    path = out or run_dir / AUDIT_DIR / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run_dir, key, reports), encoding="utf-8")
    return path
