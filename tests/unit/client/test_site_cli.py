"""``fedlora site check``: exit codes and the JSON report."""

from __future__ import annotations

import json

from click.testing import CliRunner

from common.cli import main
from tests.conftest import write_site_config


def _run(args: list[str]) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(lambda: main(), args=args)  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


def test_check_reports_counts_labels_and_rejections(
    small_scenario, site_workspace, tmp_path
) -> None:
    from common.cli import cli

    path = write_site_config(small_scenario, site_workspace, "hospital-a", tmp_path)
    result = CliRunner().invoke(cli, ["site", "check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"site", "kind", "ok", "records", "rejected", "labels"}
    assert report["site"] == "hospital-a" and report["ok"] is True
    assert report["records"]["rejected"] == len(report["rejected"]) == 5
    assert all(item["reason"] for item in report["rejected"])
    assert set(report["labels"]) == {"normal", "lesion"}


def test_check_fails_when_the_cohort_is_too_small(small_scenario, site_workspace, tmp_path) -> None:
    from common.cli import cli

    path = write_site_config(small_scenario, site_workspace, "bank-b", tmp_path)
    path.write_text(path.read_text().replace("min_cohort = 20", "min_cohort = 5000"))
    result = CliRunner().invoke(cli, ["site", "check", str(path)])
    assert result.exit_code == 1
    assert "fewer than k = 5000" in result.stdout


def test_invalid_config_is_one_clear_message(tmp_path) -> None:
    from common.cli import cli

    path = tmp_path / "broken.toml"
    path.write_text('[site]\nid = "x"\nkind = "clinic"\n')
    result = CliRunner().invoke(cli, ["site", "check", str(path)], standalone_mode=False)
    assert result.exception is not None
    message = str(result.exception)
    assert "site.kind" in message and "privacy: required" in message
