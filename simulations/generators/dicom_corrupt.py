"""Broken DICOM files beside a generated hospital, so a demo shows real rejections.

Each kind is a failure a real site meets (an interrupted copy, a structured report, an
undecodable codestream, a colour screenshot, a de-identified export); the loader must
give each one reason and keep going.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage

from simulations.generators.dicom import (
    LABELS_FILE,
    _add_patient,
    _add_pixels,
    _base_dataset,
    _frames,
    _modality,
    _Patient,
    _uid,
    _write_labels,
)

__all__ = ["CORRUPT_KINDS", "write_corrupt_examples"]

CORRUPT_KINDS: Final[tuple[str, ...]] = (
    "not-dicom",
    "truncated",
    "no-pixel-data",
    "compressed",
    "rgb",
    "no-patient-id",
)
"""Kinds :func:`write_corrupt_examples` can write, in the order it writes them."""


def _valid_dataset(seed: int, size: int, key: str) -> Dataset:
    """A small, valid CT dataset used as the starting point of a broken file."""
    rng = np.random.default_rng([seed, 7])
    spec = _modality("CT")
    ds = _base_dataset(spec, spec.sop_class, _uid(seed, "corrupt", key))
    patient = _Patient(
        name="Doe^Jane",
        identifier=f"MRN{int(rng.integers(1_000_000, 10_000_000)):07d}",
        birth_date="19700101",
        sex="F",
        study_date="20240101",
        label="",
        images=1,
    )
    _add_patient(ds, patient, "St. Example General Hospital")
    ds.StudyInstanceUID = _uid(seed, "corrupt-study", key)
    ds.SeriesInstanceUID = _uid(seed, "corrupt-series", key)
    _add_pixels(ds, spec, spec.to_stored(_frames(rng, size, spec, False, 1)), False)
    return ds


def _serialise(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _corrupt_bytes(kind: str, seed: int, size: int) -> bytes:
    ds = _valid_dataset(seed, size, kind)
    match kind:
        case "not-dicom":
            return b"This is a scanned referral letter, not a DICOM image.\n"
        case "truncated":  # e.g. an interrupted copy: the file stops inside Pixel Data
            data = _serialise(ds)
            return data[: len(data) // 2]
        case "no-pixel-data":  # e.g. a structured report or a header-only export
            del ds.PixelData
            return _serialise(ds)
        case "compressed":  # JPEG-LS with garbage payload: no installed decoder reads it
            ds.file_meta.TransferSyntaxUID = JPEGLSLossless
            ds.PixelData = encapsulate([bytes(range(256)) * 4])
            ds["PixelData"].VR = "OB"
            return _serialise(ds)
        case "rgb":  # e.g. a screenshot saved as secondary capture
            ds.SOPClassUID = SecondaryCaptureImageStorage
            ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                delattr(ds, keyword)
            ds.SamplesPerPixel = 3
            ds.PhotometricInterpretation = "RGB"
            ds.PlanarConfiguration = 0
            ds.BitsAllocated = 8
            ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            rgb = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3))
            ds.PixelData = rgb.astype(np.uint8).tobytes()
            return _serialise(ds)
        case "no-patient-id":  # e.g. an export de-identified by removing the PatientID
            del ds.PatientID
            return _serialise(ds)
    raise ValueError(f"unknown corrupt kind {kind!r}; choose from {', '.join(CORRUPT_KINDS)}")


def write_corrupt_examples(
    directory: Path, seed: int, kinds: Sequence[str] | None = None, image_size: int = 64
) -> list[str]:
    """Add broken files, listed in ``labels.csv``, so a demo shows real rejections.

    Call after :func:`write_hospital`; labels are drawn from those already in
    ``labels.csv``. Returns the relative paths written, in the order of ``kinds``
    (default: all of :data:`CORRUPT_KINDS`). Paths already listed are not re-listed.
    """
    chosen = tuple(CORRUPT_KINDS if kinds is None else kinds)
    unknown = [kind for kind in chosen if kind not in CORRUPT_KINDS]
    if unknown:
        raise ValueError(f"unknown corrupt kinds {unknown}; choose from {CORRUPT_KINDS}")
    labels_path = directory / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} not found: call write_hospital first")
    with labels_path.open(newline="", encoding="utf-8") as handle:
        existing = list(csv.DictReader(handle))
    listed = {row["path"] for row in existing}
    label_pool = sorted({row["label"] for row in existing}) or ["normal"]

    rng = np.random.default_rng([seed, 13])
    written: list[str] = []
    rows: list[tuple[str, str]] = []
    for kind in chosen:
        relative = f"incoming/img-{900_000 + CORRUPT_KINDS.index(kind):06d}.dcm"
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_corrupt_bytes(kind, seed, image_size))
        written.append(relative)
        if relative not in listed:
            rows.append((relative, label_pool[int(rng.integers(len(label_pool)))]))
    _write_labels(directory, rows, append=True)
    return written
