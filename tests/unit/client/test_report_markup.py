"""``site check`` prints what the data says as text: a label, file name or reason that
looks like rich markup is shown as it is, never parsed (a ``[/red]`` label crashed the
command; a ``[benign]`` one vanished from the table)."""

from __future__ import annotations

from rich.console import Console

from client.cli import _print_report

MARKUP = ["[/red]", "[benign]", "Doe_John[/i].dcm"]


def test_values_from_the_data_are_printed_verbatim() -> None:
    report = {
        "site": "hosp-x",
        "kind": "hospital",
        "ok": False,
        "records": {"accepted": 2, "rejected": 1},
        "privacy_unit": "one person per [b]file[/b]",
        "adjusted": {"clipped [/x]": 1},
        "labels": {"[/red]": 1, "[benign]": 1},
        "rejected": [{"record": "Doe_John[/i].dcm", "reason": "label '[benign]' is unknown"}],
        "client_releases": [],
        "refused_bundles": [{"fab_sha256": "ab[/c]", "times": 2, "run": "[/run]"}],
        "problems": ["column '[/bold]' is missing"],
    }
    console = Console(record=True, width=400)
    _print_report(report, console)
    text = console.export_text()
    for value in [*MARKUP, "[b]file[/b]", "clipped [/x]", "ab[/c]", "[/run]", "'[/bold]'"]:
        assert value in text
