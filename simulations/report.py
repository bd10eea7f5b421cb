"""The end of a simulation: summary.json with what only a simulation can see (each
site's own ledger and installed artifact); plots and tables are server.run_report's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.site import Site
from common.artifact import verify_artifact
from common.audit.review import COORDINATOR_PUBLIC_KEY
from common.config import load_site_config
from common.errors import ArtifactError
from common.signing import load_public_key
from server.run_report import (
    read_result,
    site_entry,
    task_entry,
    verify_released_artifact,
    write_summary,
)
from simulations.scenario import Scenario


def build_summary(scenario: Scenario, run_dir: Path, wall_seconds: float) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    sites: dict[str, Any] = {}
    for task in scenario.tasks:
        result = read_result(run_dir, task)
        task_sites = [s.id for s in scenario.sites_of(task)]
        tasks[task] = task_entry(
            result,
            task_sites,
            artifact_summary(run_dir, task, result.get("artifact") or {}, scenario),
        )
        for spec in scenario.sites_of(task):
            site = Site(load_site_config(run_dir / "sites" / f"{spec.id}.toml"))
            sites[spec.id] = site_entry(
                result,
                spec.id,
                kind=spec.kind,
                task=task,
                # A local simulation may read each site's own ledger: the lifetime ε,
                # also for a site that refused every round of this run.
                epsilon_spent=site.open_ledger(site.load_data().dataset).epsilon(),
                epsilon_budget=site.config.privacy.epsilon,
                delta=site.config.privacy.delta,
                behaviour=spec.behaviour.model_dump() if spec.behaviour else None,
            )
    return write_summary(run_dir, scenario.name, wall_seconds, tasks, sites)


def artifact_summary(
    run_dir: Path, task: str, released: dict[str, Any], scenario: Scenario
) -> dict[str, Any]:
    """The coordinator's verdict on the task's artifact, and the sites where a verified
    copy of the same signed manifest is installed (a simulation can look there)."""
    summary, verified = verify_released_artifact(run_dir, task, released)
    if verified is None:
        return summary
    key = load_public_key(run_dir / COORDINATOR_PUBLIC_KEY)
    installed: list[str] = []
    for spec in scenario.sites_of(task):
        config = load_site_config(run_dir / "sites" / f"{spec.id}.toml")
        try:
            copy = verify_artifact(config.site.installed_artifacts / task, key)
        except ArtifactError:
            continue
        if copy.manifest_sha256 == verified.manifest_sha256:
            installed.append(spec.id)
    return {**summary, "installed": installed}
