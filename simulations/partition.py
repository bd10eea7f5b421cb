"""Split one real dataset across simulated sites, by person (a scenario's ``[[splits]]``).

**How.** The source's records are read as the site's loader reads them
(:mod:`simulations.split_sources`): whose each record is, and its class. The records are
grouped into people; each person's class is their majority class (ties: the earliest
record's). A ``datasets.Dataset`` with *one row per person* (a person number and the
class index) is then cut with flwr-datasets' partitioners:

- ``iid``: the rows are shuffled with the split's seed, and ``IidPartitioner`` cuts them
  into ``sites`` contiguous shards of equal size (±1); it does not shuffle by itself.
- ``dirichlet``: ``DirichletPartitioner`` draws, for every class, the sites' shares of
  that class's people from Dir(α) (small α: each site holds mostly one class). It
  redraws when a site gets fewer than ``min_people`` people, up to 10 times; when even
  that fails, the split stops with a ConfigError saying what to change.

Every record of a person then goes to the person's site, and each site's share is
written in the source's own format under ``DATA_DIR/sites/<id>/data``, with an ordinary
site config beside it (``DATA_DIR/sites/<id>/site.toml``).

**Why.** The privacy unit is the person: DP-SGD at each site bounds what one *person*
contributes, and the site's ledger accounts for that person. Cutting the records
instead would put one patient's scans at two sites, each accounting for them
separately, and let evaluation hold out a person whose other scans were trained on.
Hence one row per person, the only thing the partitioners see. flwr-datasets'
partitioners are the ones Flower's baselines use, so a skew at a given α matches what
published federated results mean by it. The seed comes from the scenario's seed and the
split's prefix: the same scenario gives the same split, another seed another one.

Records without a person id, and people without any usable label, are left out (their
site would reject them anyway) and counted. A source without a person column counts each
record as one person, and the summary says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from client.data import dataset_fingerprint
from common.config import load_site_config, read_toml
from common.errors import ConfigError
from simulations.own_sites import SplitSpec
from simulations.split_sources import Records, source_for

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

logger = logging.getLogger(__name__)

SPLIT_VERSION = 1  # bump when the same settings would split differently
SPLITS_DIR = "splits"
"""DATA_DIR/splits/<prefix>.json: what each split was made from (and its summary)."""
NO_LABEL = "(no usable label)"


@dataclass
class SiteShare:
    """What one site of a split holds: counts only, never an identifier."""

    id: str
    people: int = 0
    records: int = 0
    people_per_class: dict[str, int] = field(default_factory=dict)
    records_per_class: dict[str, int] = field(default_factory=dict)


@dataclass
class SplitReport:
    prefix: str
    mode: str
    alpha: float | None
    record_is_person: bool
    """True when the source names no person: each record counted as one person."""
    shares: list[SiteShare]
    left_out: dict[str, int]
    """Reason -> how many records were left out of every site."""
    resplit: bool = True
    """False when an earlier run's split was reused."""


@dataclass(frozen=True)
class SplitResult:
    configs: dict[str, Path]
    """Site id -> its site config (DATA_DIR/sites/<id>/site.toml)."""
    report: SplitReport


def split_seed(scenario_seed: int, prefix: str) -> int:
    """The split's seed: from the scenario's seed and the split's prefix (32 bits, as
    ``Dataset.shuffle`` takes)."""
    digest = hashlib.sha256(f"fedlora-split:{scenario_seed}:{prefix}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def people_of(records: Records) -> tuple[list[list[int]], list[str | None]]:
    """Each person's records (by person number) and class: their majority usable label,
    ties to the earliest record's; None when no record of theirs has a usable label."""
    rows: dict[int, list[int]] = {}
    for row, person in enumerate(records.persons):
        if person is not None:
            rows.setdefault(person, []).append(row)
    people = [rows[person] for person in sorted(rows)]
    labels: list[str | None] = []
    for person_rows in people:
        counts = Counter(records.labels[r] for r in person_rows if records.labels[r] is not None)
        labels.append(counts.most_common(1)[0][0] if counts else None)
    return people, labels


def partition_people(
    labels: Sequence[int], sites: int, mode: str, alpha: float, min_people: int, seed: int
) -> list[list[int]]:
    """Cut people (one per entry of ``labels``, their class index) into ``sites`` groups
    of at least ``min_people``; returns each site's people (positions, sorted).

    The partitioners are imported here: ``datasets`` takes a second to import, and
    every ``fedlora`` command loads this module.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    people = len(labels)
    if people < sites * min_people:
        raise ConfigError(
            f"{people} people cannot give {sites} sites at least {min_people} people each "
            f"(that needs {sites * min_people}): split across fewer sites, or set min_people "
            "lower (sites under their policy's minimum cohort refuse to train)"
        )
    table = Dataset.from_dict({"person": list(range(people)), "label": list(labels)})
    partitioner: Partitioner
    if mode == "iid":
        partitioner = IidPartitioner(num_partitions=sites)
        partitioner.dataset = table.shuffle(seed=seed, keep_in_memory=True)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=sites,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_people,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = table
    with warnings.catch_warnings(record=True) as redraws:
        warnings.simplefilter("always")
        try:
            parts = [sorted(partitioner.load_partition(i)["person"]) for i in range(sites)]
        except ValueError:
            raise ConfigError(
                f"a Dirichlet split with alpha = {alpha} gave some site fewer than "
                f"{min_people} people in 11 draws: raise alpha (less skew), split across "
                "fewer sites, or set min_people lower"
            ) from None
    if redraws:
        logger.info("Dirichlet split: %d redraws to give every site enough people", len(redraws))
    return parts


def _marker(split: SplitSpec, seed: int) -> dict[str, Any]:
    """Everything the split's data depends on (not its privacy budget or faults)."""
    source = split.source_config
    return {
        "version": SPLIT_VERSION,
        "seed": seed,
        "sites": split.sites,
        "mode": split.mode,
        "alpha": split.concentration if split.mode == "dirichlet" else None,
        "min_people": split.people_per_site,
        "data": source.data.model_dump(mode="json"),
        "content": dataset_fingerprint(source.data.path),
    }


def _shares(
    split: SplitSpec,
    records: Records,
    people: list[list[int]],
    person_labels: list[str | None],
    groups: list[list[int]],
) -> tuple[list[list[int]], list[SiteShare]]:
    """Each site's record rows (in source order) and its counts."""
    classes = split.source_config.data.classes
    rows_per_site: list[list[int]] = []
    shares: list[SiteShare] = []
    for site_id, group in zip(split.site_ids, groups, strict=True):
        share = SiteShare(
            site_id,
            people_per_class=dict.fromkeys(classes, 0),
            records_per_class=dict.fromkeys(classes, 0),
        )
        rows = sorted(row for person in group for row in people[person])
        for person in group:
            label = person_labels[person]
            assert label is not None, "only people with a usable label are split"
            share.people_per_class[label] += 1
        for row in rows:
            name = records.labels[row] or NO_LABEL
            share.records_per_class[name] = share.records_per_class.get(name, 0) + 1
        share.people, share.records = len(group), len(rows)
        rows_per_site.append(rows)
        shares.append(share)
    return rows_per_site, shares


def _left_out(
    records: Records, people: list[list[int]], labels: list[str | None]
) -> dict[str, int]:
    no_person = sum(person is None for person in records.persons)
    no_label = sum(len(rows) for rows, label in zip(people, labels, strict=True) if label is None)
    reasons = {
        "records without a person id": no_person,
        "records of people without a usable label": no_label,
    }
    return {reason: count for reason, count in reasons.items() if count}


def _split_data(split: SplitSpec, seed: int, data_dir: Path) -> SplitReport:
    """Read the source, partition its people, write every site's data."""
    source = source_for(split.source_config.data)
    records = source.records()
    people, labels = people_of(records)
    eligible = [index for index, label in enumerate(labels) if label is not None]
    classes = split.source_config.data.classes
    groups = partition_people(
        [classes.index(label) for label in labels if label is not None],
        split.sites,
        split.mode,
        split.concentration,
        split.people_per_site,
        seed,
    )
    groups = [[eligible[position] for position in group] for group in groups]
    rows_per_site, shares = _shares(split, records, people, labels, groups)
    for site_id, rows in zip(split.site_ids, rows_per_site, strict=True):
        folder = data_dir / "sites" / site_id / "data"
        shutil.rmtree(folder, ignore_errors=True)  # the site's state/ is kept
        folder.mkdir(parents=True)
        source.write(rows, folder)
    return SplitReport(
        prefix=split.prefix,
        mode=split.mode,
        alpha=split.concentration if split.mode == "dirichlet" else None,
        record_is_person=records.record_is_person,
        shares=shares,
        left_out=_left_out(records, people, labels),
    )


def _data_path(split: SplitSpec, site_dir: Path) -> Path:
    """Where a site's share of the source lies: the data folder itself for DICOM, the
    file of the source's name in it otherwise (as :mod:`split_sources` writes them)."""
    data = split.source_config.data
    folder = site_dir / "data"
    return folder if data.format == "dicom" else folder / data.path.name


def _site_document(split: SplitSpec, site_id: str, site_dir: Path) -> dict[str, Any]:
    """The site config of one split site: the source's [data] (with this site's share
    as its path), [privacy] (with the split's epsilon and delta) and [policy]; its own
    state folder; no signing key, artifact folder or connection of the source's."""
    raw = read_toml(split.source)
    source = split.source_config.site
    privacy = dict(raw.get("privacy", {}))
    for name, value in (("epsilon", split.epsilon), ("delta", split.delta)):
        if value is not None:
            privacy[name] = value
    document: dict[str, Any] = {
        "site": {
            "id": site_id,
            "kind": source.kind,
            "task": source.task,
            "base_model": str(source.base_model),
            "state_dir": str(site_dir / "state"),
        },
        "privacy": privacy,
        "data": {**raw["data"], "path": str(_data_path(split, site_dir))},
    }
    if "policy" in raw:
        document["policy"] = raw["policy"]
    return document


def prepare_split(split: SplitSpec, scenario_seed: int, data_dir: Path) -> SplitResult:
    """Split ``split``'s source across its sites, or reuse the split an earlier run of
    the same scenario made (same source content and settings); write the site configs.

    A re-split is new data to each site: a site that trained before refuses it until
    an operator accepts it (``fedlora site budget --accept-new-data``), as the same
    people already spent budget.
    """
    seed = split_seed(scenario_seed, split.prefix)
    marker = _marker(split, seed)
    marker_path = data_dir / SPLITS_DIR / f"{split.prefix}.json"
    site_dirs = {site_id: data_dir / "sites" / site_id for site_id in split.site_ids}
    saved = _saved(marker_path)
    if saved.get("marker") == marker and all(
        _data_path(split, site_dir).exists() for site_dir in site_dirs.values()
    ):
        report = _report_from(saved["report"])
    else:
        marker_path.unlink(missing_ok=True)  # an interrupted split is made again
        report = _split_data(split, seed, data_dir)
        marker_path.parent.mkdir(parents=True, exist_ok=True)
        marker_path.write_text(json.dumps({"marker": marker, "report": asdict(report)}, indent=2))
    configs: dict[str, Path] = {}
    for site_id, site_dir in site_dirs.items():
        path = site_dir / "site.toml"
        path.write_text(tomli_w.dumps(_site_document(split, site_id, site_dir)))
        load_site_config(path)  # what we wrote must validate like an operator's file
        configs[site_id] = path
    _log(report)
    return SplitResult(configs, report)


def _saved(marker_path: Path) -> dict[str, Any]:
    """The earlier split's marker; empty (split again) when missing or unreadable."""
    try:
        saved = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _report_from(saved: dict[str, Any]) -> SplitReport:
    shares = [SiteShare(**share) for share in saved["shares"]]
    return SplitReport(**{**saved, "shares": shares, "resplit": False})


def _log(report: SplitReport) -> None:
    verb = "split" if report.resplit else "reused split"
    for share in report.shares:
        logger.info(
            "%s %s: %s has %d people, %d records (%s)",
            verb,
            report.prefix,
            share.id,
            share.people,
            share.records,
            ", ".join(f"{name} {count}" for name, count in share.people_per_class.items()),
        )
