"""``fedlora audit``: verify, reconcile and show, through the root command (which finds
the group through its installed entry point)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.cli import audit as audit_group
from common.audit.log import read_entries
from common.audit.review import SHOW_COLUMNS, entries_of, find_logs, select
from common.cli import cli
from common.signing import write_public_key
from tests.audit_runs import RUN, AuditedRun, write_audited_run
from tests.audit_runs import flat_output as _text
from tests.audit_runs import invoke_audit as _invoke


@pytest.fixture
def run(tmp_path: Path) -> AuditedRun:
    return write_audited_run(tmp_path / "run")


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    """A run for read-only tests (never modify it)."""
    return write_audited_run(tmp_path_factory.mktemp("cli") / "run")


def _edit_field(path: Path, line: int, **data: Any) -> None:
    """Change data fields of the entry on this (1-based) line, leaving its hash alone."""
    entries = read_entries(path)
    entries[line - 1]["data"].update(data)
    path.write_text(
        "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries),
        encoding="utf-8",
    )


def _line_of(path: Path, event: str, server_round: int) -> int:
    for number, entry in enumerate(read_entries(path), start=1):
        if entry["event"] == event and entry["data"].get("round") == server_round:
            return number
    raise AssertionError(f"no {event} for round {server_round} in {path}")


# ------------------------------------------------------------------------ verify ---


def test_verify_an_honest_run_exits_0(shared_run: AuditedRun) -> None:
    result = _invoke("verify", str(shared_run.run_dir))

    assert result.exit_code == 0, result.output
    assert result.output.count("intact  ") == 3  # one status line per log
    assert "no --key given" in result.output
    assert "NOT INTACT" not in result.output
    assert "first bad entry" not in result.output
    for path in [shared_run.coordinator_log, *shared_run.site_logs.values()]:
        assert path.name in result.output


def test_verify_a_run_with_an_edited_site_log_exits_1_naming_the_entry(run: AuditedRun) -> None:
    path = run.site_logs["bank-a"]
    line = _line_of(path, "training-done", 2)
    _edit_field(path, line, records=201)

    result = _invoke("verify", str(run.run_dir))

    assert result.exit_code == 1, result.output
    assert result.output.count("NOT INTACT") == 1
    assert f"first bad entry: line {line}: entry {line - 1} was edited" in _text(result)
    bad = [row for row in result.output.splitlines() if "NOT INTACT" in row]
    assert "bank-a.jsonl" in bad[0]


def test_verify_json_reports_ok_flags(run: AuditedRun) -> None:
    honest = _invoke("verify", str(run.run_dir), "--json")
    assert honest.exit_code == 0, honest.output
    reports = json.loads(honest.stdout)
    assert [Path(r["path"]).name for r in reports] == [
        run.coordinator_log.name,
        "bank-a.jsonl",
        "bank-b.jsonl",
    ]
    assert [r["ok"] for r in reports] == [True, True, True]
    assert [r["actor"] for r in reports] == ["coordinator", "bank-a", "bank-b"]
    assert all(r["findings"] == [] for r in reports)
    assert reports[0]["entries"] == 23

    path = run.site_logs["bank-b"]
    line = _line_of(path, "training-done", 1)
    _edit_field(path, line, epsilon_after=0.5)

    tampered = _invoke("verify", str(run.run_dir), "--json")
    assert tampered.exit_code == 1
    reports = json.loads(tampered.stdout)
    assert [r["ok"] for r in reports] == [True, True, False]
    assert reports[2]["findings"][0].startswith(f"line {line}: ")


def test_verify_a_file_with_the_right_key_exits_0(shared_run: AuditedRun, tmp_path: Path) -> None:
    public = tmp_path / "bank-a.pub"
    write_public_key(public, shared_run.site_keys["bank-a"].public_key())

    result = _invoke("verify", str(shared_run.site_logs["bank-a"]), "--key", str(public))

    assert result.exit_code == 0, result.output
    assert "pinned with --key" in result.output


def test_verify_a_file_with_the_wrong_key_exits_1(shared_run: AuditedRun, tmp_path: Path) -> None:
    public = tmp_path / "other.pub"
    write_public_key(public, Ed25519PrivateKey.generate().public_key())

    result = _invoke("verify", str(shared_run.site_logs["bank-a"]), "--key", str(public))

    assert result.exit_code == 1, result.output
    assert "NOT INTACT" in result.output
    assert "first bad entry: line 1:" in _text(result)
    assert "re-signed by another party" in _text(result)


def test_verify_a_run_with_the_wrong_key_exits_1(shared_run: AuditedRun, tmp_path: Path) -> None:
    public = tmp_path / "other.pub"
    write_public_key(public, Ed25519PrivateKey.generate().public_key())

    result = _invoke("verify", str(shared_run.run_dir), "--key", str(public), "--json")

    assert result.exit_code == 1
    # The coordinator's log fails, so nothing vouches for the sites' keys either.
    reports = json.loads(result.stdout)
    assert [r["ok"] for r in reports] == [False, False, False]
    assert all("nothing vouches" in r["findings"][0] for r in reports[1:])


def test_verify_a_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke("verify", str(tmp_path / "nowhere"))
    assert result.exit_code == 2


# --------------------------------------------------------------------- reconcile ---


def test_reconcile_an_honest_run_exits_0(shared_run: AuditedRun) -> None:
    for site, expected in (("bank-a", 3), ("bank-b", 2)):
        result = _invoke(
            "reconcile", str(shared_run.coordinator_log), str(shared_run.site_logs[site])
        )
        assert result.exit_code == 0, result.output
        assert f"reconciled: site {site}, run {RUN}: {expected} update(s) match" in result.output
        assert "DOES NOT RECONCILE" not in result.output
    # bank-b's rejected update is a note
    assert "note    round 2: rejected as the site sent it" in result.output


def test_reconcile_a_changed_site_update_hash_exits_1(run: AuditedRun) -> None:
    path = run.site_logs["bank-a"]
    _edit_field(path, _line_of(path, "training-done", 3), update_sha256="0" * 64)

    result = _invoke("reconcile", str(run.coordinator_log), str(path))

    assert result.exit_code == 1, result.output
    assert "DOES NOT RECONCILE" in result.output
    assert "1 problem(s)" in result.output
    assert "problem round 3:" in result.output


def test_reconcile_takes_two_files(shared_run: AuditedRun) -> None:
    result = _invoke("reconcile", str(shared_run.run_dir), str(shared_run.site_logs["bank-a"]))
    assert result.exit_code == 2


# -------------------------------------------------------------------------- show ---


def test_show_filters_by_site_and_round(shared_run: AuditedRun) -> None:
    result = _invoke("show", str(shared_run.run_dir), "--site", "bank-b", "--round", "2")

    assert result.exit_code == 0, result.output
    assert "3 audit entries" in result.output
    # bank-b's policy decision and training, and the coordinator's rejection
    for label in ("site#5", "site#6", "coord#12"):
        assert label in result.output
    for event in ("policy-decision", "training-done", "update-received"):
        assert event in result.output
    assert "update norm 612 exceeds the bound 44" in result.output
    # not bank-a's update in the same round, nor round-level coordinator entries
    for label in ("coord#11", "coord#10", "coord#13", "site#4", "site#7"):
        assert label not in result.output
    assert "aggregation-done" not in result.output


def test_show_event_as_json(shared_run: AuditedRun) -> None:
    result = _invoke("show", str(shared_run.run_dir), "--event", "update-received", "--json")

    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert len(entries) == 5
    assert {e["event"] for e in entries} == {"update-received"}
    assert [(e["data"]["round"], e["data"]["site"]) for e in entries] == [
        (1, "bank-a"),
        (1, "bank-b"),
        (2, "bank-a"),
        (2, "bank-b"),
        (3, "bank-a"),
    ]
    # the entries as logged, hash and signature included
    assert entries == [
        e for e in read_entries(shared_run.coordinator_log) if e["event"] == "update-received"
    ]


def test_show_repeated_filters_as_json(shared_run: AuditedRun) -> None:
    result = _invoke(
        "show",
        str(shared_run.run_dir),
        "--event",
        "training-done",
        "--event",
        "budget-refused",
        "--round",
        "1",
        "--round",
        "3",
        "--json",
    )

    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)
    assert sorted((e["actor"], e["event"], e["data"]["round"]) for e in entries) == [
        ("bank-a", "training-done", 1),
        ("bank-a", "training-done", 3),
        ("bank-b", "budget-refused", 3),
        ("bank-b", "training-done", 1),
    ]


def test_show_csv_has_the_columns_and_one_row_per_entry(shared_run: AuditedRun) -> None:
    result = _invoke("show", str(shared_run.run_dir), "--site", "bank-a", "--csv")

    assert result.exit_code == 0, result.output
    reader = csv.DictReader(io.StringIO(result.stdout))
    rows = list(reader)
    assert tuple(reader.fieldnames or ()) == SHOW_COLUMNS
    expected = select(entries_of(find_logs(shared_run.run_dir).all), sites=["bank-a"])
    # bank-a's own 9 entries, and the coordinator's site-joined and 3 update-received
    assert len(expected) == 13
    assert len(rows) == len(expected)
    assert {row["site"] for row in rows} == {"bank-a"}
    assert [(row["log"], row["seq"]) for row in rows] == [
        (str(e["actor"]), str(e["seq"])) for e in expected
    ]


def test_show_csv_of_a_single_log(shared_run: AuditedRun) -> None:
    result = _invoke("show", str(shared_run.site_logs["bank-b"]), "--csv")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 8
    assert [row["seq"] for row in rows] == [str(n) for n in range(8)]


def test_show_json_and_csv_together_is_a_usage_error(shared_run: AuditedRun) -> None:
    result = _invoke("show", str(shared_run.run_dir), "--json", "--csv")

    assert result.exit_code == 2
    assert "choose one of --json and --csv" in result.output


def test_show_a_directory_without_audit_logs_fails(tmp_path: Path) -> None:
    result = _invoke("show", str(tmp_path))
    assert result.exit_code != 0


# -------------------------------------------------------------------------- help ---


def _option_names(command: click.Command) -> list[str]:
    return [
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    ]


def test_the_audit_group_help_lists_its_commands() -> None:
    result = _invoke("--help")

    assert result.exit_code == 0, result.output
    for command in ("verify", "reconcile", "show", "report"):
        assert command in result.output
    assert "-h, --help" in result.output
    assert "audit" in CliRunner().invoke(cli, ["--help"]).output


EXPECTED_OPTIONS = {
    "verify": {"--key", "--json", "-h", "--help"},
    "reconcile": {"-h", "--help"},
    "show": {"--site", "--round", "--event", "--json", "--csv", "-h", "--help"},
    "report": {"--out", "--key", "-h", "--help"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_OPTIONS))
def test_each_command_help_documents_every_option(name: str) -> None:
    command = audit_group.commands[name]
    parent = click.Context(audit_group, info_name="audit", **audit_group.context_settings)
    context = click.Context(command, info_name=name, parent=parent)
    options = set(_option_names(command)) | set(command.get_help_option_names(context))
    assert options == EXPECTED_OPTIONS[name]

    result = _invoke(name, "--help")

    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output, f"{name} --help does not mention {option}"
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts[0]} has no help text"
    for argument in (p for p in command.params if isinstance(p, click.Argument)):
        assert argument.human_readable_name.upper() in result.output
