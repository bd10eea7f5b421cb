"""The repository's own promises: shipped site files validate, the stack is the pinned one."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from common.config import load_site_config
from simulations.scenario import builtin_scenarios, load_scenario

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "sites").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_site_files_validate(path: Path) -> None:
    config = load_site_config(path)
    assert config.privacy.epsilon > 0


def test_builtin_scenarios_validate() -> None:
    assert "default" in builtin_scenarios()
    default = load_scenario("default")
    assert sorted(s.kind for s in default.sites) == ["bank"] * 2 + ["hospital"] * 3


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        ("torch", "2.13.0"),
        ("flwr", "1.42."),
        ("opacus", "1.6."),
        ("peft", "0.21."),
        ("transformers", "5."),
        ("pydicom", "3."),
        ("pandas", "3."),
        ("pydantic", "2."),
    ],
)
def test_installed_stack_is_the_pinned_one(package: str, expected: str) -> None:
    assert version(package).startswith(expected)


def test_constraints_pin_what_pyproject_pins() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    normalise = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for requirement in pyproject["project"]["dependencies"]:
        name, pinned = requirement.split("==")
        name = name.split("[")[0].lower().replace("_", "-")
        assert normalise.get(name) == pinned, name


def test_flower_app_components_point_at_the_apps() -> None:
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from client.app import app as client_app
    from server.app import app as server_app

    assert client_app is not None and server_app is not None


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Run the tests**", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_app_bundle_holds_fedloras_packages_and_nothing_else() -> None:
    """What `flwr run` ships (and a release pins): no site config, key, test or data."""
    import io
    import zipfile

    from common.release import build_fab

    names = zipfile.ZipFile(io.BytesIO(build_fab(ROOT))).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {".info", "pyproject.toml", "common", "client", "server", "simulations"}
    assert "client/app.py" in names and "server/app.py" in names
    assert not any(name.endswith((".pem", ".key", ".csv", ".dcm")) for name in names)
