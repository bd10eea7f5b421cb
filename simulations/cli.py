"""``fedlora simulate``: a whole federation on one machine, with synthetic sites or a
researcher's own data."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    Progress,
    TaskID,
)
from rich.table import Table

from server.aggregation import AGGREGATORS
from server.run_report import print_summary, round_progress, write_plots
from simulations.partition import NO_LABEL, SplitReport
from simulations.report import build_summary
from simulations.runner import prepare, run_task
from simulations.scenario import builtin_scenarios, load_scenario

logger = logging.getLogger(__name__)


class _RoundProgress(logging.Handler):
    """Advances a progress bar on each 'round evaluated' record of the server."""

    def __init__(self, progress: Progress, bars: dict[str, TaskID]) -> None:
        super().__init__(level=logging.INFO)
        self.progress = progress
        self.bars = bars

    def emit(self, record: logging.LogRecord) -> None:
        task = getattr(record, "fedlora_task", None)
        if task in self.bars:
            accuracy = getattr(record, "accuracy", 0.0)
            self.progress.update(
                self.bars[task],
                completed=getattr(record, "fedlora_round", 0),
                description=f"{task} (accuracy {accuracy:.2f})",
            )


@contextmanager
def _rich_logging(console: Console, verbose: bool) -> Iterator[None]:
    """Route logs through the progress display for the run, then restore the setup."""
    root = logging.getLogger()
    quiet = ("client", "server", "simulations", "flwr")
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in quiet}
    for handler in saved_handlers:
        root.removeHandler(handler)
    root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Per-round details go to metrics.csv; the console shows progress and warnings.
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def split_table(report: SplitReport) -> Table:
    """A split's people and records per site and per class (counts, no identifiers)."""
    how = "IID" if report.mode == "iid" else f"Dirichlet label skew, alpha = {report.alpha:g}"
    title = f"split {report.prefix!r} ({how}; {'made' if report.resplit else 'reused'})"
    table = Table(title=title)
    table.add_column("site")
    table.add_column("people", justify="right")
    table.add_column("records", justify="right")
    classes = list(report.shares[0].people_per_class) if report.shares else []
    unlabelled = any(share.records_per_class.get(NO_LABEL) for share in report.shares)
    for name in classes:
        table.add_column(f"{name}: people / records", justify="right")
    if unlabelled:
        table.add_column(f"records {NO_LABEL}", justify="right")
    for share in report.shares:
        cells = [
            f"{share.people_per_class[name]} / {share.records_per_class.get(name, 0)}"
            for name in classes
        ]
        if unlabelled:
            cells.append(str(share.records_per_class.get(NO_LABEL, 0)))
        table.add_row(share.id, str(share.people), str(share.records), *cells)
    notes = [f"{count} {reason}, left out" for reason, count in report.left_out.items()]
    if report.record_is_person:
        notes.append("the source names no person: each record is counted as one person")
    table.caption = "; ".join(notes) or None
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenario", default="default", metavar="[SCENARIO]")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory to write (default: runs/<scenario>-<UTC time>).",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    help="Override the number of rounds of every task in the scenario.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the synthetic and split sites live; reused when the scenario is unchanged, "
    "so each site's privacy state persists across runs (default: runs/data/<scenario>). "
    "Existing sites keep their data and state where their configs say.",
)
@click.option(
    "--aggregator",
    type=click.Choice(AGGREGATORS.names()),
    help="Override every task's aggregator (see the README's Server defenses).",
)
@click.pass_context
def simulate(
    ctx: click.Context,
    scenario: str,
    out: Path | None,
    rounds: int | None,
    data_dir: Path | None,
    aggregator: str | None,
) -> None:
    """Run SCENARIO on Flower's Simulation Engine: one federation per task.

    SCENARIO is a scenario TOML file or the name of a built-in one; the default has three
    hospitals (DICOM imaging) and two banks (tabular). Synthetic data is generated the
    first time, then reused. A scenario may also name existing site configs (your own
    data, used as it is) or split one real dataset by person across simulated sites
    ([[splits]], IID or Dirichlet label skew). The run directory receives summary.json, metrics.csv,
    plots/, adapters/<task>/, checkpoints/, the sites/<site>.toml used, the signed audit
    trail (audit/) and, per task, the signed int8 artifact (artifacts/<task>/) that every
    site of the task checked and installed.
    """
    verbose = bool(ctx.obj and ctx.obj.get("verbose"))
    loaded = load_scenario(scenario)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = (out or Path("runs") / f"{loaded.name}-{stamp}").resolve()
    data_root = (data_dir or Path("runs") / "data" / loaded.name).resolve()
    if (run_dir / "summary.json").exists():
        raise click.UsageError(f"{run_dir} already holds a finished run; choose another --out")
    console = Console(stderr=True)
    with _rich_logging(console, verbose):
        started = time.monotonic()
        with round_progress(console) as progress:
            sites_bar = progress.add_task("preparing sites", total=len(loaded.all_sites()))

            def site_ready(site: str, generated: bool) -> None:
                verb = "written" if generated else "reused"
                progress.update(sites_bar, advance=1, description=f"sites ({site} {verb})")

            prepared = prepare(
                loaded,
                run_dir,
                data_root,
                rounds=rounds,
                on_site=site_ready,
                aggregator=aggregator,
                on_split=lambda report: console.print(split_table(report)),
            )
            bars = {
                task: progress.add_task(f"{task}", total=federation.rounds)
                for task, federation in prepared.federations.items()
            }
            handler = _RoundProgress(progress, bars)
            rounds_logger = logging.getLogger("fedlora.rounds")
            rounds_logger.addHandler(handler)
            try:
                for task, federation in prepared.federations.items():
                    run_task(
                        federation,
                        prepared.site_configs[task],
                        run_dir,
                        verbose=verbose,
                        behaviours=prepared.behaviours[task],
                    )
            finally:
                rounds_logger.removeHandler(handler)
    summary = build_summary(loaded, run_dir, time.monotonic() - started)
    write_plots(run_dir, summary)
    print_summary(summary, run_dir, Console())


simulate.help = (
    inspect.cleandoc(simulate.help or "")
    + "\n\nBuilt-in scenarios: "
    + ", ".join(builtin_scenarios())
)
