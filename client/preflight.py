"""One pre-flight for every way a site is asked to act: a round (train, evaluate), the
operator's ``fedlora site check`` and the daemon's start (``fedlora site run``).

Each check is a small function of the site's config and what it found; ``preflight``
runs the ones a purpose needs, cheapest first, and returns every problem as the error
it would raise. A round raises the first; the commands list them all. So ``site check``
cannot call a site ready that would refuse every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from client.planner import delta_problem
from client.policy import check_request
from common.config import DicomDataConfig, SiteConfig
from common.errors import ConfigError, DataError, FedloraError, PolicyError
from common.tasks.image_input import image_input

if TYPE_CHECKING:
    from client.data.source import LoadedData
    from client.site import Site
    from common.protocol import RoundRequest

Purpose = Literal["train", "evaluate", "check", "serve"]
"""What the site is about to do: a round's training or evaluation, the operator's
check, or the daemon's start (a deployment: client code and coordinator key too)."""


@dataclass
class Preflight:
    problems: list[FedloraError] = field(default_factory=list)
    data: LoadedData | None = None
    """The site's data, when it could be read."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_first(self) -> None:
        if self.problems:
            raise self.problems[0]


def cohort_problem(config: SiteConfig, persons: int, *, purpose: str) -> PolicyError | None:
    """Minimum cohort k: too few people make aggregates identifying."""
    k = config.policy.min_cohort
    if persons >= k:
        return None
    return PolicyError(
        f"site {config.site.id} refuses to {purpose}: {persons} people, "
        f"fewer than its minimum cohort of {k}"
    )


def classes_problem(config: SiteConfig, outputs: int) -> ConfigError | None:
    """The model must have one output per class the site's data names."""
    classes = len(config.data.classes)
    if outputs == classes:
        return None
    return ConfigError(
        f"site {config.site.id}: data.classes names {classes} classes but the base "
        f"model has {outputs} outputs (num_labels / id2label in its config.json)"
    )


def image_size_problem(config: SiteConfig) -> ConfigError | None:
    """A DICOM site's loader follows the base model's input size; a ``data.image_size``
    left in the config that says otherwise would mislead the operator. When the base
    model's input cannot be read, loading the data reports it (not repeated here)."""
    data = config.data
    if not isinstance(data, DicomDataConfig) or data.image_size is None:
        return None
    try:
        side = image_input(config.site.base_model).size
    except ConfigError:
        return None
    if side == data.image_size:
        return None
    return ConfigError(
        f"site {config.site.id}: data.image_size = {data.image_size} but the base model "
        f"takes {side} x {side} images: remove data.image_size, the loader follows the "
        "base model"
    )


def empty_classes_problem(data: LoadedData) -> DataError | None:
    empty = [name for name, count in data.all.label_counts().items() if count == 0]
    return DataError(f"no records for class(es) {', '.join(empty)}") if empty else None


def deployment_problems(config: SiteConfig) -> list[FedloraError]:
    """What a deployed site needs beyond its data: pinned client code and the key that
    checks the model the coordinator sends."""
    problems: list[FedloraError] = []
    if not config.policy.client_releases:
        problems.append(
            PolicyError(
                "policy.client_releases: no release pinned, so the site would refuse every "
                "run; review the coordinator's release and pin it (fedlora site release "
                "SITE.toml --release release.json)"
            )
        )
    if config.site.coordinator_key is None or not config.site.coordinator_key.is_file():
        problems.append(
            ConfigError(
                "site.coordinator_key: the coordinator's public key (coordinator.pub from "
                "the bundle) is needed to check the model it sends"
            )
        )
    return problems


def preflight(site: Site, purpose: Purpose, request: RoundRequest | None = None) -> Preflight:
    """Every reason the site would refuse to act for ``purpose``. A round's request is
    checked first (before any data is read); a round's data errors propagate, the
    commands' are listed."""
    config = site.config
    result = Preflight()
    round_ = purpose in ("train", "evaluate")
    if request is not None:
        try:
            check_request(config, request, site.models.fingerprint)
        except PolicyError as exc:
            result.problems.append(exc)
            if round_:
                return result
    if not round_:
        if not (config.site.base_model / "config.json").is_file():
            result.problems.append(
                ConfigError("site.base_model: no model saved with save_pretrained there")
            )
        else:
            _add(result, _outputs_problem(site))
            _add(result, image_size_problem(config))
    try:
        data = result.data = site.data.load()
    except (DataError, ConfigError, OSError) as exc:  # ConfigError: a text tokenizer
        if round_:
            raise
        result.problems.append(exc if isinstance(exc, FedloraError) else DataError(str(exc)))
        data = None
    if data is not None:
        _data_problems(site, purpose, data, result)
    if purpose == "serve":
        result.problems.extend(deployment_problems(config))
    return result


def _outputs_problem(site: Site) -> FedloraError | None:
    try:
        return classes_problem(site.config, site.models.outputs())
    except ConfigError as exc:
        return exc


def _data_problems(site: Site, purpose: Purpose, data: LoadedData, result: Preflight) -> None:
    config = site.config
    if purpose != "evaluate":
        _add(result, cohort_problem(config, data.train.persons, purpose="train"))
    if purpose != "train":
        _add(result, cohort_problem(config, data.holdout.persons, purpose="report metrics"))
    if purpose in ("check", "serve"):
        _add(result, empty_classes_problem(data))
    if purpose != "evaluate":
        problem = delta_problem(site.site_id, config.privacy.delta, data.train.persons)
        _add(result, PolicyError(problem) if problem else None)
    if purpose in ("check", "serve"):
        try:
            site.open_ledger(data.dataset)
        except FedloraError as exc:
            result.problems.append(exc)


def _add(result: Preflight, problem: FedloraError | None) -> None:
    if problem is not None:
        result.problems.append(problem)
