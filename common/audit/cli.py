"""``fedlora audit``: verify, reconcile and review audit logs (auditors)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from common.audit.log import read_entries
from common.audit.reconcile import reconcile as reconcile_logs
from common.audit.review import (
    SHOW_COLUMNS,
    LogReport,
    entries_of,
    entry_row,
    find_logs,
    select,
    verify_path,
)
from common.signing import load_public_key

EXISTING = click.Path(exists=True, path_type=Path)
BRIEF_COLUMNS = ("entry", "time", "event", "round", "site", "status", "ε", "hash", "detail")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def audit() -> None:
    """Verify and review the signed audit trail of a run, at the coordinator or a site.

    \b
    Every party (the coordinator, once per run; each site, across runs) keeps an
    append-only JSON-lines log in which each entry is hash-chained to the one before and
    signed with the party's Ed25519 key.
    """


def _print_verification(reports: list[LogReport], console: Console) -> None:
    for report in reports:
        verification = report.verification
        status = "[green]intact[/green]" if verification.ok else "[red]NOT INTACT[/red]"
        console.print(
            f"{status}  {escape(str(report.path))}  ({verification.entries} entries, "
            f"actor {escape(verification.actor or '?')})"
        )
        key = escape((verification.key or "?")[:24])
        console.print(f"         key {key}…: {escape(report.key_source)}", highlight=False)
        if verification.head_seq is not None:
            console.print(f"         signed head: entry {verification.head_seq}")
        first = verification.first_problem
        if first is not None:
            console.print(
                f"         [red]first bad entry: {escape(str(first))}[/red]", highlight=False
            )
            for finding in verification.findings[1:6]:
                console.print(f"         also: {escape(str(finding))}", highlight=False)
            if len(verification.findings) > 6:
                console.print(f"         … and {len(verification.findings) - 6} more")


@audit.command()
@click.argument("path", type=EXISTING)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM public key the log must be signed with (for a run directory: the "
    "coordinator's; the sites' keys are then the ones its log recorded). Without it the "
    "key comes from the run directory's keys/coordinator.pub or the log itself, which "
    "proves integrity but not who signed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def verify(path: Path, key: Path | None, as_json: bool) -> None:
    """Check the hash chain, every signature and the signed head of the logs at PATH.

    PATH is one log file or a run directory (every log under its audit/ is verified).
    Edited, deleted, inserted, reordered and cut-off entries, and entries re-signed with
    another key, are all detected. Exits 0 only when every log is intact; otherwise names
    the first bad entry of each log and exits 1.
    """
    reports = verify_path(path, load_public_key(key) if key else None)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "path": str(report.path),
                        "ok": report.verification.ok,
                        "entries": report.verification.entries,
                        "actor": report.verification.actor,
                        "key": report.verification.key,
                        "key_pinned": report.verification.key_pinned,
                        "key_source": report.key_source,
                        "findings": [str(f) for f in report.verification.findings],
                    }
                    for report in reports
                ],
                indent=2,
            )
        )
    else:
        console = Console()
        _print_verification(reports, console)
        if key is None:
            console.print(
                "note: no --key given, so this shows the logs are intact, not who signed "
                "them; pin the coordinator's public key with --key"
            )
    if not all(report.verification.ok for report in reports):
        sys.exit(1)


@audit.command()
@click.argument("coordinator_log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("site_log", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def reconcile(coordinator_log: Path, site_log: Path) -> None:
    """Match the updates in COORDINATOR_LOG with those in SITE_LOG.

    Every update the coordinator accepted from the site must be one the site logged
    sending (same run, round, hash and ε), and every update the site logged for that run
    must appear in the coordinator's log. Run `verify` on both logs first: this compares
    what they say. Exits 1 on any mismatch.
    """
    result = reconcile_logs(read_entries(coordinator_log), read_entries(site_log))
    console = Console()
    verdict = "[green]reconciled[/green]" if result.ok else "[red]DOES NOT RECONCILE[/red]"
    console.print(
        f"{verdict}: site {escape(result.site)}, run {escape(result.run)}: {result.matched} "
        f"update(s) match, {len(result.problems)} problem(s)"
    )
    for problem in result.problems:
        console.print(f"  [red]problem[/red] {escape(problem)}", highlight=False)
    for note in result.notes:
        console.print(f"  note    {escape(note)}", highlight=False)
    if not result.ok:
        sys.exit(1)


@audit.command()
@click.argument("path", type=EXISTING)
@click.option("--site", "sites", multiple=True, help="Only entries about this site (repeatable).")
@click.option("--round", "rounds", type=int, multiple=True, help="Only this round (repeatable).")
@click.option(
    "--event",
    "events",
    multiple=True,
    help="Only this event type, e.g. update-received, training-done (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the selected entries as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the table as CSV.")
def show(
    path: Path,
    sites: tuple[str, ...],
    rounds: tuple[int, ...],
    events: tuple[str, ...],
    as_json: bool,
    as_csv: bool,
) -> None:
    """A readable table of the audit entries at PATH (a log or a run directory).

    Columns: the log, sequence number, time, event, round, site, status or decision, ε,
    the hash recorded (update, adapter or config) and a detail such as a reason.
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    entries = select(entries_of(find_logs(path).all), sites=sites, rounds=rounds, events=events)
    if as_json:
        click.echo(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    rows = [entry_row(entry) for entry in entries]
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=SHOW_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return
    days = sorted({row["time"][:10] for row in rows})
    span = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else ""
    table = Table(
        title=f"{len(rows)} audit entries, {span} (UTC)",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    brief = []
    for row in rows:
        entry = ("coord" if row["log"] == "coordinator" else "site") + "#" + row["seq"]
        time = row["time"][11:19] if len(days) == 1 else row["time"][5:16].replace("T", " ")
        epsilon = f"{float(row['epsilon']):.2f}" if row["epsilon"] else ""
        brief.append(
            (
                entry,
                time,
                row["event"],
                row["round"],
                row["site"],
                row["status"],
                epsilon,
                row["hash"][:8],
                row["detail"],
            )
        )
    for index, column in enumerate(BRIEF_COLUMNS):
        widest = max([len(column), *(len(values[index]) for values in brief)])
        table.add_column(
            column,
            overflow="fold",
            no_wrap=column != "detail",
            min_width=min(widest, 40) if column == "detail" else widest,
            ratio=1 if column == "detail" else None,
            justify="right" if column in ("round", "ε") else "left",
        )
    for values in brief:
        table.add_row(*(Text(value) for value in values))  # log text is never markup
    console = Console()
    if not console.is_terminal:  # piped into a file or a pager: no need to squeeze
        console = Console(width=max(console.width, 132))
    console.print(table)


@audit.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the HTML file (default: RUN_DIR/audit/report.html).",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The coordinator's PEM public key to verify against (as for `verify`).",
)
def report(run_dir: Path, out: Path | None, key: Path | None) -> None:
    """Write a self-contained HTML report of RUN_DIR: verification status, timeline, each
    site's ε and participation, and the metrics with plots. It needs no network to view.
    """
    from common.audit.report import write_report

    path = write_report(run_dir, out, load_public_key(key) if key else None)
    click.echo(f"report written to {path}")
