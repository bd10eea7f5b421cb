"""The commented configs fedlora ships for deployments: ``sites/template.toml`` with its
deployment lines filled in, and the federation (run) configs in ``sites/federation/``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from common.config import FederationConfig, load_federation_config, load_site_config
from common.tasks import TASKS
from server.aggregation import AGGREGATORS

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "sites" / "template.toml"
FEDERATIONS = ROOT / "sites" / "federation"
DEMO_MODELS = ROOT / "runs" / "data" / "default" / "models"
"""Where `fedlora simulate` (default scenario, run from the checkout) writes the bases."""


def _uncomment(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``# KEY = …`` line of ``values`` made active with its value,
    and the commented ``# [connection]`` header active; each must occur exactly once."""
    for key, value in values.items():
        pattern = re.compile(rf"^# {key} = .*$", re.M)
        assert len(pattern.findall(text)) == 1, f"template: {key} is not one commented line"
        text = pattern.sub(f"{key} = {json.dumps(value)}", text)
    assert text.count("\n# [connection]\n") == 1
    return text.replace("\n# [connection]\n", "\n[connection]\n")


def test_the_template_loads_with_its_deployment_lines_filled_in(tmp_path: Path) -> None:
    text = _uncomment(
        TEMPLATE.read_text(),
        {
            "signing_key": "keys/audit-key.pem",
            "coordinator_key": "bundle/coordinator.pub",
            "superlink": "fl.example.org:9092",
            "ca_certificate": "bundle/ca.pem",
            "node_key": "keys/node.key",
        },
    )
    path = tmp_path / "my-site.toml"
    path.write_text(text)
    config = load_site_config(path)
    assert config.connection is not None
    assert config.connection.superlink == "fl.example.org:9092"
    assert config.connection.ca_certificate == (tmp_path / "bundle" / "ca.pem").resolve()
    assert config.connection.node_key == (tmp_path / "keys" / "node.key").resolve()
    assert config.site.coordinator_key == (tmp_path / "bundle" / "coordinator.pub").resolve()
    assert config.site.signing_key == (tmp_path / "keys" / "audit-key.pem").resolve()
    assert config.site.audit_key_path == config.site.signing_key


def test_the_template_as_shipped_has_no_connection(tmp_path: Path) -> None:
    """Commented out, so a simulation-style site or the appended bundle sets it."""
    path = tmp_path / "my-site.toml"
    shutil.copyfile(TEMPLATE, path)
    config = load_site_config(path)
    assert config.connection is None
    assert config.site.signing_key is None and config.site.coordinator_key is None


def _federations() -> list[Path]:
    return sorted(FEDERATIONS.glob("*.toml"))


def test_a_federation_config_ships_for_the_deployment_tasks() -> None:
    assert [path.stem for path in _federations()] == [
        "dicom-classification",
        "tabular-classification",
    ]


@pytest.mark.parametrize("shipped", _federations(), ids=lambda path: path.stem)
def test_the_shipped_federation_config_loads(tmp_path: Path, shipped: Path) -> None:
    config = load_federation_config(shipped)
    assert config.task == shipped.stem
    TASKS.get(config.task)
    assert config.aggregator in AGGREGATORS
    # The demo base of its task, resolved against the file's folder (it need not exist).
    assert config.base_model == (DEMO_MODELS / config.task).resolve()
    assert config.dp.noise_multiplier is None  # each site calibrates σ from its budget
    assert config.dp.epsilon_per_run is not None and config.min_sites >= 1
    # Moved with its base folder, it still finds the base next to it.
    copy = tmp_path / "coordinator" / "federation" / shipped.name
    copy.parent.mkdir(parents=True)
    shutil.copyfile(shipped, copy)
    moved = load_federation_config(copy)
    assert moved.base_model == (tmp_path / "runs" / "data" / "default" / "models" / config.task)
    assert moved.model_dump(exclude={"base_model"}) == config.model_dump(exclude={"base_model"})


@pytest.mark.parametrize("shipped", _federations(), ids=lambda path: path.stem)
def test_every_key_of_the_shipped_federation_config_is_explained(shipped: Path) -> None:
    """Each key set (or shown commented) has a comment line right above it, and every
    setting of FederationConfig appears in the file."""
    lines = shipped.read_text().splitlines()
    keys: set[str] = set()
    table = ""
    for number, line in enumerate(lines):
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            table = header.group(1) + "."
            continue
        setting = re.fullmatch(r"(?:# )?(\w+) = .+", line)
        if setting:
            keys.add(table + setting.group(1))
            above = lines[number - 1]
            assert above.startswith("#"), f"{shipped.name}: {line!r} has no comment"
    nested = {"lora", "dp", "validation", "rollback"}
    expected = {name for name in FederationConfig.model_fields if name not in nested}
    for name in nested:
        model = FederationConfig.model_fields[name].annotation
        assert isinstance(model, type)
        expected |= {f"{name}.{field}" for field in model.model_fields}
    assert keys == expected
