"""A researcher's own data through `fedlora simulate`: an existing site config used as it
is, and one real table split by person across two simulated sites, in one federation.

The existing bank's config uses paths relative to its own folder and lives outside the
run; the run must train on that bank's own file, keep its ledger and audit log in that
bank's own state folder, pin the run's coordinator key only in the run's copy, and
install the signed artifact there. The split's sites are ordinary sites under the data
folder. One round of the tabular task keeps it short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
from click.testing import CliRunner

from client.audit import SITE_AUDIT_LOG
from client.ledger import INDEX_FILE, LEDGER_DIR
from common.cli import cli
from common.config import load_site_config
from simulations.generators.tabular import bank_schema, write_bank
from simulations.runner import build_base_model
from simulations.scenario import Scenario

pytestmark = pytest.mark.slow

TASK = "tabular-classification"


def _data_table(path: Path) -> dict[str, object]:
    schema = bank_schema()
    return {
        "format": "csv",
        "path": path.as_posix(),
        "classes": schema["classes"],
        "label_column": schema["label_column"],
        "person_column": schema["person_column"],
        "numeric_features": schema["numeric_features"],
        "categorical_features": schema["categorical_features"],
    }


def _site(folder: Path, site_id: str, customers: int, seed: int) -> Path:
    """A bank's folder as its operator keeps it: data, config with relative paths."""
    folder.mkdir(parents=True)
    write_bank(folder / "loans.csv", customers=customers, seed=seed, default_rate=0.4)
    document = {
        "site": {"id": site_id, "kind": "bank", "task": TASK, "base_model": "../base"},
        "data": _data_table(Path("loans.csv")),
        "privacy": {"epsilon": 5.0},
    }
    path = folder / f"{site_id}.toml"
    path.write_text(tomli_w.dumps(document))
    return path


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("own-data")
    demo = Scenario.model_validate(
        {
            "name": "base",
            "seed": 1,
            "tasks": {TASK: {}},
            "sites": [{"id": "bank-x", "kind": "bank", "customers": 1}],
        }
    )
    base = build_base_model(TASK, demo, root / "models")
    base.rename(root / "base")  # the researcher's own base model, wherever it lives
    _site(root / "my-bank", "my-bank", customers=130, seed=1)
    _site(root / "whole", "whole", customers=260, seed=2)
    study = root / "study"
    study.mkdir()
    scenario = study / "scenario.toml"
    scenario.write_text(
        tomli_w.dumps(
            {
                "name": "own",
                "seed": 3,
                "tasks": {TASK: {"rounds": 2, "batch_size": 32, "learning_rate": 0.1}},
                "sites": [{"id": "my-bank", "config": "../my-bank/my-bank.toml"}],
                "splits": [{"source": "../whole/whole.toml", "sites": 2, "prefix": "branch"}],
            }
        )
    )
    run_dir, data_dir = root / "run", root / "data"
    result = CliRunner().invoke(
        cli,
        [
            "simulate",
            str(scenario),
            "--out",
            str(run_dir),
            "--data-dir",
            str(data_dir),
            "--rounds",
            "1",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return root, run_dir, result.output


def test_the_existing_site_trains_on_its_own_data_and_ledger(
    own_run: tuple[Path, Path, str],
) -> None:
    root, run_dir, output = own_run
    state = root / "my-bank" / "state"
    assert json.loads((state / LEDGER_DIR / INDEX_FILE).read_text())  # its ledger has history
    assert (state / SITE_AUDIT_LOG).is_file()
    copy = load_site_config(run_dir / "sites" / "my-bank.toml")
    assert copy.data.path == (root / "my-bank" / "loans.csv").resolve()
    assert copy.site.coordinator_key == (run_dir / "keys" / "coordinator.pub").resolve()
    assert load_site_config(root / "my-bank" / "my-bank.toml").site.coordinator_key is None

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["sites"]) == {"my-bank", "branch-1", "branch-2"}
    bank = summary["sites"]["my-bank"]
    assert bank["epsilon_spent"] > 0 and bank["epsilon_budget"] == 5.0
    task = summary["tasks"][TASK]
    assert task["rounds_completed"] == 1
    assert "my-bank" in task["artifact"]["installed"]  # checked with the run's key
    assert (state / "artifacts" / TASK).is_dir()
    for site in ("my-bank", "branch-1", "branch-2"):
        assert site in output  # the summary table names every site
    assert not (root / "data" / "models").exists()  # no demo base was built


def test_the_split_sites_are_ordinary_sites(own_run: tuple[Path, Path, str]) -> None:
    root, run_dir, output = own_run
    assert "split 'branch' (IID; made)" in output
    whole = pd.read_csv(root / "whole" / "loans.csv", dtype=str)
    people: list[set[str]] = []
    rows = 0
    for site in ("branch-1", "branch-2"):
        config = load_site_config(run_dir / "sites" / f"{site}.toml")
        assert config.data.path == (root / "data" / "sites" / site / "data" / "loans.csv")
        assert (root / "data" / "sites" / site / "state" / LEDGER_DIR / INDEX_FILE).is_file()
        share = pd.read_csv(config.data.path, dtype=str)
        people.append(set(share["customer_id"]))
        rows += len(share)
    # Every customer (with all their loans) at exactly one branch, half of them at each.
    assert not people[0] & people[1]
    assert people[0] | people[1] == set(whole["customer_id"])
    assert [len(p) for p in people] == [130, 130] and rows == len(whole)
