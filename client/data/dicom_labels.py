"""Which DICOM files a site's data holds, and their classes: a labels file
(``path,label`` rows, paths relative to ``data.path``) or one sub-folder per class.

The loader and a simulation's split both list files here, by the same strict rules:
a label must be one of ``data.classes`` exactly, a path must stay inside the data
directory, and a file listed twice counts once. A row that names no usable file is a
rejection with its reason, never dropped silently.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from client.data import Rejection
from common.config import DicomDataConfig
from common.errors import DataError

__all__ = [
    "DUPLICATE",
    "FILE_NOT_FOUND",
    "OUTSIDE_DIRECTORY",
    "LabelledFile",
    "labelled_files",
]

_MAX_LABEL_SHOWN = 40
FILE_NOT_FOUND = "file listed in the labels file does not exist"
UNCHECKABLE = "file listed in the labels file cannot be looked up (name too long or not readable)"
OUTSIDE_DIRECTORY = "path in the labels file points outside the data directory"
DUPLICATE = "listed more than once in the labels file"


@dataclass(frozen=True)
class LabelledFile:
    """One record to load: where it is and which class it is labelled with."""

    record: str
    path: Path
    label: int


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _csv_entries(config: DicomDataConfig, root: Path) -> tuple[list[LabelledFile], list[Rejection]]:
    labels_path = root / config.labels_file
    if not labels_path.is_file():
        raise DataError(
            f"labels file {labels_path} not found (data.labels = 'csv' expects a file "
            "with columns path,label; use data.labels = 'folders' for one folder per class)"
        )
    try:
        with labels_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [name.strip() for name in reader.fieldnames or []]
            if "path" not in fields or "label" not in fields:
                absent = " and ".join(name for name in ("path", "label") if name not in fields)
                raise DataError(  # the row is not quoted: without a header it is data
                    f"labels file {labels_path} must start with a header row naming the "
                    f"columns path,label; its first row ({len(fields)} fields) has no {absent}"
                )
            reader.fieldnames = fields
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"labels file {labels_path} cannot be read ({exc})") from exc
    if not rows:
        raise DataError(f"labels file {labels_path} lists no images")

    class_index = {name: index for index, name in enumerate(config.classes)}
    entries: list[LabelledFile] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        raw_path = (row.get("path") or "").strip().replace("\\", "/")
        label = (row.get("label") or "").strip()
        if not raw_path:
            rejected.append(Rejection(f"{config.labels_file}:{line}", "empty path"))
            continue
        full = Path(os.path.normpath(root / raw_path))  # lexical: symlinks stay usable
        if not full.is_relative_to(root):
            rejected.append(Rejection(PurePosixPath(raw_path).as_posix(), OUTSIDE_DIRECTORY))
            continue
        record = _relative(full, root)
        if record in seen:
            rejected.append(Rejection(record, DUPLICATE))
            continue
        seen.add(record)
        if label not in class_index:
            shown = label if len(label) <= _MAX_LABEL_SHOWN else label[:_MAX_LABEL_SHOWN] + "..."
            rejected.append(
                Rejection(record, f"label {shown!r} is not one of the configured classes")
            )
        elif (missing := _missing(full)) is not None:
            rejected.append(Rejection(record, missing))
        else:
            entries.append(LabelledFile(record, full, class_index[label]))
    return entries, rejected


def _missing(path: Path) -> str | None:
    """Why ``path`` names no file, or None when it does. A name the system refuses (too
    long, in a folder the site may not read) is one rejected row, not a failed load."""
    try:
        return None if path.is_file() else FILE_NOT_FOUND
    except (OSError, ValueError):
        return UNCHECKABLE


def _folder_entries(config: DicomDataConfig, root: Path) -> list[LabelledFile]:
    missing = [name for name in config.classes if not (root / name).is_dir()]
    if missing:
        raise DataError(
            f"class folder(s) {', '.join(missing)} not found in {root} "
            "(data.labels = 'folders' expects one sub-folder per class)"
        )
    entries = []
    for index, name in enumerate(config.classes):
        for path in (root / name).rglob("*"):
            if path.is_file():
                entries.append(LabelledFile(_relative(path, root), path, index))
    return entries


def labelled_files(
    config: DicomDataConfig, root: Path
) -> tuple[list[LabelledFile], list[Rejection]]:
    """Every file ``config``'s labels name (a labels file, or one folder per class),
    sorted by record, and the rows that name no usable file, as rejections.

    Raises :class:`DataError` when the labels file or a class folder is missing."""
    if config.labels == "csv":
        files, rejected = _csv_entries(config, root)
    else:
        files, rejected = _folder_entries(config, root), []
    files.sort(key=lambda entry: entry.record)
    return files, rejected
