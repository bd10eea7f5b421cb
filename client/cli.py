"""``fedlora site …``: what a site operator runs next to the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from client.site import Site
from common.config import load_site_config
from common.errors import DataError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def site() -> None:
    """Site operator commands: check the data and configuration of one site."""


def check_report(config_path: Path) -> dict[str, Any]:
    """Validate the config, scan the data, apply the site's own policy; never raises for data."""
    config = load_site_config(config_path)
    runtime = Site(config)
    problems: list[str] = []
    report: dict[str, Any] = {
        "site": config.site.id,
        "kind": config.site.kind,
        "ok": False,
        "records": {"accepted": 0, "rejected": 0},
        "rejected": [],
        "labels": {name: 0 for name in config.data.classes},
    }
    if not (config.site.base_model / "config.json").is_file():
        problems.append("site.base_model: no model saved with save_pretrained there")
    try:
        loaded = runtime.load_data()
    except DataError as exc:
        problems.append(str(exc))
    else:
        data = loaded.all
        report["records"] = {"accepted": data.accepted, "rejected": len(data.rejected)}
        report["rejected"] = [{"record": r.record, "reason": r.reason} for r in data.rejected]
        report["labels"] = data.label_counts()
        report["people"] = {
            "total": data.persons,
            "train": loaded.train.persons,
            "holdout": loaded.holdout.persons,
        }
        k = config.policy.min_cohort
        if loaded.train.persons < k:
            problems.append(f"{loaded.train.persons} people to train on, fewer than k = {k}")
        if loaded.holdout.persons < k:
            problems.append(f"{loaded.holdout.persons} held-out people, fewer than k = {k}")
        empty = [name for name, count in report["labels"].items() if count == 0]
        if empty:
            problems.append(f"no records for class(es) {', '.join(empty)}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _print_report(report: dict[str, Any], console: Console) -> None:
    status = "[green]ready[/green]" if report["ok"] else "[red]cannot take part[/red]"
    console.print(f"site [bold]{report['site']}[/bold] ({report['kind']}): {status}")
    records = report["records"]
    console.print(f"records: {records['accepted']} accepted, {records['rejected']} rejected")
    if "people" in report:
        people = report["people"]
        console.print(
            f"people: {people['total']} ({people['train']} train, {people['holdout']} held out)"
        )
    labels = Table(title="records per label")
    labels.add_column("label")
    labels.add_column("records", justify="right")
    for name, count in report["labels"].items():
        labels.add_row(name, str(count))
    console.print(labels)
    if report["rejected"]:
        rejected = Table(title="rejected records")
        rejected.add_column("record")
        rejected.add_column("reason")
        for item in report["rejected"]:
            rejected.add_row(item["record"], item["reason"])
        console.print(rejected)
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}")


@site.command()
@click.argument("site_config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check(site_config: Path, as_json: bool) -> None:
    """Validate SITE_CONFIG, scan the site's data and report what would be used.

    Shows records accepted and rejected (with each rejection's reason) and counts per
    label. Exits with status 1 when the site cannot take part (no usable data, fewer
    people than the minimum cohort, a class with no records, no base model), and 2 when
    the configuration itself is invalid.
    """
    report = check_report(site_config)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report, Console())
    if not report["ok"]:
        raise click.exceptions.Exit(1)
