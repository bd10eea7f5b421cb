"""``fedlora coordinator …``: start the SuperLink and launch (or resume) runs on it."""

from __future__ import annotations

import logging
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    TaskID,
)

from common import pki
from common.config import load_federation_config
from common.errors import ConfigError
from common.processes import run_daemon
from server.checkpoint import STATE_FILE
from server.deployment import (
    ROUND_LINE,
    Coordinator,
    flwr_run,
    stage_federation,
    staged_federations,
    wait_for_port,
)
from server.run import RESULT_DIR
from server.run_report import deployment_summary, print_summary, round_progress, write_plots

logger = logging.getLogger(__name__)

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def coordinator() -> None:
    """Coordinator commands: run the SuperLink, launch and resume federation runs.

    \b
      fedlora pki init --address fl.example.org          # once
      fedlora coordinator start --port 9092              # the server, long-lived
      fedlora coordinator register                        # sites added since the start
      fedlora coordinator run federation/*.toml          # a run, any number of tasks
      fedlora coordinator run --resume runs/<run>        # after an interruption
    """


@coordinator.command()
@CERTS
@STATE
@click.option(
    "--host",
    default="0.0.0.0",
    show_default=True,
    help="Interface the SuperLink listens on (its Fleet, Control and Runtime APIs share it).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9092,
    show_default=True,
    help="The SuperLink's port; sites connect to HOST:PORT (their connection.superlink).",
)
@click.option(
    "--address",
    default=None,
    help="How this machine reaches the SuperLink to register keys and launch runs "
    "(default 127.0.0.1:PORT; a name in the TLS certificate).",
)
def start(certs: Path, state_dir: Path, host: str, port: int, address: str | None) -> None:
    """Run flower-superlink with TLS, SuperNode authentication and a persistent state
    database, and register the node key of every site in CERTS/sites.

    Stays in the foreground (a systemd service) until SIGTERM or Ctrl-C; everything
    the SuperLink says is appended to STATE_DIR/superlink.log.
    """
    node = Coordinator(certs.resolve(), state_dir.resolve())
    node.check_pki()
    sites = pki.registered_node_keys(node.certs)
    if not sites:
        logger.warning("no site in %s yet: add one with `fedlora pki add-site`", certs / "sites")
    connect = address or f"127.0.0.1:{port}"
    node.write_cli_config(connect)
    node.state_dir.mkdir(parents=True, exist_ok=True)

    def register(process: subprocess.Popen[str]) -> None:
        wait_for_port(host, port, 60, lambda: process.poll() is None)
        outcomes = node.register_sites()
        click.echo(
            f"SuperLink listening on {host}:{port} (TLS, node authentication); "
            f"{len(outcomes)} site(s) registered: {', '.join(sorted(outcomes)) or 'none'}",
            err=True,
        )

    code = run_daemon(
        node.superlink_command(host, port),
        node.superlink_log,
        node.cli_environment(),
        on_line=lambda line: logger.debug("superlink: %s", line),
        started=register,
    )
    click.echo(f"flower-superlink stopped (exit code {code}); log: {node.superlink_log}", err=True)
    raise SystemExit(code)


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
@click.option(
    "--signing-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The coordinator's Ed25519 key (default CERTS/coordinator.key); it signs the "
    "audit log and the artifact, and the sites pinned its public half.",
)
def run(
    federations: tuple[Path, ...],
    certs: Path,
    state_dir: Path,
    out: Path | None,
    resume_dir: Path | None,
    signing_key: Path | None,
) -> None:
    """Launch a federation run on the SuperLink: one `flwr run` per FEDERATION config
    (a task each), into one run directory.

    The run directory ends like a simulation's: summary.json, metrics.csv, plots/,
    adapters/, checkpoints/, the signed audit log (audit/) and each task's signed
    artifact (artifacts/). Progress streams as the rounds finish.
    """
    node = Coordinator(certs.resolve(), state_dir.resolve())
    if not (node.flwr_home / "config.toml").exists():
        raise ConfigError(
            f"{state_dir} has no SuperLink connection: run `fedlora coordinator start`"
        )
    key = (signing_key or node.certs / pki.COORDINATOR_KEY).resolve()
    if resume_dir is not None:
        if federations:
            raise click.UsageError(
                "--resume continues a run with its own settings; give no FEDERATIONS"
            )
        run_dir = resume_dir.resolve()
        tasks = staged_federations(run_dir)
    else:
        if not federations:
            raise click.UsageError("give at least one federation config (or --resume RUN_DIR)")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        run_dir = (out or Path("runs") / f"deployment-{stamp}").resolve()
        tasks = {}
        for source in federations:
            federation, staged = stage_federation(source, run_dir)
            tasks[federation.task] = staged
    console = Console(stderr=True)
    started = time.monotonic()
    with round_progress(console) as progress:
        for task, config in tasks.items():
            if (run_dir / RESULT_DIR / f"{task}.json").exists():
                progress.console.print(f"{task}: finished earlier, skipped")
                continue
            # A task interrupted before its first checkpoint starts over in its own log.
            resume = resume_dir is not None
            checkpointed = (run_dir / "checkpoints" / task / STATE_FILE).exists()
            label = f"{task} (resumed)" if resume and checkpointed else task
            bar = progress.add_task(label, total=_planned_rounds(config))

            def follow(line: str, bar: TaskID = bar) -> None:
                found = ROUND_LINE.search(line)
                if found:
                    progress.update(
                        bar,
                        completed=int(found["round"]),
                        description=f"{found['task']} accuracy {float(found['acc']):.3f}",
                    )
                elif "ERROR" in line or "WARNING" in line:
                    progress.console.print(line, markup=False, highlight=False)

            code = flwr_run(
                node,
                {
                    "federation-config": str(config),
                    "run-dir": str(run_dir),
                    "signing-key": str(key),
                    "resume": "true" if resume else "",
                },
                run_dir / "coordinator.log",
                follow,
            )
            if code != 0 or not (run_dir / RESULT_DIR / f"{task}.json").exists():
                raise click.ClickException(
                    f"the {task} run did not finish (flwr run exit code {code}; log: "
                    f"{run_dir / 'coordinator.log'}). Once the SuperLink is back, continue "
                    f"it with: fedlora coordinator run --resume {run_dir}"
                )
    summary = deployment_summary(run_dir, list(tasks), time.monotonic() - started, run_dir.name)
    write_plots(run_dir, summary)
    print_summary(summary, run_dir, Console(), kind="deployment")


def _planned_rounds(config: Path) -> int:
    return load_federation_config(config).rounds
