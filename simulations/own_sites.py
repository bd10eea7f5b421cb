"""Scenario sites made of a researcher's own data rather than generated ones.

Two kinds, both described by ordinary site configs (the TOML a site operator writes):

- an **existing site** (``[[sites]]`` with ``config = "site.toml"``): its data, privacy
  budget and state are used as they are; nothing is generated;
- the sites of a **split** (``[[splits]]``): one real dataset, described by a *source*
  site config, partitioned by person across N simulated sites
  (:mod:`simulations.partition` writes their data and configs).

Their configs are loaded and checked when the scenario is validated, so a wrong path,
id or task is reported before any data is touched. Relative paths in a scenario are
taken from the scenario file's folder (the ``scenario_dir`` validation context).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from common.config import (
    SMALLEST_COHORT,
    DataKind,
    SiteConfig,
    SiteKind,
    StrictModel,
    data_kind,
    load_site_config,
    read_toml,
)
from common.errors import ConfigError
from common.identifiers import SiteId, is_site_id
from common.tasks import TASKS, model_fingerprint
from simulations.behaviour import SiteBehaviour

SCENARIO_DIR = "scenario_dir"
"""Validation context key: the folder relative paths in a scenario are taken from."""


def _absolute(path: Path, info: ValidationInfo) -> Path:
    """``path`` from the scenario file's folder (or the working directory without one)."""
    base = (info.context or {}).get(SCENARIO_DIR)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(os.path.abspath(path))


def load_own_config(path: Path, what: str) -> SiteConfig:
    """Load a researcher's site config as the site itself would, plus the checks a
    scenario needs: a known task whose kind of data the config describes."""
    try:
        config = load_site_config(path)
    except ConfigError as exc:
        raise ValueError(f"{what}: {exc}") from None
    task = config.site.task
    if task not in TASKS:
        raise ValueError(f"{what} {path}: site.task {task!r} is unknown; known: {TASKS.names()}")
    expected, found = TASKS.get(task).data_kind, data_kind(config.data)
    if expected != found:
        raise ValueError(
            f"{what} {path}: site.task {task!r} trains on {expected} data, but its [data] "
            f"describes {found} data"
        )
    return config


class ExistingSiteSpec(StrictModel):
    """An existing site: a site config whose data, budget and state are used as they
    are. Only its coordinator key changes in the run's copy (RUN_DIR/sites/<id>.toml),
    so the site accepts the artifact this run signs."""

    id: SiteId
    config: Path = Field(description="The site's TOML, relative to the scenario file.")
    behaviour: SiteBehaviour | None = Field(
        default=None, description="Fault injection for robustness studies; honest if unset."
    )
    _site: SiteConfig | None = PrivateAttr(default=None)

    @field_validator("config")
    @classmethod
    def _from_the_scenario(cls, value: Path, info: ValidationInfo) -> Path:
        return _absolute(value, info)

    @model_validator(mode="after")
    def _load(self) -> ExistingSiteSpec:
        config = load_own_config(self.config, f"site {self.id!r}: config")
        if config.site.id != self.id:
            raise ValueError(
                f"site {self.id!r}: {self.config} says site.id = {config.site.id!r}; the "
                "scenario's id and the config's must be the same"
            )
        self._site = config
        return self

    @property
    def site_config(self) -> SiteConfig:
        assert self._site is not None, "validated models always hold their config"
        return self._site

    @property
    def kind(self) -> SiteKind:
        return self.site_config.site.kind

    @property
    def task(self) -> str:
        return self.site_config.site.task

    @property
    def data_kind(self) -> DataKind:
        return TASKS.get(self.task).data_kind

    @property
    def base_model(self) -> Path:
        return self.site_config.site.base_model


def smallest_usable_site(min_cohort: int, holdout_fraction: float) -> int:
    """The fewest people a site needs to take part: its held-out split (made by person,
    ``round(fraction * people)`` held out) must leave at least ``min_cohort`` people on
    each side, or the site refuses to train or to report metrics."""
    people = 2 * min_cohort
    while True:
        held_out = round(holdout_fraction * people)
        if held_out >= min_cohort and people - held_out >= min_cohort:
            return people
        people += 1


class SplitSpec(StrictModel):
    """One real dataset split by person across ``sites`` simulated sites.

    ``source`` is a site config whose ``[data]`` describes the whole dataset; each
    simulated site gets that ``[data]`` with its own share, the source's base model,
    task, kind and policy, and the privacy budget given here or the source's.
    """

    source: Path = Field(description="Site config of the whole dataset, relative to the scenario.")
    sites: int = Field(ge=2, le=100, description="How many sites to split it across.")
    prefix: str = Field(description="Site ids are PREFIX-1 … PREFIX-N.")
    mode: Literal["iid", "dirichlet"] = Field(
        default="iid", description="'iid', or 'dirichlet' label skew (see alpha)."
    )
    alpha: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Dirichlet concentration (default 0.5): small is skewed.",
    )
    min_people: int | None = Field(
        default=None,
        ge=1,
        description="Fewest people per site; default: what the source's policy and held-out "
        "fraction need for a site to take part.",
    )
    epsilon: float | None = Field(default=None, gt=0, le=100, description="Default: source's.")
    delta: float | None = Field(default=None, gt=0, lt=1e-2, description="Default: source's.")
    behaviour: dict[SiteId, SiteBehaviour] = Field(
        default_factory=dict, description="Fault injection per split site id."
    )
    _source: SiteConfig | None = PrivateAttr(default=None)

    @field_validator("source")
    @classmethod
    def _from_the_scenario(cls, value: Path, info: ValidationInfo) -> Path:
        return _absolute(value, info)

    @model_validator(mode="after")
    def _consistent(self) -> SplitSpec:
        if not is_site_id(f"{self.prefix}-{self.sites}"):
            raise ValueError(
                f"prefix {self.prefix!r} does not make site ids such as "
                f"'{self.prefix}-{self.sites}' (lowercase letters, digits and '-')"
            )
        if self.alpha is not None and self.mode != "dirichlet":
            raise ValueError("alpha applies to mode = 'dirichlet' only")
        unknown = sorted(set(self.behaviour) - set(self.site_ids))
        if unknown:
            raise ValueError(f"behaviour names {unknown}, not sites of this split {self.site_ids}")
        self._source = load_own_config(self.source, f"split {self.prefix!r}: source")
        return self

    @property
    def site_ids(self) -> list[str]:
        return [f"{self.prefix}-{number}" for number in range(1, self.sites + 1)]

    @property
    def source_config(self) -> SiteConfig:
        assert self._source is not None, "validated models always hold their source"
        return self._source

    @property
    def task(self) -> str:
        return self.source_config.site.task

    @property
    def concentration(self) -> float:
        return 0.5 if self.alpha is None else self.alpha

    @property
    def people_per_site(self) -> int:
        """``min_people``, or the fewest people with which a site of the source's policy
        and held-out fraction takes part."""
        if self.min_people is not None:
            return self.min_people
        source = self.source_config
        cohort = max(source.policy.min_cohort, SMALLEST_COHORT)
        return smallest_usable_site(cohort, source.data.holdout_fraction)

    def parts(self) -> list[SplitSite]:
        source = self.source_config.site
        return [
            SplitSite(site_id, source.kind, source.task, self.behaviour.get(site_id), self, part)
            for part, site_id in enumerate(self.site_ids)
        ]


@dataclass(frozen=True)
class SplitSite:
    """One simulated site of a split: its share of the source's people."""

    id: str
    kind: SiteKind
    task: str
    behaviour: SiteBehaviour | None
    split: SplitSpec
    part: int

    @property
    def data_kind(self) -> DataKind:
        return TASKS.get(self.task).data_kind

    @property
    def base_model(self) -> Path:
        return self.split.source_config.site.base_model


OwnSite = ExistingSiteSpec | SplitSite


def own_base_model(task: str, sites: Sequence[OwnSite]) -> Path:
    """The one base model the own-data sites of ``task`` name, or a ConfigError.

    Sites may name it by different paths (each site has its own copy); they must hold
    the same model, byte for byte (:func:`model_fingerprint`), as a federation shares
    one frozen base. Models are hashed only when the paths differ.
    """
    by_path: dict[Path, list[str]] = {}
    for site in sites:
        if not site.base_model.is_dir():
            raise ConfigError(
                f"site {site.id}: site.base_model {site.base_model} is not a directory "
                "(a model saved with save_pretrained)"
            )
        by_path.setdefault(site.base_model, []).append(site.id)
    if not by_path:
        raise ConfigError(f"task {task!r} has no site of your own data to take a base from")
    paths = list(by_path)
    if len(paths) > 1:
        fingerprints = {path: model_fingerprint(path) for path in paths}
        if len(set(fingerprints.values())) > 1:
            groups = "; ".join(
                f"{', '.join(ids)}: {path} (sha256 {fingerprints[path][:12]}…)"
                for path, ids in by_path.items()
            )
            raise ConfigError(
                f"the sites of task {task!r} name different base models ({groups}); every "
                "site of a task must hold the same base model: point their site.base_model "
                "at copies of one model"
            )
    return paths[0]


_PATHS: tuple[tuple[str, str], ...] = (
    ("site", "state_dir"),
    ("site", "base_model"),
    ("site", "signing_key"),
    ("site", "artifact_dir"),
    ("data", "path"),
    ("connection", "ca_certificate"),
    ("connection", "node_key"),
)
"""Every path of a site config, all resolved by load_site_config from the file's folder."""


def write_run_copy(source: Path, target: Path, coordinator_key: Path) -> Path:
    """Copy a site config to ``target`` with the run's coordinator key pinned.

    Paths the original gives relative to its own folder (and ``state_dir``, which
    defaults to ``state`` there) are written absolute, as load_site_config resolved
    them, so the copy in another folder means the same data, state and model. The copy
    is checked to load as the original with only ``site.coordinator_key`` changed.
    """
    original = load_site_config(source)
    resolved = original.model_dump()
    document: dict[str, Any] = copy.deepcopy(read_toml(source))
    for table, key in _PATHS:
        values = resolved.get(table) or {}
        if values.get(key) is not None:
            document.setdefault(table, {})[key] = str(values[key])
    document.get("connection", {}).pop("coordinator_key", None)  # a bundle puts it there
    document["site"]["coordinator_key"] = str(coordinator_key)
    target.write_text(tomli_w.dumps(document))
    expected = original.model_copy(
        update={
            "site": original.site.model_copy(update={"coordinator_key": coordinator_key.resolve()})
        }
    )
    if load_site_config(target) != expected:
        raise ConfigError(f"{target}: the run's copy of {source} does not match it")
    return target
