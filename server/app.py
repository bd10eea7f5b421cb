"""The Flower ServerApp: reads the run's configuration and hands over to ``run_federation``.

In a deployment the run config names the federation TOML (``federation-config``) and
the output directory (``run-dir``), and optionally the coordinator's Ed25519 key
(``signing-key``; without it the run makes its own under ``run-dir/keys``),
``resume="true"`` continues the run in ``run-dir`` from its last checkpoint, and
``site-registry`` names the JSON file of the sites' registered audit keys (written by
``write_site_registry``; empty: none, as in a simulation); a simulation builds the app
with the first two bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import FederationConfig, load_federation_config
from common.errors import ConfigError
from server.run import run_federation

RunSource = Callable[[Context], tuple[FederationConfig, Path]]


def run_from_run_config(context: Context) -> tuple[FederationConfig, Path]:
    config_path = context.run_config.get("federation-config")
    run_dir = context.run_config.get("run-dir")
    if not config_path or not run_dir:
        raise ConfigError("the run config needs 'federation-config' and 'run-dir'")
    return load_federation_config(Path(str(config_path))), Path(str(run_dir))


def site_registry_path(context: Context) -> Path | None:
    """The run config's ``site-registry`` file; None when empty or unset (a simulation)."""
    value = context.run_config.get("site-registry")
    return Path(str(value)) if value else None


def build_server_app(source: RunSource = run_from_run_config) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federation, run_dir = source(context)
        signing_key = context.run_config.get("signing-key")
        run_federation(
            grid,
            federation,
            run_dir,
            Path(str(signing_key)) if signing_key else None,
            resume=str(context.run_config.get("resume", "")).lower() == "true",
            site_registry=site_registry_path(context),
        )

    return app


app = build_server_app()
