"""Tiny real datasets for the split tests: a table with several rows per person, a JSONL
file of texts, and a DICOM folder, each with the site config that describes it whole."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import tomli_w

from simulations.generators.dicom import write_hospital

TABLE_CLASSES = ["no", "yes"]
TEXT_CLASSES = ["routine", "urgent"]
IMAGE_CLASSES = ["normal", "lesion"]


def site_config(
    folder: Path,
    *,
    site_id: str,
    kind: str,
    task: str,
    data: dict[str, Any],
    base_model: Path | str = "model",
    **tables: dict[str, Any],
) -> Path:
    """A site config with relative paths (taken from its folder, as an operator writes)."""
    document: dict[str, Any] = {
        "site": {"id": site_id, "kind": kind, "task": task, "base_model": str(base_model)},
        "data": data,
        "privacy": {"epsilon": 6.0, "delta": 1e-5},
        **tables,
    }
    path = folder / f"{site_id}.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def write_people_table(
    path: Path, people: int, seed: int = 0, missing_ids: int = 0, yes_rate: float = 0.4
) -> None:
    """Each person has 1-4 rows and one label, bar a minority row with the other label
    (a person's class is their majority); ``missing_ids`` rows have no person id."""
    rng = np.random.default_rng(seed)
    rows = []
    for person in range(people):
        label = int(rng.random() < yes_rate)
        count = int(rng.integers(1, 5))
        for index in range(count):
            flipped = count >= 3 and index == count - 1
            rows.append(
                {
                    "customer": f"C{person:05d}",
                    "age": int(rng.integers(20, 80)),
                    "defaulted": TABLE_CLASSES[1 - label if flipped else label],
                }
            )
    rows += [{"customer": "", "age": 40, "defaulted": "no"} for _ in range(missing_ids)]
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def table_source(
    folder: Path,
    people: int = 120,
    seed: int = 0,
    person_column: str | None = "customer",
    file_format: str = "csv",
    **kw: Any,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_people_table(folder / f"whole.{file_format}", people, seed=seed, **kw)
    data: dict[str, Any] = {
        "format": file_format,
        "path": f"whole.{file_format}",
        "classes": TABLE_CLASSES,
        "label_column": "defaulted",
        "numeric_features": ["age"],
    }
    if person_column is not None:
        data["person_column"] = person_column
    return site_config(
        folder, site_id="whole-bank", kind="bank", task="tabular-classification", data=data
    )


def parquet_source(folder: Path) -> Path:
    return table_source(folder, file_format="parquet")


def text_source(folder: Path, people: int = 120, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with (folder / "reports.jsonl").open("w") as handle:
        for person in range(people):
            label = TEXT_CLASSES[int(rng.random() < 0.5)]
            for _ in range(int(rng.integers(1, 4))):
                record = {
                    "patient": f"P{person:05d}",
                    "report": f"finding {person}",
                    "urgency": label,
                }
                handle.write(json.dumps(record) + "\n")
            if person % 40 == 0:
                handle.write("\n")  # blank lines are no records
    data = {
        "format": "jsonl",
        "path": "reports.jsonl",
        "classes": TEXT_CLASSES,
        "text_column": "report",
        "label_column": "urgency",
        "person_column": "patient",
    }
    return site_config(
        folder, site_id="whole-reports", kind="hospital", task="text-classification", data=data
    )


def dicom_source(folder: Path, patients: int = 60, seed: int = 0, labels: str = "csv") -> Path:
    """write_hospital's folder (labels.csv), or the same files in class folders."""
    images = folder / "images"
    write_hospital(
        images,
        patients=patients,
        classes=IMAGE_CLASSES,
        class_weights=[0.5, 0.5],
        seed=seed,
        modality="CT",
        image_size=8,
    )
    if labels == "folders":
        with (images / "labels.csv").open() as handle:
            for row in csv.DictReader(handle):
                target = images / row["label"] / row["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                (images / row["path"]).rename(target)
        (images / "labels.csv").unlink()
    data = {"format": "dicom", "path": "images", "classes": IMAGE_CLASSES, "labels": labels}
    return site_config(
        folder, site_id="whole-hospital", kind="hospital", task="dicom-classification", data=data
    )


def people_in(data: Any) -> list[str]:
    """The person identifiers of a written site's data (one entry per record)."""
    if data.format == "dicom":
        files = (
            [data.path / row["path"] for row in csv.DictReader((data.path / "labels.csv").open())]
            if data.labels == "csv"
            else [p for p in data.path.rglob("*.dcm")]
        )
        return [str(pydicom.dcmread(path, stop_before_pixels=True).PatientID) for path in files]
    if data.format == "jsonl":
        lines = [line for line in data.path.read_text().splitlines() if line.strip()]
        return [json.loads(line)[data.person_column] for line in lines]
    frame = (
        pd.read_csv(data.path, dtype=str) if data.format == "csv" else pd.read_parquet(data.path)
    )
    return [str(value) for value in frame[data.person_column]]
