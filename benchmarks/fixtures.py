"""The default scenario's sites and models, generated once per benchmark invocation.

Every measurement that needs sites starts from a copy of the same generated template
(same data, same held-out split, fixed person-key salts, fresh privacy ledgers), so two
runs side by side differ only in what is being compared.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import ViTConfig

from client.site import SALT_FILE
from simulations.runner import PreparedRun, prepare
from simulations.scenario import Scenario, load_scenario

QUICK_SCALE = 0.5
"""--quick: half the people at every site, but never so few that a site's held-out
split falls below the minimum cohort of 20 (a hospital refuses to report metrics)."""
QUICK_MINIMUM = {"patients": 110, "customers": 300}
QUICK_ROUNDS = {"dicom-classification": 3, "tabular-classification": 4}


def scenario_document(quick: bool, name: str = "default") -> dict[str, Any]:
    """The built-in scenario as a document; --quick shrinks sites and rounds."""
    document: dict[str, Any] = json.loads(load_scenario(name).model_dump_json())
    if quick:
        for site in document["sites"]:
            for size, minimum in QUICK_MINIMUM.items():
                if site.get(size):
                    site[size] = min(site[size], max(int(site[size] * QUICK_SCALE), minimum))
        for task, settings in document["tasks"].items():
            settings["rounds"] = QUICK_ROUNDS.get(task, settings["rounds"])
    return document


@dataclass(frozen=True)
class Template:
    """Generated sites and base models, ready to be copied into runs."""

    root: Path
    document: dict[str, Any]

    @property
    def data_dir(self) -> Path:
        return self.root / "template"

    def run(self, name: str, **changes: Any) -> tuple[PreparedRun, Path]:
        """A fresh copy of the sites, prepared for a run named ``name``.

        ``changes`` update every task's settings (for example ``dp`` or ``rounds``).
        """
        folder = self.root / name
        data_dir, run_dir = folder / "data", folder / "run"
        shutil.copytree(self.data_dir, data_dir)
        document = json.loads(json.dumps(self.document))
        for settings in document["tasks"].values():
            settings.update(json.loads(json.dumps(changes)))
        return prepare(Scenario.model_validate(document), run_dir, data_dir), run_dir


def make_template(root: Path, document: dict[str, Any]) -> Template:
    """Generate the scenario's sites and models once, with fixed person-key salts."""
    scenario = Scenario.model_validate(document)
    prepare(scenario, root / "template-run", root / "template")
    for site in document["sites"]:
        state = root / "template" / "sites" / site["id"] / "state"
        state.mkdir(parents=True, exist_ok=True)
        (state / SALT_FILE).write_bytes(site["id"].encode().ljust(32, b"\0"))
    shutil.rmtree(root / "template-run")
    return Template(root, document)


def vit_b16_config() -> ViTConfig:
    """ViT-B/16 (224 px, 16 px patches, width 768, 12 layers, MLP 3072), two classes."""
    return ViTConfig(num_labels=2)  # type: ignore[call-arg]  # num_labels: PretrainedConfig
