"""The sources a split reads: whose each record is and its class, and how one site's
share is written back in the source's own format.

A source is what a site config's ``[data]`` describes: a table (CSV/Parquet), a text
file (CSV/Parquet/JSONL) or a DICOM folder labelled by a labels file or class folders.
Persons and labels are read the way the site's loader reads them (the same columns,
the same cell canonicalisation, the same PatientID), so the people the split keeps
apart are the people the site's privacy accounting counts. Raw identifiers stay in
memory: records carry a person *number*, never the identifier.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from client.data.cell_text import column_texts, text_lookup
from client.data.dicom import UnusableImageError, read_dicom
from client.data.dicom_labels import LabelledFile, labelled_files
from client.data.dicom_persons import PersonRef, person_identifiers, person_ref
from client.data.table_reader import read_columns
from common.config import DataConfig, DicomDataConfig, TabularDataConfig, TextDataConfig
from common.data_config import PersonKey
from common.errors import DataError


@dataclass(frozen=True)
class Records:
    """Per record of a source: its person's number (None: no person id, left out of the
    split) and its class name (None: missing or not one of ``data.classes``)."""

    persons: list[int | None]
    labels: list[str | None]
    record_is_person: bool
    """True when the source names no person (no person column, or DICOM's
    ``person_key = "file"``): each record is counted as one person."""


class Source(Protocol):
    def records(self) -> Records:
        """Whose each record is, and its class."""
        ...

    def write(self, rows: list[int], folder: Path) -> Path:
        """Write the records ``rows`` (in order) under ``folder``; return the new
        ``data.path``."""
        ...


def _numbered(identifiers: list[str | None]) -> list[int | None]:
    """Person numbers in order of first appearance; the identifiers are dropped."""
    numbers: dict[str, int] = {}
    return [
        None if text is None else numbers.setdefault(text, len(numbers)) for text in identifiers
    ]


def _class_names(texts: list[str | None], classes: list[str]) -> list[str | None]:
    lookup = text_lookup(classes)
    labels: list[str | None] = []
    for text in texts:
        index = lookup(text)
        labels.append(None if index is None else classes[index])
    return labels


class TableSource:
    """A CSV, Parquet or JSONL file (a feature table or texts): one record per row.

    Rows are written back unchanged: CSV cells as the text they were, Parquet rows
    with the file's own schema, JSONL lines byte for byte.
    """

    def __init__(self, config: TabularDataConfig | TextDataConfig) -> None:
        self.config = config
        self._rows: pd.DataFrame | pa.Table | list[bytes] | None = None

    def records(self) -> Records:
        config = self.config
        declared = [(config.label_column, "data.label_column")]
        if config.person_column is not None:
            declared.append((config.person_column, "data.person_column"))
        frame = read_columns(config, declared)  # the loader's reading, and its errors
        labels = _class_names(column_texts(frame[config.label_column]), config.classes)
        if config.person_column is None:
            persons: list[int | None] = list(range(len(frame)))
        else:
            persons = _numbered(column_texts(frame[config.person_column]))
        if len(persons) != self._row_count():
            raise DataError(f"{config.path}: rows cannot be matched up for splitting")
        return Records(persons, labels, record_is_person=config.person_column is None)

    def _row_count(self) -> int:
        return len(self._raw())

    def _raw(self) -> pd.DataFrame | pa.Table | list[bytes]:
        """The rows as they are written back (read once): CSV cells as text, the Parquet
        table, or the JSONL lines (pandas skips blank lines too)."""
        if self._rows is None:
            path = self.config.path
            if self.config.format == "jsonl":
                self._rows = [line for line in path.read_bytes().splitlines() if line.strip()]
            elif self.config.format == "parquet":
                self._rows = pq.read_table(path)
            else:
                self._rows = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        return self._rows

    def write(self, rows: list[int], folder: Path) -> Path:
        path = folder / self.config.path.name
        raw = self._raw()
        if isinstance(raw, list):
            path.write_bytes(b"".join(raw[row] + b"\n" for row in rows))
        elif isinstance(raw, pa.Table):
            pq.write_table(raw.take(pa.array(rows, type=pa.int64())), path)
        else:
            raw.iloc[rows].to_csv(path, index=False)
        return path


def dicom_persons(paths: list[Path], person_key: PersonKey) -> list[str | None]:
    """Whose each file is under ``data.person_key``, read as the site's loader reads it
    (None: unreadable, or without that identifier). What pydicom logs or warns while
    reading is captured (it may quote header values); the identifiers only ever
    number people in memory."""
    refs: list[PersonRef | None] = []
    for path in paths:
        try:
            refs.append(person_ref(read_dicom(path), person_key))
        except UnusableImageError:
            refs.append(None)
    known = person_identifiers([ref for ref in refs if ref is not None])
    found = iter(known)
    return [None if ref is None else next(found) for ref in refs]


class DicomSource:
    """A folder of DICOM files labelled by a labels file or by class folders, listed
    by the loader's own rules (client.data.dicom_labels).

    A site's share is its files under the same relative paths in the site's data folder
    (hard-linked where the file system allows, else copied) and, for a labels file, that
    file with the site's rows only.
    """

    def __init__(self, config: DicomDataConfig) -> None:
        self.config = config
        self.root = config.path.resolve()
        self._files: list[LabelledFile] | None = None

    def files(self) -> list[LabelledFile]:
        """The labelled files (rows the loader would reject are not part of the data)."""
        if self._files is None:
            self._files = labelled_files(self.config, self.root)[0]
        return self._files

    def records(self) -> Records:
        if not self.root.is_dir():
            raise DataError(f"DICOM directory {self.root} does not exist or is not a directory")
        files = self.files()
        key = self.config.person_key
        identifiers = dicom_persons([entry.path for entry in files], key)
        labels: list[str | None] = [self.config.classes[entry.label] for entry in files]
        return Records(_numbered(identifiers), labels, record_is_person=key == "file")

    def write(self, rows: list[int], folder: Path) -> Path:
        target = folder
        files = self.files()
        for row in rows:
            relative = PurePosixPath(files[row].record)
            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.root.joinpath(*relative.parts), destination)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copy2(self.root.joinpath(*relative.parts), destination)
        target.mkdir(parents=True, exist_ok=True)
        if self.config.labels == "csv":
            labels_path = target / self.config.labels_file
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            with labels_path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "label"])
                writer.writerows(
                    (files[row].record, self.config.classes[files[row].label]) for row in rows
                )
        else:
            for name in self.config.classes:  # the loader expects every class folder
                (target / name).mkdir(exist_ok=True)
        return target


def source_for(config: DataConfig) -> Source:
    if isinstance(config, DicomDataConfig):
        return DicomSource(config)
    return TableSource(config)
