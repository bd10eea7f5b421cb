"""``fedlora coordinator …``: start the SuperLink and launch (or resume) runs on it."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, TaskID

from common import pki
from common.config import load_federation_config
from common.errors import ConfigError
from common.processes import Daemon, run_daemons
from common.release import build_fab, fab_sha256, make_release, write_release
from common.signing import load_private_key
from common.superexec import ensure_secret
from server.audit import coordinator_log_path
from server.deployment import (
    APP_ROOT,
    LOOPBACK,
    Coordinator,
    flwr_run,
    stage_federation,
    staged_federations,
    wait_for_port,
    write_site_registry,
)
from server.progress import TaskProgress, describe, follow_progress
from server.run import RESULT_DIR
from server.run_report import deployment_summary, print_summary, round_progress, write_plots

logger = logging.getLogger(__name__)

SITE_REGISTRY = "site-registry.json"
"""In the run directory: each registered site's audit-key fingerprint, for the ServerApp."""

CERTS = click.option(
    "--certs",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs"),
    show_default=True,
    help="The PKI folder `fedlora pki init` wrote (CA, SuperLink certificate, keys, sites).",
)
STATE = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("coordinator"),
    show_default=True,
    help="The coordinator's own state: the SuperLink's database and log "
    "(superlink.db, superlink.log) and the Flower CLI's connection config.",
)


SIGNING_KEY = click.option(
    "--signing-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The coordinator's Ed25519 key (default CERTS/coordinator.key, whose public "
    "half the sites pin): it signs releases, the audit log and the artifact.",
)
APP = click.option(
    "--app",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=APP_ROOT,
    show_default="this installed fedlora",
    help="The Flower app folder to build the bundle (FAB) from: a checkout of the "
    "release the sites pinned.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def coordinator() -> None:
    """Coordinator commands: run the SuperLink, launch and resume federation runs.

    \b
      fedlora pki init --address fl.example.org          # once
      fedlora coordinator start --port 9092              # the server, long-lived
      fedlora coordinator register                        # sites added since the start
      fedlora coordinator release                         # publish the app's hash
      fedlora coordinator run federation/*.toml          # a run, any number of tasks
      fedlora coordinator run --resume runs/<run>        # after an interruption
    """


@coordinator.command()
@CERTS
@STATE
@click.option(
    "--host",
    default=LOOPBACK,
    show_default=True,
    help="Interface the sites reach: nginx listens there (TLS) and forwards the Fleet "
    "API and nothing else. Loopback by default; give this machine's address (or 0.0.0.0 "
    "for all interfaces) to let the sites in.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9092,
    show_default=True,
    help="The port the sites reach (their connection.superlink is HOST:PORT).",
)
@click.option(
    "--superlink-port",
    type=click.IntRange(1, 65535),
    default=9093,
    show_default=True,
    help="The SuperLink's own port, on 127.0.0.1 only: its Control API (node "
    "registration, run submission) and Runtime API are reachable from this machine "
    "alone.",
)
def start(certs: Path, state_dir: Path, host: str, port: int, superlink_port: int) -> None:
    """Run the coordinator's server: flower-superlink on loopback (TLS, SuperNode
    authentication, a persistent state database, process isolation), the SuperExec that
    runs the ServerApp (authenticated by a shared secret), and nginx on HOST:PORT in
    front of them, forwarding the sites' Fleet API calls only. Then register the node
    key of every site in CERTS/sites under its site name.

    Stays in the foreground (a systemd service) until SIGTERM or Ctrl-C, and stops all
    three when one of them stops; their output is appended to STATE_DIR/superlink.log,
    superexec.log and nginx.log (nginx/access.log: one line per request of the sites).
    Needs nginx (Debian/Ubuntu: apt-get install nginx-light).
    """
    node = Coordinator(certs.resolve(), state_dir.resolve())
    node.check_pki()
    if (node.certs / pki.CA_KEY).exists():
        logger.warning(
            "%s is on this machine: once the sites are added, keep it offline "
            "(whoever holds it can mint a SuperLink certificate the sites trust)",
            node.certs / pki.CA_KEY,
        )
    sites = pki.registered_node_keys(node.certs)
    if not sites:
        logger.warning("no site in %s yet: add one with `fedlora pki add-site`", certs / "sites")
    perimeter = node.perimeter(host, port, superlink_port)
    node.state_dir.mkdir(parents=True, exist_ok=True)
    secret = ensure_secret(node.secret_dir)
    node.write_cli_config(f"{LOOPBACK}:{superlink_port}")
    perimeter.write_config()

    def register(processes: list[subprocess.Popen[str]]) -> None:
        def alive() -> bool:
            return all(process.poll() is None for process in processes)

        wait_for_port(LOOPBACK, superlink_port, 60, alive, "flower-superlink")
        wait_for_port(host, port, 30, alive, "nginx")
        outcomes = node.register_sites()
        click.echo(
            f"SuperLink listening on {host}:{port} for the sites (TLS, node authentication, "
            f"Fleet API only); Control API on {LOOPBACK}:{superlink_port}; "
            f"{len(outcomes)} site(s) registered: {', '.join(sorted(outcomes)) or 'none'}",
            err=True,
        )

    def debug(name: str) -> Callable[[str], None]:
        return lambda line: logger.debug("%s: %s", name, line)

    code = run_daemons(
        [
            Daemon(node.superlink_command(superlink_port, secret), node.superlink_log,
                   debug("superlink")),
            Daemon(node.superexec_command(superlink_port, secret),
                   node.state_dir / "superexec.log", debug("superexec")),
            Daemon(perimeter.command(), node.state_dir / "nginx.log", debug("nginx")),
        ],
        node.cli_environment(),
        started=register,
    )  # fmt: skip
    click.echo(
        f"the coordinator's server stopped (exit code {code}); logs: {node.state_dir}", err=True
    )
    raise SystemExit(code)


@coordinator.command()
@CERTS
@STATE
def register(certs: Path, state_dir: Path) -> None:
    """Register with the running SuperLink the node key of every site in CERTS/sites
    that it does not know yet (sites added with `fedlora pki add-site` since `start`),
    each under its site name. Keys registered before are left as they are."""
    node = Coordinator(certs.resolve(), state_dir.resolve())
    if not (node.flwr_home / "config.toml").exists():
        raise ConfigError(
            f"{state_dir} has no SuperLink connection: run `fedlora coordinator start`"
        )
    outcomes = node.register_sites()
    for site, outcome in sorted(outcomes.items()):
        click.echo(f"{site}: {outcome}")
    if not outcomes:
        click.echo(f"no site in {node.certs / 'sites'}: add one with `fedlora pki add-site`")


@coordinator.command()
@CERTS
@APP
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the release (default runs/releases/<version>-<hash>).",
)
@SIGNING_KEY
def release(certs: Path, app: Path, out: Path | None, signing_key: Path | None) -> None:
    """Publish the app as a release for the sites to review and pin: build its Flower
    App Bundle exactly as `flwr run` does, and write OUT/release.json (app, version,
    the bundle's SHA-256 and size, time, signer), its Ed25519 signature
    OUT/release.json.sig, and the bundle itself (OUT/<name>.fab, for review).

    Hand release.json and release.json.sig to each site; a site checks them with
    `fedlora site release SITE.toml --release release.json` and pins the hash in its
    config. A site refuses every run of a bundle it did not pin."""
    key = load_private_key((signing_key or certs / pki.COORDINATOR_KEY).resolve())
    fab = build_fab(app.resolve())
    published = make_release(fab, key)
    folder = out or Path("runs") / "releases" / f"{published.version}-{published.fab_sha256[:12]}"
    path = write_release(folder, published, key)
    (folder / f"fedlora-{published.version}-{published.fab_sha256[:12]}.fab").write_bytes(fab)
    click.echo(f"release {published.app} {published.version}: app bundle SHA-256")
    click.echo(f"  {published.fab_sha256}")
    click.echo(f"signed by {published.signer}; written to {path} (+ .sig and the bundle)")
    click.echo("Each site reviews it, then pins it in its config's [policy] table:")
    click.echo(f"  fedlora site release SITE.toml --release {path}")


@coordinator.command()
@click.argument(
    "federations", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@CERTS
@STATE
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run directory (default runs/deployment-<UTC time>).",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue the run in this directory from its last checkpointed round (the "
    "same settings; FEDERATIONS are not given).",
)
@SIGNING_KEY
@APP
def run(
    federations: tuple[Path, ...],
    certs: Path,
    state_dir: Path,
    out: Path | None,
    resume_dir: Path | None,
    signing_key: Path | None,
    app: Path,
) -> None:
    """Launch a federation run on the SuperLink: one `flwr run` per FEDERATION config
    (a task each), into one run directory.

    The run directory ends like a simulation's: summary.json, metrics.csv, plots/,
    adapters/, checkpoints/, the signed audit log (audit/) and each task's signed
    artifact (artifacts/). Progress streams as the rounds finish.
    """
    node = _connected_coordinator(certs, state_dir)
    key = (signing_key or node.certs / pki.COORDINATOR_KEY).resolve()
    run_dir, tasks = _run_dir_and_tasks(federations, out, resume_dir)
    # The sites' audit keys as registered now (a resume sees sites added since).
    registry = write_site_registry(node.certs, run_dir / SITE_REGISTRY)
    click.echo(
        f"submitting the app bundle of {app}, SHA-256 {fab_sha256(build_fab(app))}: each site "
        "runs it only if it pinned that release (`fedlora coordinator release`)",
        err=True,
    )
    console = Console(stderr=True)
    started = time.monotonic()
    with round_progress(console) as progress:
        for task, config in tasks.items():
            if (run_dir / RESULT_DIR / f"{task}.json").exists():
                progress.console.print(f"{task}: finished earlier, skipped")
                continue
            run_config = {
                "federation-config": str(config),
                "run-dir": str(run_dir),
                "signing-key": str(key),
                "resume": "true" if resume_dir is not None else "",
                "site-registry": str(registry),
            }
            _run_task(node, task, config, run_dir, run_config, progress, app)
    _report(run_dir, list(tasks), time.monotonic() - started)


def _connected_coordinator(certs: Path, state_dir: Path) -> Coordinator:
    """The coordinator of ``state_dir``, which `fedlora coordinator start` must have
    connected to its SuperLink."""
    node = Coordinator(certs.resolve(), state_dir.resolve())
    if not (node.flwr_home / "config.toml").exists():
        raise ConfigError(
            f"{state_dir} has no SuperLink connection: run `fedlora coordinator start`"
        )
    return node


def _run_dir_and_tasks(
    federations: tuple[Path, ...], out: Path | None, resume_dir: Path | None
) -> tuple[Path, dict[str, Path]]:
    """The run directory and its tasks' staged configs: those of the run resumed, or
    FEDERATIONS staged into a new run directory."""
    if resume_dir is not None:
        if federations:
            raise click.UsageError(
                "--resume continues a run with its own settings; give no FEDERATIONS"
            )
        run_dir = resume_dir.resolve()
        return run_dir, staged_federations(run_dir)
    if not federations:
        raise click.UsageError("give at least one federation config (or --resume RUN_DIR)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = (out or Path("runs") / f"deployment-{stamp}").resolve()
    tasks = {}
    for source in federations:
        federation, staged = stage_federation(source, run_dir)
        tasks[federation.task] = staged
    return run_dir, tasks


def _run_task(
    node: Coordinator,
    task: str,
    config: Path,
    run_dir: Path,
    run_config: dict[str, str],
    progress: Progress,
    app: Path,
) -> None:
    """One `flwr run` of ``task``, its progress on a bar of its own; raises unless the run
    finished (saved its result)."""
    planned = _planned_rounds(config)
    bar = progress.add_task(task, total=planned)
    # The bar follows the task's audit log; on a resume, the rounds it already
    # holds show as done at once.
    with follow_progress(
        coordinator_log_path(run_dir, task),
        TaskProgress(task, planned),
        _bar_updater(progress, bar),
    ):
        code = flwr_run(
            node,
            run_config,
            run_dir / "coordinator.log",
            _problems_printer(progress.console),
            app,
        )
    if code != 0 or not (run_dir / RESULT_DIR / f"{task}.json").exists():
        raise click.ClickException(
            f"the {task} run did not finish (flwr run exit code {code}; log: "
            f"{run_dir / 'coordinator.log'}). Once the SuperLink is back, continue "
            f"it with: fedlora coordinator run --resume {run_dir}"
        )


def _report(run_dir: Path, tasks: list[str], wall_seconds: float) -> None:
    """Write the run's summary and plots and print its report; fails the command if a
    task trained no round."""
    summary = deployment_summary(run_dir, tasks, wall_seconds, run_dir.name)
    write_plots(run_dir, summary)
    print_summary(summary, run_dir, Console(), kind="deployment")
    untrained = [name for name, task in summary["tasks"].items() if task["rounds_completed"] == 0]
    if untrained:
        raise click.ClickException(
            f"no round of {', '.join(untrained)} was trained: every site refused or failed "
            f"(reasons in {run_dir / 'metrics.csv'}; a site refuses an app bundle it did not "
            "pin: `fedlora coordinator release`, then each site pins it)"
        )


def _planned_rounds(config: Path) -> int:
    return load_federation_config(config).rounds


def _bar_updater(progress: Progress, bar: TaskID) -> Callable[[TaskProgress], None]:
    """Show a task's progress, as its audit log tells it, on its bar; where the output
    is no terminal (a service, a pipe, CI), where a bar shows nothing until the end, as
    a line each time it changes."""
    shown: list[str] = []

    def show(state: TaskProgress) -> None:
        description = describe(state)
        progress.update(
            bar, completed=state.completed, total=state.planned, description=description
        )
        if not progress.console.is_terminal and shown[-1:] != [description]:
            shown.append(description)
            progress.console.print(description, markup=False, highlight=False)

    return show


def _problems_printer(console: Console) -> Callable[[str], None]:
    """Print the ServerApp's ERROR and WARNING lines above the bars (the whole log goes to
    RUN_DIR/coordinator.log)."""

    def follow(line: str) -> None:
        if "ERROR" in line or "WARNING" in line:
            console.print(line, markup=False, highlight=False)

    return follow
