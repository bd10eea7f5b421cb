"""The finished small simulation that several integration modules inspect (run once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from common.cli import cli
from tests.conftest import SMALL_SCENARIO

CONSOLE_OUTPUT = "console.txt"
"""Beside the run directory: everything `fedlora simulate` printed, for log scans."""


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-round simulation of SMALL_SCENARIO through the real CLI: RUN_DIR, with the
    data (and the sites' state) in RUN_DIR/../data."""
    root = tmp_path_factory.mktemp("simulation")
    scenario = root / "scenario.toml"
    scenario.write_text(tomli_w.dumps(SMALL_SCENARIO))
    run_dir = root / "run"
    result = CliRunner().invoke(
        cli,
        ["simulate", str(scenario), "--out", str(run_dir), "--data-dir", str(root / "data")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "dicom-classification" in result.output  # the summary table was printed
    (root / CONSOLE_OUTPUT).write_text(result.output)
    return run_dir
