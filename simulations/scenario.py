"""Scenarios: which synthetic sites exist, how much data each holds, how skewed it is,
and how each task's federation is run. Built-in scenarios live next to this file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from common.config import (
    DataKind,
    FederationSettings,
    SiteKind,
    StrictModel,
    read_toml,
    validate_model,
)
from common.errors import ConfigError
from common.identifiers import SiteId
from common.tasks import TASKS

BehaviourKind = Literal[
    "nan",
    "inf",
    "wrong-shape",
    "missing-keys",
    "scaled",
    "oversized",
    "error",
    "crash",
    "slow",
    "slow-introduction",
]


class SiteBehaviour(StrictModel):
    """How a simulated site misbehaves in training rounds (fault injection).

    The site trains honestly, then its reply is corrupted: ``nan``/``inf`` values,
    a ``wrong-shape`` tensor, ``missing-keys``, an update ``scaled`` by ``factor``, an
    ``oversized`` payload, an ``error`` reply (without training), a ``crash`` (the
    site's process dies after ``crash_after_steps`` optimiser steps) or a ``slow``
    reply (``delay`` seconds late: a straggler). Evaluation stays honest. A
    ``slow-introduction`` site is honest in every round but answers the coordinator's
    introduction ``delay`` seconds late (a site busy or on a loaded machine).
    """

    kind: BehaviourKind
    factor: float = Field(default=1000.0, description="scaled: the update's multiplier.")
    delay: float = Field(
        default=0.0, ge=0, description="slow, slow-introduction: seconds before replying."
    )
    crash_after_steps: int = Field(default=1, ge=1, description="crash: steps before dying.")
    from_round: int = Field(default=1, ge=1, description="First round that misbehaves.")


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
    epsilon: float = Field(default=8.0, gt=0)
    delta: float = Field(default=1e-5, gt=0)
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
    epsilon: float = Field(default=8.0, gt=0)
    delta: float = Field(default=1e-5, gt=0)
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
    epsilon: float = Field(default=8.0, gt=0)
    delta: float = Field(default=1e-5, gt=0)
    behaviour: SiteBehaviour | None = Field(
        default=None, description="Fault injection for robustness studies; honest if unset."
    )


def _site_tag(value: Any) -> str | None:
    """``data = "text"`` makes a text site; otherwise ``kind`` decides."""
    if isinstance(value, dict):
        return "text" if value.get("data") == "text" else value.get("kind")
    return "text" if isinstance(value, TextSiteSpec) else getattr(value, "kind", None)


SiteSpec = Annotated[
    Annotated[HospitalSpec, Tag("hospital")]
    | Annotated[BankSpec, Tag("bank")]
    | Annotated[TextSiteSpec, Tag("text")],
    Discriminator(
        _site_tag,
        custom_error_type="site_kind",
        custom_error_message="kind must be 'hospital' or 'bank' (add data = \"text\" for a "
        "site of texts)",
    ),
]
AnySite = HospitalSpec | BankSpec | TextSiteSpec


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


class Scenario(StrictModel):
    name: str
    description: str = ""
    seed: int = 0
    image_size: int = Field(default=32, ge=8)
    imaging_backbone: ImagingBackbone = Field(default_factory=ImagingBackbone)
    text_backbone: TextBackbone = Field(default_factory=TextBackbone)
    tasks: dict[str, TaskRunSpec]
    sites: list[SiteSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ids = [site.id for site in self.sites]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"site ids must be unique; repeated: {duplicates}")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {TASKS.names()}")
        for kind in {site_data_kind(site) for site in self.sites}:
            if not any(TASKS.get(task).data_kind == kind for task in self.tasks):
                raise ValueError(f"sites with {kind} data have no task in [tasks]")
        if self.image_size % self.imaging_backbone.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of "
                f"imaging_backbone.patch_size {self.imaging_backbone.patch_size}"
            )
        return self

    def task_for(self, site: AnySite) -> str:
        kind = site_data_kind(site)
        return next(task for task in self.tasks if TASKS.get(task).data_kind == kind)

    def sites_of(self, task: str) -> list[AnySite]:
        return [site for site in self.sites if self.task_for(site) == task]


def builtin_scenarios() -> list[str]:
    folder = resources.files("simulations") / "scenarios"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


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
            return validate_model(Scenario, read_toml(builtin), f"scenario {name_or_path!r}")
    return validate_model(Scenario, read_toml(path), str(path))
