"""The ``fedlora`` command. Each role's sub-commands live in the package that owns them
(``client.cli`` for sites, ``simulations.cli`` for simulations, …) and are found through
the ``fedlora.commands`` entry points, so this root never imports client or server code.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import click
from transformers.utils import logging as transformers_logging

from common.errors import FedloraError

INTERNAL_ERROR = 70
"""Exit code of an unexpected failure (EX_SOFTWARE), apart from 1 and 2, which mean
something the operator can fix."""


class _RoleGroup(click.Group):
    """Loads the installed command groups lazily, so ``--help`` stays fast."""

    def _commands(self) -> dict[str, click.Command]:
        found = {}
        for entry in entry_points(group="fedlora.commands"):
            found[entry.name] = entry
        return found  # type: ignore[return-value]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._commands())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self._commands().get(cmd_name)
        if entry is None:
            return None
        command = entry.load()  # type: ignore[attr-defined]
        if not isinstance(command, click.Command):
            raise click.ClickException(f"entry point {cmd_name!r} is not a click command")
        return command


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("flwr", "ray", "transformers", "urllib3", "httpx", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        transformers_logging.disable_progress_bar()  # per-file bars drown the real progress


@click.group(cls=_RoleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs, Flower's and Ray's too.")
@click.version_option(package_name="fedlora")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """fedlora: federated, differentially private LoRA training for hospitals and banks.

    \b
    Roles:
      simulate      run a multi-site federation on this machine (researchers)
      pki           the deployment's CA, TLS certificate and keys (coordinator, sites)
      model         make or import a base model, and inspect one (coordinator)
      coordinator   run the SuperLink, launch and resume runs (coordinator)
      site          check a site, watch its budget, run its daemon (site operators)
      audit         verify, reconcile and review the signed audit trail (auditors)
      artifact      verify, inspect and run the signed int8 model (model consumers)
    """
    ctx.obj = {"verbose": verbose}
    configure_logging(verbose)


def main() -> None:
    """Entry point: operator-facing errors print as one message, never a traceback;
    anything else is a defect, logged with its traceback, exit 70."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FedloraError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except Exception as exc:  # a defect, not an operator's mistake: keep it distinguishable
        logging.getLogger("fedlora").exception("unexpected failure")
        click.secho(f"internal error: {type(exc).__name__}: {exc}", fg="red", err=True)
        sys.exit(INTERNAL_ERROR)
