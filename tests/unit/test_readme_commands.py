"""Every `fedlora` command the README shows in a shell block exists, with the options
it is shown with: a new coordinator or site operator copies them verbatim."""

from __future__ import annotations

from pathlib import Path

from tests.cli_commands import check_commands_exist, shell_commands

README = Path(__file__).resolve().parents[2] / "README.md"


def _shell_blocks(text: str) -> str:
    """The lines of the ```bash blocks (indented ones in lists too)."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            inside = not inside and fence == "```bash"
        elif inside:
            lines.append(line)
    return "\n".join(lines)


def test_every_fedlora_command_in_the_readme_exists() -> None:
    commands = shell_commands(_shell_blocks(README.read_text()))
    assert len(commands) >= 12, commands
    check_commands_exist(commands)


def test_the_deployment_section_shows_the_whole_flow_in_order() -> None:
    section = README.read_text().split("## Deploying across institutions", 1)[1]
    section = section.split("\n## ", 1)[0]
    shown = [" ".join(command.split()[1:3]) for command in shell_commands(_shell_blocks(section))]
    flow = [
        "pki init",
        "pki site-keys",
        "pki add-site",
        "site check",
        "site run",
        "coordinator start",
        "coordinator register",
        "coordinator run",
    ]
    assert [step for step in shown if step in flow][: len(flow)] == flow, shown
