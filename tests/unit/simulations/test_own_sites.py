"""Scenarios of a researcher's own data: existing site configs and splits, how they are
checked when the scenario is loaded, the base model they share, and the run's copies."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from common.config import load_site_config
from common.errors import ConfigError
from simulations.own_sites import own_base_model, write_run_copy
from simulations.partition import SplitReport
from simulations.runner import prepare
from simulations.scenario import ExistingSiteSpec, SplitSite, load_scenario
from tests.unit.simulations.sources import table_source

TABULAR = {"tabular-classification": {"rounds": 1, "batch_size": 16}}


def _model(folder: Path, content: str = "base") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(content)
    return folder


def _bank(folder: Path, site_id: str, **site: Any) -> Path:
    """An existing bank: a site config with relative paths, and its base model beside it."""
    config = table_source(folder, people=40)
    _model(folder / "model")
    document = load_site_config(config).model_dump(mode="json", exclude_none=True)
    document["site"].update(id=site_id, base_model="model", state_dir="state", **site)
    document["data"]["path"] = "whole.csv"
    path = folder / f"{site_id}.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def _scenario(folder: Path, **document: Any) -> Path:
    path = folder / "scenario.toml"
    path.write_text(tomli_w.dumps({"name": "own", "seed": 2, "tasks": TABULAR, **document}))
    return path


def test_an_existing_site_is_found_from_the_scenario_folder(tmp_path: Path) -> None:
    _bank(tmp_path / "banks" / "a", "bank-a")
    scenario = load_scenario(
        str(
            _scenario(
                tmp_path,
                sites=[
                    {"id": "bank-a", "config": "banks/a/bank-a.toml", "behaviour": {"kind": "nan"}}
                ],
            )
        )
    )
    (site,) = scenario.sites
    assert isinstance(site, ExistingSiteSpec)
    assert site.config == tmp_path / "banks" / "a" / "bank-a.toml"
    assert (site.kind, site.task, site.data_kind) == ("bank", "tabular-classification", "table")
    assert scenario.sites_of("tabular-classification") == [site]
    assert scenario.has_own_data("tabular-classification")
    assert site.behaviour is not None and site.behaviour.kind == "nan"


def _problem(tmp_path: Path, **document: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_scenario(str(_scenario(tmp_path, **document)))
    return str(info.value)


def test_the_scenario_id_must_be_the_config_id(tmp_path: Path) -> None:
    _bank(tmp_path / "a", "bank-a")
    problem = _problem(tmp_path, sites=[{"id": "bank-b", "config": "a/bank-a.toml"}])
    assert "site.id = 'bank-a'" in problem and "'bank-b'" in problem


def test_an_existing_site_must_serve_a_task_of_the_scenario(tmp_path: Path) -> None:
    _bank(tmp_path / "a", "bank-a")
    problem = _problem(
        tmp_path,
        tasks={"dicom-classification": {"rounds": 1}},
        sites=[{"id": "bank-a", "config": "a/bank-a.toml"}],
    )
    assert "serves task 'tabular-classification'" in problem
    assert "not in the scenario's [tasks] (dicom-classification)" in problem


def test_an_existing_site_config_is_validated(tmp_path: Path) -> None:
    _bank(tmp_path / "a", "bank-a", task="tabular-regression")
    _bank(tmp_path / "b", "bank-b", task="dicom-classification")
    assert "site.task 'tabular-regression' is unknown" in _problem(
        tmp_path, sites=[{"id": "bank-a", "config": "a/bank-a.toml"}]
    )
    assert "trains on dicom data, but its [data] describes table data" in _problem(
        tmp_path, sites=[{"id": "bank-b", "config": "b/bank-b.toml"}]
    )
    assert "file not found" in _problem(tmp_path, sites=[{"id": "bank-c", "config": "c.toml"}])


def test_generated_and_own_sites_do_not_mix_in_a_task(tmp_path: Path) -> None:
    _bank(tmp_path / "a", "bank-a")
    problem = _problem(
        tmp_path,
        sites=[
            {"id": "bank-a", "config": "a/bank-a.toml"},
            {"id": "bank-g", "kind": "bank", "customers": 100},
        ],
    )
    assert "mixes generated sites (bank-g) with sites of your own data (bank-a)" in problem
    assert "separate scenarios" in problem


def test_split_site_ids_must_not_clash(tmp_path: Path) -> None:
    table_source(tmp_path / "whole", people=40)
    _bank(tmp_path / "a", "bank-1")
    problem = _problem(
        tmp_path,
        sites=[{"id": "bank-1", "config": "a/bank-1.toml"}],
        splits=[{"source": "whole/whole-bank.toml", "sites": 2, "prefix": "bank"}],
    )
    assert "site ids must be unique; repeated: ['bank-1']" in problem


def test_a_scenario_needs_a_site(tmp_path: Path) -> None:
    assert "at least one entry in [[sites]] or [[splits]]" in _problem(tmp_path)


def test_the_sites_of_a_task_share_one_base_model(tmp_path: Path) -> None:
    a, b = _bank(tmp_path / "a", "bank-a"), _bank(tmp_path / "b", "bank-b")
    scenario = load_scenario(
        str(
            _scenario(
                tmp_path,
                sites=[
                    {"id": "bank-a", "config": str(a)},
                    {"id": "bank-b", "config": str(b)},
                ],
            )
        )
    )
    sites = scenario.own_sites_of("tabular-classification")
    # Two copies of one model: the same base.
    assert own_base_model("tabular-classification", sites) == (tmp_path / "a" / "model").resolve()
    _model(tmp_path / "b" / "model", content="another base")
    with pytest.raises(ConfigError) as info:
        own_base_model("tabular-classification", sites)
    assert "name different base models (bank-a:" in str(info.value)
    assert "; bank-b:" in str(info.value)
    shutil.rmtree(tmp_path / "b" / "model")
    with pytest.raises(ConfigError, match=r"site bank-b: site\.base_model .* is not a directory"):
        own_base_model("tabular-classification", sites)


def test_the_run_copy_differs_only_in_the_coordinator_key(tmp_path: Path) -> None:
    (tmp_path / "a" / "keys").mkdir(parents=True)
    original = _bank(
        tmp_path / "a", "bank-a", signing_key="keys/audit.pem", artifact_dir="installed"
    )
    document = load_site_config(original).model_dump(mode="json", exclude_none=True)
    document["site"].pop("coordinator_key", None)
    document["site"].update(base_model="model", state_dir="state", signing_key="keys/audit.pem")
    document["site"]["artifact_dir"] = "installed"
    document["data"]["path"] = "whole.csv"
    document["site"].pop("state_dir")  # the default, "state" beside the file
    # A bundle's connection table, with the real coordinator's key in it.
    document["connection"] = {
        "superlink": "fl.example.org:9092",
        "ca_certificate": "keys/ca.pem",
        "node_key": "keys/node.key",
        "coordinator_key": "keys/coordinator.pub",
    }
    original.write_text(tomli_w.dumps(document))
    key = tmp_path / "run" / "keys" / "coordinator.pub"
    (tmp_path / "run" / "sites").mkdir(parents=True)

    copy = write_run_copy(original, tmp_path / "run" / "sites" / "bank-a.toml", key)

    before, after = load_site_config(original), load_site_config(copy)
    assert after.site.coordinator_key == key.resolve()
    assert before.site.coordinator_key == (tmp_path / "a" / "keys" / "coordinator.pub").resolve()
    assert after.site.state_dir == (tmp_path / "a" / "state").resolve()
    assert after.data.path == (tmp_path / "a" / "whole.csv").resolve()
    assert after.connection is not None and after.connection.node_key.is_relative_to(tmp_path / "a")
    assert after.model_copy(
        update={"site": after.site.model_copy(update={"coordinator_key": None})}
    ) == before.model_copy(
        update={"site": before.site.model_copy(update={"coordinator_key": None})}
    )


def test_prepare_uses_the_own_sites_and_their_base(tmp_path: Path) -> None:
    a = _bank(tmp_path / "a", "bank-a")
    table_source(tmp_path / "whole", people=60)
    shutil.copytree(tmp_path / "a" / "model", tmp_path / "whole" / "model")
    scenario = load_scenario(
        str(
            _scenario(
                tmp_path,
                sites=[{"id": "bank-a", "config": str(a)}],
                splits=[
                    {
                        "source": "whole/whole-bank.toml",
                        "sites": 2,
                        "prefix": "split",
                        "min_people": 10,
                        "behaviour": {"split-2": {"kind": "scaled", "factor": 5.0}},
                    }
                ],
            )
        )
    )
    seen: list[tuple[str, bool]] = []
    reports: list[SplitReport] = []
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    prepared = prepare(
        scenario,
        run_dir,
        data_dir,
        rounds=1,
        on_site=lambda *s: seen.append(s),
        on_split=reports.append,
    )

    task = "tabular-classification"
    assert prepared.federations[task].base_model == (tmp_path / "a" / "model").resolve()
    assert not (data_dir / "models").exists()  # no demo base was built
    assert [p.stem for p in prepared.site_configs[task]] == ["bank-a", "split-1", "split-2"]
    assert seen == [("bank-a", False), ("split-1", True), ("split-2", True)]
    assert [r.prefix for r in reports] == ["split"]
    behaviours = prepared.behaviours[task]
    assert behaviours[0] is None and behaviours[1] is None
    assert behaviours[2] is not None and behaviours[2].factor == 5.0
    for path in prepared.site_configs[task]:
        config = load_site_config(path)
        assert config.site.coordinator_key == (run_dir / "keys" / "coordinator.pub").resolve()
    existing = load_site_config(run_dir / "sites" / "bank-a.toml")
    assert existing.site.state_dir == (tmp_path / "a" / "state").resolve()  # its own state
    split_site = next(s for s in scenario.all_sites() if s.id == "split-1")
    assert isinstance(split_site, SplitSite) and scenario.task_for(split_site) == task


def test_an_infinite_alpha_is_refused_where_it_is_written(tmp_path: Path) -> None:
    """It passed, and the split later asked for a larger alpha ("less skew")."""
    table_source(tmp_path / "whole", people=40)
    split = {"source": "whole/whole-bank.toml", "sites": 2, "prefix": "bank"}
    problem = _problem(tmp_path, splits=[{**split, "mode": "dirichlet", "alpha": math.inf}])
    assert "splits.0.alpha" in problem
