"""``fedlora site …``: what a site operator runs next to the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from client.audit import SiteAudit
from client.daemon import (
    NodeRefusedError,
    SupernodeSettings,
    check_connection,
    check_ready,
    run_supernode,
)
from client.data.dicom_persons import privacy_unit
from client.ledger import ledgers_of, run_summaries
from client.preflight import preflight
from client.privacy import epsilon_spent
from client.release_cli import release
from client.releases import record_pins, refused_bundles
from client.site import LoadedData, Site
from common import pki
from common.config import (
    DicomDataConfig,
    DPSettings,
    FederationConfig,
    SiteConfig,
    SiteConnection,
    load_federation_config,
    load_site_config,
    validate_model,
)
from common.errors import ConfigError, FedloraError, PolicyError
from common.protocol import RoundRequest
from common.superexec import ensure_secret
from common.tasks import TASKS
from common.tasks.base import saved_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def site() -> None:
    """Site operator commands: check a site's data and policy, watch its privacy budget,
    run the client daemon."""


site.add_command(release)


def privacy_plan(runtime: Site, loaded: LoadedData, request: RoundRequest) -> dict[str, Any]:
    """What a run like ``request`` would do here: σ, steps and ε, from the real ledger."""
    budget = runtime.config.privacy
    ledger = runtime.open_ledger(loaded.dataset)
    people = loaded.train.persons
    plan = runtime.training_plan(request)
    sample_rate, steps = plan.sample_rate(people), plan.steps(people)
    report: dict[str, Any] = {
        "rounds": request.total_rounds,
        "people": people,
        "batch_size": request.batch_size,
        "sample_rate": sample_rate,
        "steps_per_round": steps,
        "epsilon_spent": ledger.epsilon(),
        "epsilon_budget": budget.epsilon,
        "delta": budget.delta,
        "accountant": budget.accountant,
    }
    try:
        sigma, target = runtime.run_noise(request, ledger.history, sample_rate, steps)
    except PolicyError as exc:
        report["refused"] = str(exc)
        return report
    rounds = [(sigma, sample_rate, steps)] * request.total_rounds
    report.update(
        noise_multiplier=sigma, epsilon_target=target, epsilon_after=ledger.epsilon(rounds)
    )
    return report


def check_report(config_path: Path, request: RoundRequest | None = None) -> dict[str, Any]:
    """Validate the config, scan the data, apply the site's own policy (the pre-flight
    every round runs, client/preflight.py); never raises for data."""
    config = load_site_config(config_path)
    runtime = Site(config)
    report: dict[str, Any] = {
        "site": config.site.id,
        "kind": config.site.kind,
        "ok": False,
        "records": {"accepted": 0, "rejected": 0},
        "rejected": [],
        "labels": {name: 0 for name in config.data.classes},
    }
    checked = preflight(runtime, "check")
    problems = [str(problem) for problem in checked.problems]
    loaded = checked.data
    if loaded is not None:
        data = loaded.all
        report["records"] = {"accepted": data.accepted, "rejected": len(data.rejected)}
        report["rejected"] = [{"record": r.record, "reason": r.reason} for r in data.rejected]
        report["adjusted"] = dict(data.adjusted)
        report["labels"] = data.label_counts()
        report["people"] = {
            "total": data.persons,
            "train": loaded.train.persons,
            "holdout": loaded.holdout.persons,
        }
        if isinstance(config.data, DicomDataConfig):
            report["privacy_unit"] = privacy_unit(config.data.person_key)
        if request is not None and loaded.train.persons > 0:
            try:
                report["privacy_plan"] = privacy_plan(runtime, loaded, request)
            except PolicyError as exc:  # an unreadable ledger
                problems.append(str(exc))
            else:
                if "refused" in report["privacy_plan"]:
                    problems.append(report["privacy_plan"]["refused"])
    # The client code it runs in a deployment, and the bundles it refused lately.
    report["client_releases"] = list(config.policy.client_releases)
    report["refused_bundles"] = refused_bundles(runtime.audit.events())[:5]
    report["problems"] = list(dict.fromkeys(problems))
    report["ok"] = not problems
    return report


def _lora_targets(config: SiteConfig) -> tuple[str, ...]:
    """The targets a run would train on this site's base model (they differ by image
    architecture); the task's defaults when the base cannot be read, which the
    pre-flight then reports."""
    spec = TASKS.get(config.site.task)
    if spec.lora_targets_for is None:
        return spec.default_lora_targets
    try:
        return spec.lora_targets(saved_config(config.site.base_model))
    except FedloraError:
        return spec.default_lora_targets


def _print_report(report: dict[str, Any], console: Console) -> None:
    status = "[green]ready[/green]" if report["ok"] else "[red]cannot take part[/red]"
    site, kind = escape(report["site"]), escape(report["kind"])
    console.print(f"site [bold]{site}[/bold] ({kind}): {status}")
    records = report["records"]
    console.print(f"records: {records['accepted']} accepted, {records['rejected']} rejected")
    if "people" in report:
        people = report["people"]
        console.print(
            f"people: {people['total']} ({people['train']} train, {people['holdout']} held out)"
        )
    if "privacy_unit" in report:
        console.print(f"privacy unit: {escape(report['privacy_unit'])}")
    for change, count in report.get("adjusted", {}).items():
        console.print(f"[yellow]kept, but {escape(change)}:[/yellow] {count} records")
    labels = Table(title="records per label")
    labels.add_column("label")
    labels.add_column("records", justify="right")
    for name, count in report["labels"].items():
        labels.add_row(Text(name), str(count))  # data values are never markup
    console.print(labels)
    if report["rejected"]:
        rejected = Table(title="rejected records")
        rejected.add_column("record")
        rejected.add_column("reason")
        for item in report["rejected"]:
            rejected.add_row(Text(item["record"]), Text(item["reason"]))
        console.print(rejected)
    plan = report.get("privacy_plan")
    if plan:
        console.print(
            f"privacy: ε spent {plan['epsilon_spent']:.2f} of {plan['epsilon_budget']:.2f} "
            f"(δ={plan['delta']:g}, {plan['accountant']} accountant)"
        )
        if "noise_multiplier" in plan:
            console.print(
                f"plan: {plan['rounds']} rounds x {plan['steps_per_round']} steps, "
                f"q = {plan['sample_rate']:.4f} ({plan['people']} people, batch "
                f"{plan['batch_size']}) -> σ = {plan['noise_multiplier']:.3f}, "
                f"ε after the run {plan['epsilon_after']:.2f}"
            )
    pins = report["client_releases"]
    console.print(
        "client code: "
        + (f"pinned release(s) {', '.join(pin[:12] for pin in pins)}" if pins else
           "[yellow]no release pinned[/yellow] (a deployment run is refused; "
           "fedlora site release)")
    )  # fmt: skip
    for refused in report["refused_bundles"]:
        console.print(
            f"[yellow]refused client code:[/yellow] bundle {escape(str(refused['fab_sha256']))} "
            f"({refused['times']}×, last in run {escape(str(refused['run']))})"
        )
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {escape(problem)}")


@site.command()
@click.argument("site_config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--federation",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A federation TOML to plan for (rounds, batch, epochs, ε per run); overrides the "
    "four options below.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Rounds of the run to plan for.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Expected batch size (people per step).",
)
@click.option(
    "--local-epochs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Local epochs per round.",
)
@click.option(
    "--epsilon-per-run",
    type=click.FloatRange(min=0, min_open=True),
    help="ε the run would ask for (default: what is left of the budget).",
)
def check(
    site_config: Path,
    as_json: bool,
    federation: Path | None,
    rounds: int,
    batch_size: int,
    local_epochs: int,
    epsilon_per_run: float | None,
) -> None:
    """Validate SITE_CONFIG, scan the site's data and show the privacy plan.

    Reports records accepted and rejected (with each rejection's reason), counts per
    label, people per split, and the plan for a run: the noise multiplier σ the site
    would choose from its remaining budget and the ε it would reach. Exits with status 1
    when the site cannot take part (no usable data, fewer people than the minimum
    cohort, a class with no records, no base model, a run it would refuse), and 2 when
    the configuration itself is invalid.
    """
    config = load_site_config(site_config)
    if federation is not None:
        settings = load_federation_config(federation)
    else:
        settings = FederationConfig(
            task=config.site.task,
            base_model=config.site.base_model,
            rounds=rounds,
            batch_size=batch_size,
            local_epochs=local_epochs,
            dp=DPSettings(epsilon_per_run=epsilon_per_run),
        )
    request = RoundRequest.for_round(settings, "", 1, _lora_targets(config))
    report = check_report(site_config, request)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report, Console())
    if not report["ok"]:
        raise click.exceptions.Exit(1)


@site.command()
@click.argument("site_config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON on stdout.")
@click.option(
    "--accept-new-data",
    is_flag=True,
    help="The site's data has changed: start a ledger (and a fresh budget) for the current "
    "data. Recorded in the site's log; earlier datasets keep their history.",
)
def budget(site_config: Path, as_json: bool, accept_new_data: bool) -> None:
    """Show SITE_CONFIG's privacy ledger: every dataset, its runs, ε spent and left.

    The ledger lives in the site's state directory and spans rounds, runs and
    restarts; the site refuses any round that would take a dataset past its budget.
    """
    config = load_site_config(site_config)
    if accept_new_data:
        runtime = Site(config)
        dataset = runtime.load_data().dataset
        ledger = runtime.open_ledger(dataset, accept_new=True)
        if not ledger.path.exists():
            ledger.create()
            runtime.audit.record("new-data-accepted", dataset_sha256=dataset)
    privacy = config.privacy
    datasets: list[dict[str, Any]] = []
    for state in ledgers_of(config.site.state_dir):
        spent = epsilon_spent(
            [entry.history for entry in state.entries], state.delta, state.accountant
        )
        datasets.append(
            {
                "dataset": state.dataset,
                "epsilon_spent": spent,
                "epsilon_budget": privacy.epsilon,
                "epsilon_remaining": max(privacy.epsilon - spent, 0.0),
                "delta": state.delta,
                "accountant": state.accountant,
                "runs": run_summaries(state.entries),
            }
        )
    report = {"site": config.site.id, "datasets": datasets}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(
        f"site [bold]{escape(config.site.id)}[/bold]: {len(datasets)} dataset(s) with history"
    )
    for item in datasets:
        table = Table(
            title=f"dataset {item['dataset'][:16]}… — ε {item['epsilon_spent']:.2f} of "
            f"{item['epsilon_budget']:.2f} spent, {item['epsilon_remaining']:.2f} left "
            f"(δ={item['delta']:g}, {item['accountant']})"
        )
        for column in ("run", "rounds", "ε after"):
            table.add_column(column, justify="left" if column == "run" else "right")
        for run in item["runs"]:
            table.add_row(Text(run["run"]), str(run["rounds"]), f"{run['epsilon_after']:.2f}")
        console.print(table)


@site.command("run")
@click.argument("site_config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--superlink",
    default=None,
    help="Override connection.superlink: the SuperLink's HOST:PORT.",
)
@click.option(
    "--ca-certificate",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Override connection.ca_certificate: the federation's CA certificate (PEM).",
)
@click.option(
    "--node-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Override connection.node_key: this site's node-authentication private key.",
)
@click.option(
    "--local-port",
    type=click.IntRange(1, 65535),
    default=9094,
    show_default=True,
    help="Local port flower-supernode serves its ClientApp processes on (loopback only); "
    "give each site its own when several run on one machine.",
)
def run(
    site_config: Path,
    superlink: str | None,
    ca_certificate: Path | None,
    node_key: Path | None,
    local_port: int,
) -> None:
    """Run the site's client daemon: check the site, then serve the federation through
    flower-supernode over TLS with the site's node key, until SIGTERM or Ctrl-C.

    It refuses to start when the config, data, privacy ledger or keys would make the
    site unusable, or when the SuperLink's certificate does not chain to the CA. It
    installs no dependencies at run time. Flower's output is appended to
    <state_dir>/supernode.log and shown here. Exit codes: 0 stopped, 1 the site cannot
    take part, 2 invalid config or keys, 3 refused (node key not registered, or the
    SuperLink's certificate not from the federation's CA).
    """
    config = load_site_config(site_config)
    connection = config.connection
    overrides = {
        key: value
        for key, value in (
            ("superlink", superlink),
            ("ca_certificate", ca_certificate and ca_certificate.resolve()),
            ("node_key", node_key and node_key.resolve()),
        )
        if value is not None
    }
    if connection is None:
        if len(overrides) < 3:
            raise ConfigError(
                f"{site_config} has no [connection] table: paste the bundle's connection.toml "
                "into it, or give --superlink, --ca-certificate and --node-key"
            )
        connection = validate_model(SiteConnection, overrides, "the command line")
    else:
        connection = validate_model(
            SiteConnection, {**connection.model_dump(), **overrides}, str(site_config)
        )
    problems = check_ready(config)
    if problems:
        for problem in problems:
            click.secho(f"  {problem}", fg="red", err=True)
        raise click.ClickException(f"site {config.site.id} cannot take part; nothing started")
    # A change of the pinned releases since the last start is entered in the audit log.
    record_pins(SiteAudit(config), config.policy.client_releases)
    settings = SupernodeSettings(
        config_path=site_config.resolve(),
        connection=connection,
        local_port=local_port,
        log_file=config.site.state_dir / "supernode.log",
        superexec_secret=ensure_secret(config.site.state_dir),
    )
    node_fingerprint = pki.node_key_fingerprint(
        pki.load_node_private_key(connection.node_key).public_key()
    )
    releases = ", ".join(pin[:12] for pin in config.policy.client_releases)
    click.echo(
        f"site {config.site.id}: ready; connecting to {connection.superlink} (TLS, node key "
        f"{node_fingerprint}); runs only the pinned release(s) {releases}",
        err=True,
    )
    try:
        check_connection(connection)
        code = run_supernode(settings, lambda line: click.echo(line, err=True))
    except NodeRefusedError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(3) from exc
    click.echo(f"site {config.site.id}: stopped", err=True)
    raise SystemExit(code)
