"""Commands shown to people (the README, the next steps a command prints) must be
commands the `fedlora` CLI has, with options it has: a newcomer copies them verbatim."""

from __future__ import annotations

import re
import shlex

import click

from common.cli import cli


def shell_commands(text: str, prefix: str = "fedlora ") -> list[str]:
    """The commands of ``text`` that start with ``prefix`` (after an optional
    ``.venv/bin/``), continued lines joined, trailing comments dropped."""
    commands: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1].removesuffix("\\").rstrip() + " " + stripped
            continue
        stripped = stripped.removeprefix(".venv/bin/")
        if stripped.startswith(prefix):
            commands.append(re.sub(r"\s+#.*$", "", stripped))
    return [re.sub(r"\s+#.*$", "", command) for command in commands]


def check_commands_exist(commands: list[str]) -> None:
    """Each command, and each --option it gives, is one the fedlora CLI has."""
    for command in commands:
        words = shlex.split(command)[1:]
        found: click.Command = cli
        for word in words:
            sub = (
                found.get_command(click.Context(found), word)
                if isinstance(found, click.Group)
                else None
            )
            if sub is None:
                break
            found = sub
        assert not isinstance(found, click.Group), f"no such command: {command}"
        options = {name for param in found.params for name in param.opts}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{command}: no option {word}"
