"""Splitting one real dataset across simulated sites (simulations/partition.py): by
person, reproducible from the seed, IID or Dirichlet-skewed, with clear refusals."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from client.data.dicom import load_dicom_dataset
from client.data.tabular import load_tabular_dataset
from common.config import DicomDataConfig, TabularDataConfig, load_site_config
from common.errors import ConfigError, DataError
from common.tasks.image_input import ImageInput
from simulations.own_sites import SCENARIO_DIR, SplitSpec, smallest_usable_site
from simulations.partition import NO_LABEL, partition_people, prepare_split, split_seed
from tests.unit.simulations.sources import (
    IMAGE_CLASSES,
    dicom_source,
    parquet_source,
    people_in,
    table_source,
    text_source,
)

SOURCES: dict[str, Callable[[Path], Path]] = {
    "table": table_source,
    "parquet": parquet_source,
    "text": text_source,
    "dicom": dicom_source,
}


def _split(source: Path, **settings: Any) -> SplitSpec:
    values = {"source": str(source), "sites": 3, "prefix": "site", "min_people": 5, **settings}
    return SplitSpec.model_validate(values)


def _contents(data_dir: Path, ids: list[str]) -> dict[str, str]:
    """A digest of every file each site's data folder holds (relative names and bytes)."""
    digests = {}
    for site_id in ids:
        folder = data_dir / "sites" / site_id / "data"
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        digests[site_id] = digest.hexdigest()
    return digests


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_each_mode_splits_each_kind_by_person(kind: str, mode: str, tmp_path: Path) -> None:
    source = SOURCES[kind](tmp_path / "source")
    split = _split(source, mode=mode)
    whole = load_site_config(source)
    all_people = Counter(people_in(whole.data))

    result = prepare_split(split, scenario_seed=1, data_dir=tmp_path / "data")

    seen: dict[str, str] = {}
    records = 0
    for site_id, path in result.configs.items():
        config = load_site_config(path)  # an ordinary site config
        assert path == tmp_path / "data" / "sites" / site_id / "site.toml"
        assert config.site.id == site_id and config.site.task == whole.site.task
        assert config.site.state_dir == (tmp_path / "data" / "sites" / site_id / "state").resolve()
        assert config.data.path.is_relative_to(tmp_path / "data" / "sites" / site_id / "data")
        assert config.data.format == whole.data.format
        people = people_in(config.data)
        for person in set(people):
            assert seen.setdefault(person, site_id) == site_id, "a person at two sites"
            assert people.count(person) == all_people[person], "a person's records split"
        records += len(people)
        share = next(s for s in result.report.shares if s.id == site_id)
        assert (share.people, share.records) == (len(set(people)), len(people))
        assert sum(share.people_per_class.values()) == share.people
        assert share.people >= 5
    assert set(seen) == set(all_people) and records == sum(all_people.values())


def test_dicom_class_folders_are_kept(tmp_path: Path) -> None:
    source = dicom_source(tmp_path / "source", labels="folders")
    result = prepare_split(_split(source, sites=2), scenario_seed=0, data_dir=tmp_path / "data")
    for path in result.configs.values():
        data = load_site_config(path).data
        assert isinstance(data, DicomDataConfig) and data.labels == "folders"
        assert all((data.path / name).is_dir() for name in IMAGE_CLASSES)
        assert not (data.path / "labels.csv").exists()
        for image in data.path.rglob("*.dcm"):  # hard links (or copies) of the source files
            original = tmp_path / "source" / "images" / image.relative_to(data.path)
            assert image.read_bytes() == original.read_bytes()


def test_a_split_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=150)
    split = _split(source, mode="dirichlet", alpha=1.0)
    ids = split.site_ids
    prepare_split(split, scenario_seed=4, data_dir=tmp_path / "one")
    prepare_split(split, scenario_seed=4, data_dir=tmp_path / "two")
    prepare_split(split, scenario_seed=5, data_dir=tmp_path / "three")
    assert _contents(tmp_path / "one", ids) == _contents(tmp_path / "two", ids)
    assert _contents(tmp_path / "one", ids) != _contents(tmp_path / "three", ids)
    assert split_seed(4, "site") != split_seed(5, "site")
    assert split_seed(4, "site") != split_seed(4, "other")


def _skew(groups: list[list[int]], labels: np.ndarray) -> float:
    """Mean over sites of |share of class 1 at the site - share of class 1 overall|."""
    overall = labels.mean()
    return float(np.mean([abs(labels[group].mean() - overall) for group in groups]))


def test_dirichlet_skews_labels_more_than_iid() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1], 300))
    skew: dict[str, list[float]] = {"iid": [], "dirichlet-0.1": [], "dirichlet-100": []}
    for seed in range(5):
        for name, mode, alpha in (
            ("iid", "iid", 0.5),
            ("dirichlet-0.1", "dirichlet", 0.1),
            ("dirichlet-100", "dirichlet", 100.0),
        ):
            groups = partition_people(list(labels), 4, mode, alpha, min_people=10, seed=seed)
            assert sorted(p for g in groups for p in g) == list(range(600))  # all, once
            skew[name].append(_skew(groups, labels))
    mean = {name: float(np.mean(values)) for name, values in skew.items()}
    assert mean["dirichlet-0.1"] > mean["dirichlet-100"]
    assert mean["dirichlet-0.1"] > mean["iid"]


def test_iid_sites_are_the_same_size() -> None:
    groups = partition_people([0, 1] * 50, 3, "iid", 0.5, min_people=1, seed=7)
    assert sorted(len(group) for group in groups) == [33, 33, 34]


def test_a_majority_label_and_the_left_out_records_are_counted(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=60, missing_ids=4)
    result = prepare_split(_split(source, sites=2), scenario_seed=0, data_dir=tmp_path / "data")
    assert result.report.left_out == {"records without a person id": 4}
    assert not result.report.record_is_person
    # Minority rows (a person's third or fourth row with the other label) travel along.
    total = Counter[str]()
    for share in result.report.shares:
        total.update(share.records_per_class)
    assert sum(total.values()) + 4 == len(
        (tmp_path / "source" / "whole.csv").read_text().splitlines()[1:]
    )
    assert NO_LABEL not in total


def test_without_a_person_column_each_row_is_a_person(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=40, person_column=None)
    result = prepare_split(_split(source, sites=2), scenario_seed=0, data_dir=tmp_path / "data")
    assert result.report.record_is_person
    rows = len((tmp_path / "source" / "whole.csv").read_text().splitlines()) - 1
    assert sum(share.people for share in result.report.shares) == rows


def test_the_split_is_reused_until_its_source_or_settings_change(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=90)
    data_dir = tmp_path / "data"
    first = prepare_split(_split(source), scenario_seed=0, data_dir=data_dir)
    contents = _contents(data_dir, list(first.configs))
    state = data_dir / "sites" / "site-1" / "state"
    state.mkdir()
    (state / "kept").write_text("ledger")

    again = prepare_split(_split(source, epsilon=3.0), scenario_seed=0, data_dir=data_dir)
    assert first.report.resplit and not again.report.resplit
    assert again.report.shares == first.report.shares
    assert load_site_config(again.configs["site-1"]).privacy.epsilon == 3.0  # configs rewritten
    assert _contents(data_dir, list(again.configs)) == contents

    resplit = prepare_split(_split(source, mode="dirichlet"), scenario_seed=0, data_dir=data_dir)
    assert resplit.report.resplit and resplit.report.mode == "dirichlet"
    assert (state / "kept").read_text() == "ledger"  # the site's state survives a re-split

    table_source(tmp_path / "source", people=90, seed=1)  # the same file, other content
    changed = prepare_split(_split(source, mode="dirichlet"), scenario_seed=0, data_dir=data_dir)
    assert changed.report.resplit


def test_no_identifier_is_written_beside_the_data(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=50)
    data_dir = tmp_path / "data"
    prepare_split(_split(source, sites=2), scenario_seed=0, data_dir=data_dir)
    for path in [*data_dir.glob("splits/*.json"), *data_dir.glob("sites/*/site.toml")]:
        assert "C000" not in path.read_text(), path
    json.loads((data_dir / "splits" / "site.json").read_text())  # the marker is JSON


def test_the_split_keeps_the_source_settings_and_takes_its_own_budget(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=60)
    split = _split(source, sites=2, epsilon=2.5, delta=1e-6)
    config = load_site_config(prepare_split(split, 0, tmp_path / "data").configs["site-2"])
    whole = load_site_config(source)
    assert (config.privacy.epsilon, config.privacy.delta) == (2.5, 1e-6)
    assert config.privacy.accountant == whole.privacy.accountant
    assert config.site.base_model == whole.site.base_model
    assert config.data.model_dump(exclude={"path"}) == whole.data.model_dump(exclude={"path"})
    assert config.site.coordinator_key is None and config.site.signing_key is None


def test_too_few_people_for_the_sites_is_refused(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=30)
    with pytest.raises(ConfigError, match="30 people cannot give 3 sites at least 20"):
        prepare_split(_split(source, min_people=20), 0, tmp_path / "data")


def test_the_default_minimum_is_what_a_site_needs_to_take_part(tmp_path: Path) -> None:
    # 20 people on each side of a 20 % held-out split.
    assert smallest_usable_site(20, 0.2) == 98
    source = table_source(tmp_path / "source", people=200)
    split = _split(source, min_people=None)
    assert split.people_per_site == 98
    with pytest.raises(ConfigError, match="200 people cannot give 3 sites at least 98"):
        prepare_split(split, 0, tmp_path / "data")


def test_an_impossible_dirichlet_split_says_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="raise alpha"):
        partition_people([0] * 50 + [1] * 50, 4, "dirichlet", 0.01, min_people=24, seed=0)


def test_an_unknown_person_column_is_named(tmp_path: Path) -> None:
    source = table_source(tmp_path / "source", people=30, person_column="patient_no")
    with pytest.raises(DataError, match=r"'patient_no' declared in data\.person_column is missing"):
        prepare_split(_split(source, sites=2), 0, tmp_path / "data")


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"alpha": 0.3}, "alpha applies to mode = 'dirichlet' only"),
        ({"prefix": "North Hospital"}, "does not make site ids"),
        ({"behaviour": {"site-9": {"kind": "nan"}}}, "not sites of this split"),
        ({"sites": 1}, "greater than or equal to 2"),
        ({"mode": "shards"}, "'iid' or 'dirichlet'"),
    ],
)
def test_split_settings_are_checked(tmp_path: Path, settings: dict[str, Any], problem: str) -> None:
    source = table_source(tmp_path / "source", people=30)
    with pytest.raises(ValidationError, match=problem):
        _split(source, **settings)


def test_a_split_source_is_found_from_the_scenario_folder(tmp_path: Path) -> None:
    table_source(tmp_path / "study" / "source", people=30)
    split = SplitSpec.model_validate(
        {"source": "source/whole-bank.toml", "sites": 2, "prefix": "bank"},
        context={SCENARIO_DIR: tmp_path / "study"},
    )
    assert split.source == tmp_path / "study" / "source" / "whole-bank.toml"
    with pytest.raises(ValidationError, match="file not found"):
        SplitSpec.model_validate({"source": "source/whole-bank.toml", "sites": 2, "prefix": "b"})


@pytest.mark.parametrize("kind", ["table", "parquet", "dicom"])
def test_the_site_loaders_count_the_people_the_split_counted(kind: str, tmp_path: Path) -> None:
    """Each share is ordinary site data: the site's own loader reads it, and finds the
    people and records the split's summary gives."""
    source = SOURCES[kind](tmp_path / "source")
    result = prepare_split(_split(source, sites=2), scenario_seed=0, data_dir=tmp_path / "data")
    for share in result.report.shares:
        config = load_site_config(result.configs[share.id]).data
        if isinstance(config, DicomDataConfig):
            image = ImageInput(size=8, channels=1, mean=(0.5,), std=(0.5,))
            data = load_dicom_dataset(config, b"salt", image)
        else:
            assert isinstance(config, TabularDataConfig)
            data, _ = load_tabular_dataset(config, b"salt")
        assert (data.persons, data.accepted) == (share.people, share.records)
        assert data.label_counts() == share.records_per_class
