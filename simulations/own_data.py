"""The preparation step for a researcher's own data: where each own site's config is,
after any split was made, and the run's copy of it.

Kept apart from :mod:`simulations.runner`, which prepares generated sites and demo
models, so that the runner only has to ask which sites are whose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from simulations.own_sites import ExistingSiteSpec, own_base_model, write_run_copy
from simulations.partition import SplitReport, prepare_split
from simulations.scenario import Scenario

__all__ = ["own_base_model", "prepare_own_sites", "write_run_copy"]


def prepare_own_sites(
    scenario: Scenario,
    data_dir: Path,
    on_site: Callable[[str, bool], None] | None = None,
    on_split: Callable[[SplitReport], None] | None = None,
) -> dict[str, Path]:
    """Site id -> the config of each own-data site: an existing site's own file, or the
    config a split wrote under ``data_dir`` (made now, or reused from an earlier run).

    ``on_site(id, made)`` follows each site (``made``: its data was written now; never
    for an existing site); ``on_split`` receives each split's summary.
    """
    configs: dict[str, Path] = {}
    for site in scenario.sites:
        if isinstance(site, ExistingSiteSpec):
            configs[site.id] = site.config
            if on_site is not None:
                on_site(site.id, False)
    for split in scenario.splits:
        result = prepare_split(split, scenario.seed, data_dir)
        configs.update(result.configs)
        if on_split is not None:
            on_split(result.report)
        if on_site is not None:
            for site_id in result.configs:
                on_site(site_id, result.report.resplit)
    return configs
