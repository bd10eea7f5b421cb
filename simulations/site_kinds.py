"""The kinds of simulated site, as a registry: how each one's synthetic data is written
and how its site config describes that data (the ``[data]`` a real operator writes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.registry import Registry
from simulations.generators.dicom import write_hospital
from simulations.generators.dicom_corrupt import write_corrupt_examples
from simulations.generators.tabular import bank_schema, write_bank
from simulations.generators.text import (
    LABEL_COLUMN,
    PERSON_COLUMNS,
    TEXT_CLASSES,
    TEXT_COLUMNS,
    write_texts,
)
from simulations.scenario import BankSpec, HospitalSpec, Scenario, TextSiteSpec

IMAGING_CLASSES = ["normal", "lesion"]


@dataclass(frozen=True)
class SimulatedKind:
    generate: Callable[[Any, Scenario, Path, int], None]
    """(site spec, scenario, data folder, seed): write the site's synthetic data."""
    data_document: Callable[[Any, Path, Scenario], dict[str, Any]]
    """(site spec, site folder, scenario): the site config's ``[data]`` table."""


def _write_hospital(spec: HospitalSpec, _scenario: Scenario, data_dir: Path, seed: int) -> None:
    write_hospital(
        data_dir,
        patients=spec.patients,
        classes=IMAGING_CLASSES,
        class_weights=spec.class_weights,
        seed=seed,
        modality=spec.modality,
    )
    if spec.corrupt_files:
        write_corrupt_examples(data_dir, seed=seed)


def _hospital_data(_spec: HospitalSpec, site_dir: Path, _scenario: Scenario) -> dict[str, Any]:
    """No ``image_size``: the site's loader resizes to the base model's input size (the
    demo base is built at ``scenario.image_size``), as a real site's would."""
    return {
        "format": "dicom",
        "path": str(site_dir / "data"),
        "classes": IMAGING_CLASSES,
        "labels": "csv",
    }


def _write_texts(spec: TextSiteSpec, _scenario: Scenario, data_dir: Path, seed: int) -> None:
    write_texts(
        data_dir / f"texts.{spec.format}",
        kind=spec.kind,
        people=spec.people,
        seed=seed,
        urgent_rate=spec.urgent_rate,
        empty_texts=spec.empty_texts,
        overlong_texts=spec.overlong_texts,
        file_format=spec.format,
    )


def _text_data(spec: TextSiteSpec, site_dir: Path, scenario: Scenario) -> dict[str, Any]:
    return {
        "format": spec.format,
        "path": str(site_dir / "data" / f"texts.{spec.format}"),
        "classes": TEXT_CLASSES,
        "text_column": TEXT_COLUMNS[spec.kind],
        "label_column": LABEL_COLUMN,
        "person_column": PERSON_COLUMNS[spec.kind],
        "max_tokens": scenario.text_backbone.max_tokens,
    }


def _write_bank(spec: BankSpec, _scenario: Scenario, data_dir: Path, seed: int) -> None:
    write_bank(
        data_dir / f"loans.{spec.format}",
        customers=spec.customers,
        seed=seed,
        default_rate=spec.default_rate,
        file_format=spec.format,
    )


def _bank_data(spec: BankSpec, site_dir: Path, _scenario: Scenario) -> dict[str, Any]:
    schema = bank_schema()
    return {
        "format": spec.format,
        "path": str(site_dir / "data" / f"loans.{spec.format}"),
        "classes": schema["classes"],
        "label_column": schema["label_column"],
        "person_column": schema["person_column"],
        "numeric_features": schema["numeric_features"],
        "categorical_features": schema["categorical_features"],
    }


SITE_KINDS: Registry[SimulatedKind] = Registry(
    "simulated site kind",
    [
        ("dicom", SimulatedKind(_write_hospital, _hospital_data)),
        ("text", SimulatedKind(_write_texts, _text_data)),
        ("table", SimulatedKind(_write_bank, _bank_data)),
    ],
)
"""Keyed by the data kind a site spec declares (``spec.data_kind``)."""
