"""Scenarios: which sites exist (generated synthetic ones, existing site configs of a
researcher's own data, or one real dataset split across simulated sites), how much data
each generated site holds, how skewed it is, and how each task's federation is run.
Built-in scenarios live next to this file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from common.config import (
    MAX_DELTA,
    MAX_EPSILON_BUDGET,
    DataKind,
    FederationSettings,
    SiteKind,
    StrictModel,
    format_validation_error,
    read_toml,
)
from common.errors import ConfigError
from common.identifiers import SiteId
from common.tasks import TASKS
from simulations.behaviour import BehaviourKind, SiteBehaviour
from simulations.own_sites import (
    SCENARIO_DIR,
    ExistingSiteSpec,
    OwnSite,
    SplitSite,
    SplitSpec,
)

__all__ = [
    "AnySite",
    "BankSpec",
    "BehaviourKind",
    "ExistingSiteSpec",
    "GeneratedSite",
    "HospitalSpec",
    "Scenario",
    "SiteBehaviour",
    "SplitSite",
    "SplitSpec",
    "TextSiteSpec",
    "builtin_scenarios",
    "load_scenario",
]


class HospitalSpec(StrictModel):
    data_kind: ClassVar[DataKind] = "dicom"
    id: SiteId
    kind: Literal["hospital"]
    patients: int = Field(ge=1, description="Patients; each has 1-3 images.")
    class_weights: list[float] = Field(
        default=[0.5, 0.5], description="Label mix (non-IID skew across hospitals)."
    )
    modality: Literal["CT", "MR", "CR"] = "CT"
    corrupt_files: bool = Field(default=False, description="Add a few unusable files.")
    epsilon: float = Field(default=8.0, gt=0, le=MAX_EPSILON_BUDGET)
    delta: float = Field(default=1e-5, gt=0, lt=MAX_DELTA)
    behaviour: SiteBehaviour | None = Field(
        default=None, description="Fault injection for robustness studies; honest if unset."
    )


class BankSpec(StrictModel):
    data_kind: ClassVar[DataKind] = "table"
    id: SiteId
    kind: Literal["bank"]
    customers: int = Field(ge=1)
    default_rate: float = Field(default=0.4, gt=0, lt=1, description="Label skew.")
    format: Literal["csv", "parquet"] = "csv"
    epsilon: float = Field(default=8.0, gt=0, le=MAX_EPSILON_BUDGET)
    delta: float = Field(default=1e-5, gt=0, lt=MAX_DELTA)
    behaviour: SiteBehaviour | None = Field(
        default=None, description="Fault injection for robustness studies; honest if unset."
    )


class TextSiteSpec(StrictModel):
    """A hospital with radiology reports or a bank with customer narratives (text task)."""

    data_kind: ClassVar[DataKind] = "text"
    id: SiteId
    kind: SiteKind
    data: Literal["text"]
    people: int = Field(ge=1, description="Patients or customers; each has 1-3 texts.")
    urgent_rate: float = Field(default=0.4, gt=0, lt=1, description="Label skew.")
    format: Literal["csv", "parquet", "jsonl"] = "csv"
    empty_texts: int = Field(default=0, ge=0, description="Blank records to add.")
    overlong_texts: int = Field(default=0, ge=0, description="Runaway long records to add.")
    epsilon: float = Field(default=8.0, gt=0, le=MAX_EPSILON_BUDGET)
    delta: float = Field(default=1e-5, gt=0, lt=MAX_DELTA)
    behaviour: SiteBehaviour | None = Field(
        default=None, description="Fault injection for robustness studies; honest if unset."
    )


def _site_tag(value: Any) -> str | None:
    """``config = …`` is an existing site; ``data = "text"`` makes a text site;
    otherwise ``kind`` decides."""
    if isinstance(value, dict):
        if "config" in value:
            return "existing"
        return "text" if value.get("data") == "text" else value.get("kind")
    if isinstance(value, ExistingSiteSpec):
        return "existing"
    return "text" if isinstance(value, TextSiteSpec) else getattr(value, "kind", None)


SiteSpec = Annotated[
    Annotated[HospitalSpec, Tag("hospital")]
    | Annotated[BankSpec, Tag("bank")]
    | Annotated[TextSiteSpec, Tag("text")]
    | Annotated[ExistingSiteSpec, Tag("existing")],
    Discriminator(
        _site_tag,
        custom_error_type="site_kind",
        custom_error_message="kind must be 'hospital' or 'bank' (add data = \"text\" for a "
        'site of texts), or give config = "site.toml" for an existing site',
    ),
]
GeneratedSite = HospitalSpec | BankSpec | TextSiteSpec
"""A site whose synthetic data the simulation writes."""
AnySite = GeneratedSite | OwnSite
"""Any site of a scenario: generated, existing, or one part of a split."""


def site_data_kind(site: AnySite) -> DataKind:
    return site.data_kind


class TaskRunSpec(FederationSettings):
    """A FederationConfig without the parts the simulation supplies (task, base model,
    seed)."""


class ImagingBackbone(StrictModel):
    """The shape of the demo ViT every hospital shares.

    The default is the smallest ViT whose int8 artifact is worth shipping: at this width
    linear layers dominate, so dynamic quantization shrinks it ~4x and speeds it up;
    narrower models are all overhead (see benchmarks/artifact.py).
    """

    hidden_size: int = Field(default=256, ge=8, description="Width of the ViT.")
    layers: int = Field(default=4, ge=1, le=24, description="Encoder layers.")
    patch_size: int = Field(default=8, ge=1, description="Side of a patch, in pixels.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ImagingBackbone:
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (heads)")
        return self


class TextBackbone(StrictModel):
    """The demo decoder every text site shares: which architecture, and how small."""

    architecture: Literal["deepseek_v3", "qwen2", "llama"] = "qwen2"
    hidden_size: int = Field(default=64, ge=16, description="Width (a multiple of 8).")
    layers: int = Field(default=2, ge=1, le=24, description="Decoder layers.")
    max_tokens: int = Field(default=64, ge=8, le=2048, description="Tokens kept per text.")

    @model_validator(mode="after")
    def _width(self) -> TextBackbone:
        if self.hidden_size % 8:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 8")
        return self


SCENARIO_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""One path component: no separator, not empty, not "." or ".." (the first character)."""


class Scenario(StrictModel):
    name: str = Field(
        pattern=SCENARIO_NAME_PATTERN,
        description="Names the run directory (runs/<name>-<time>) and the data folder "
        "(runs/data/<name>): letters, digits, '.', '_' and '-', so it stays a file name.",
    )
    description: str = ""
    seed: int = Field(default=0, ge=0, lt=2**63)
    image_size: int = Field(default=32, ge=8)
    imaging_backbone: ImagingBackbone = Field(default_factory=ImagingBackbone)
    text_backbone: TextBackbone = Field(default_factory=TextBackbone)
    tasks: dict[str, TaskRunSpec]
    sites: list[SiteSpec] = Field(default_factory=list)
    splits: list[SplitSpec] = Field(
        default_factory=list, description="Real datasets split by person across sites."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if not self.sites and not self.splits:
            raise ValueError("a scenario needs at least one entry in [[sites]] or [[splits]]")
        ids = [site.id for site in self.all_sites()]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"site ids must be unique; repeated: {duplicates}")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {TASKS.names()}")
        for kind in {site_data_kind(site) for site in self.generated_sites()}:
            if not any(TASKS.get(task).data_kind == kind for task in self.tasks):
                raise ValueError(f"sites with {kind} data have no task in [tasks]")
        self._check_own_sites()
        if self.image_size % self.imaging_backbone.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of "
                f"imaging_backbone.patch_size {self.imaging_backbone.patch_size}"
            )
        return self

    def _check_own_sites(self) -> None:
        """Own-data sites serve a task of [tasks], and never beside generated ones: those
        train on the demo base model, own data on the base its site configs name."""
        for site in self.own_sites():
            if site.task not in self.tasks:
                raise ValueError(
                    f"site {site.id!r} serves task {site.task!r} (its config's site.task), "
                    f"which is not in the scenario's [tasks] ({', '.join(self.tasks)})"
                )
        for task in self.tasks:
            own = [site.id for site in self.own_sites_of(task)]
            generated = [site.id for site in self.generated_sites() if self.task_for(site) == task]
            if own and generated:
                raise ValueError(
                    f"task {task!r} mixes generated sites ({', '.join(generated)}) with sites "
                    f"of your own data ({', '.join(own)}): generated sites train on the demo "
                    "base model, yours on the base model their configs name. Run them in "
                    "separate scenarios, or give the generated sites' data as existing site "
                    'configs (config = "site.toml") naming your base model'
                )

    def generated_sites(self) -> list[GeneratedSite]:
        return [site for site in self.sites if not isinstance(site, ExistingSiteSpec)]

    def own_sites(self) -> list[OwnSite]:
        """Existing sites, then every split's sites, in scenario order."""
        existing: list[OwnSite] = [s for s in self.sites if isinstance(s, ExistingSiteSpec)]
        return existing + [part for split in self.splits for part in split.parts()]

    def own_sites_of(self, task: str) -> list[OwnSite]:
        return [site for site in self.own_sites() if site.task == task]

    def all_sites(self) -> list[AnySite]:
        """Every site: the [[sites]] entries in order, then the sites of each split."""
        splits = [part for split in self.splits for part in split.parts()]
        return [*self.sites, *splits]

    def has_own_data(self, task: str) -> bool:
        """True when ``task``'s sites are a researcher's own (existing or split)."""
        return bool(self.own_sites_of(task))

    def task_for(self, site: AnySite) -> str:
        if isinstance(site, ExistingSiteSpec | SplitSite):
            return site.task
        kind = site_data_kind(site)
        return next(task for task in self.tasks if TASKS.get(task).data_kind == kind)

    def sites_of(self, task: str) -> list[AnySite]:
        return [site for site in self.all_sites() if self.task_for(site) == task]


def builtin_scenarios() -> list[str]:
    folder = resources.files("simulations") / "scenarios"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def _validated(path: Path, source: str) -> Scenario:
    """Validate the scenario at ``path``; its relative paths (existing site configs,
    split sources) are taken from the file's own folder."""
    try:
        return Scenario.model_validate(
            read_toml(path), context={SCENARIO_DIR: path.resolve().parent}
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_scenario(name_or_path: str) -> Scenario:
    """A TOML path, or the name of a built-in scenario (``default``, …)."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if name_or_path not in builtin_scenarios():
            raise ConfigError(
                f"no scenario {name_or_path!r}: give a .toml path or one of "
                f"{', '.join(builtin_scenarios())}"
            )
        resource = resources.files("simulations") / "scenarios" / f"{name_or_path}.toml"
        with resources.as_file(resource) as builtin:
            return _validated(builtin, f"scenario {name_or_path!r}")
    return _validated(path, str(path))
