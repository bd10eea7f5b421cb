"""Synthetic hospital imaging data: real DICOM files with a learnable label.

Why synthetic: demos and tests need DICOM that exercises every cleaning step a real
site needs (Rescale Slope/Intercept, a modality window, MONOCHROME1, multi-frame) and
carries realistic patient headers, so that the pseudonymisation path is tested with
something that looks like patient data. Nothing here is real: names come from small
word lists, identifiers from the seed.

Each image is drawn in *display units* ``f`` (0 = bottom of the modality window,
1 = top) and converted to stored values through the window and the rescale, so that
after a correct load every modality looks alike: a body outline with smooth
structure and noise around 0.5, and for ``lesion`` a bright round blob that saturates
the window. The blob is what a model (or a 3x3-mean max feature) learns to detect.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

# The body and lesion drawing and public_pretext_images (the default imaging backbone's
# public pretraining set) live in common.tasks.imaging_pretext, where fedlora model init
# uses them too; the hospitals are drawn with the same functions.
from common.tasks.imaging_pretext import NOISE_SD, public_pretext_images
from common.tasks.imaging_pretext import anatomy as draw_anatomy
from common.tasks.imaging_pretext import lesion as draw_lesion

__all__ = [
    "LABELS_FILE",
    "public_pretext_images",
    "write_hospital",
]

LABELS_FILE: Final = "labels.csv"

_LAST_NAMES: Final = (
    "Smith", "Garcia", "Muller", "Rossi", "Dubois", "Jansen", "Novak", "Kowalski",
    "Silva", "Andersson", "Nakamura", "Okafor", "Haddad", "Ivanova", "Murphy", "Weber",
)  # fmt: skip
_FIRST_NAMES: Final = (
    "Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Kaito", "Lena", "Marco", "Nora", "Omar", "Paula", "Quinn", "Rosa", "Sven", "Tara",
)  # fmt: skip
_INSTITUTIONS: Final = (
    "St. Example General Hospital",
    "Riverside University Medical Center",
    "Northfield Regional Hospital",
    "Lakeside Clinic",
)


@dataclass(frozen=True)
class _Modality:
    """How one modality stores its values (rescale, bit depth) and displays them."""

    name: str
    sop_class: UID
    window_center: float
    window_width: float
    slope: float
    intercept: float
    bits_stored: int
    signed: bool
    outside: float
    """Display level outside the body (air); below 0 means clipped by the window."""
    body_part: str

    def to_stored(self, display: npt.NDArray[np.float64]) -> npt.NDArray[np.integer]:
        """Display units -> stored pixel values, clipped to the declared bit depth."""
        lower = self.window_center - self.window_width / 2
        physical = lower + display * self.window_width
        stored = np.rint((physical - self.intercept) / self.slope)
        if self.signed:
            low, high = -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
            return np.clip(stored, low, high).astype(np.int16)
        return np.clip(stored, 0, 2**self.bits_stored - 1).astype(np.uint16)


def _modality(name: str) -> _Modality:
    match name:
        case "CT":  # Hounsfield units: stored = HU + 1024, soft-tissue window 40/400
            return _Modality(
                "CT", CTImageStorage, 40.0, 400.0, 1.0, -1024.0, 12, False, -2.1, "ABDOMEN"
            )
        case "MR":  # arbitrary units, signed 16-bit storage
            return _Modality(
                "MR", MRImageStorage, 500.0, 1000.0, 1.0, 0.0, 16, True, -0.02, "BRAIN"
            )
        case "CR":  # a slope that is not 1, so a loader that ignores it is caught
            return _Modality(
                "CR",
                ComputedRadiographyImageStorage,
                1024.0,
                2048.0,
                0.5,
                0.0,
                12,
                False,
                -0.05,
                "CHEST",
            )
    raise ValueError(f"modality must be one of CT, MR, CR, not {name!r}")


# ------------------------------------------------------------------------ images ---


def _frames(
    rng: np.random.Generator, size: int, spec: _Modality, lesion: bool, frames: int
) -> npt.NDArray[np.float64]:
    """Display-unit frames [F, S, S]: the same anatomy (and lesion) with fresh noise each."""
    clean = draw_anatomy(rng, size, spec.outside)
    if lesion:
        clean = clean + draw_lesion(rng, size)
    noise = rng.normal(0.0, NOISE_SD, size=(frames, size, size))
    result: npt.NDArray[np.float64] = clean[None, :, :] + noise
    return result


# ----------------------------------------------------------------------- headers ---


@dataclass(frozen=True)
class _Patient:
    name: str
    identifier: str
    birth_date: str
    sex: str
    study_date: str
    label: str
    images: int


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    year = int(rng.integers(first_year, last_year + 1))
    return f"{year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def _uid(seed: int, *parts: object) -> UID:
    """A UID that depends only on the seed and its role, so output is reproducible."""
    return generate_uid(entropy_srcs=["fedlora-synthetic", str(seed), *map(str, parts)])


def _base_dataset(spec: _Modality, sop_class: UID, sop_instance: UID) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.Modality = spec.name
    ds.BodyPartExamined = spec.body_part
    ds.Manufacturer = "fedlora synthetic"
    return ds


def _add_patient(ds: Dataset, patient: _Patient, institution: str) -> None:
    ds.PatientName = patient.name
    ds.PatientID = patient.identifier
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyDate = patient.study_date
    ds.SeriesDate = patient.study_date
    ds.StudyTime = "101500"
    ds.InstitutionName = institution


def _add_pixels(
    ds: Dataset, spec: _Modality, stored: npt.NDArray[np.integer], monochrome1: bool
) -> None:
    frames, rows, columns = stored.shape
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.RescaleSlope = spec.slope
    ds.RescaleIntercept = spec.intercept
    if spec.name == "CT":
        ds.RescaleType = "HU"
    ds.WindowCenter = spec.window_center
    ds.WindowWidth = spec.window_width
    ds.PixelSpacing = [0.7, 0.7]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()


def _relative_path(index: int) -> str:
    """File names carry no patient data: only a running image number."""
    return f"series-{index // 50:02d}/img-{index:06d}.dcm"


def _write_labels(directory: Path, rows: Sequence[tuple[str, str]], *, append: bool) -> None:
    path = directory / LABELS_FILE
    with path.open("a" if append else "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if not append:
            writer.writerow(["path", "label"])
        writer.writerows(rows)


def write_hospital(
    directory: Path,
    *,
    patients: int,
    classes: list[str],
    class_weights: list[float],
    seed: int,
    modality: str,
    image_size: int = 64,
    multi_frame_fraction: float = 0.05,
    monochrome1_fraction: float = 0.1,
    institution: str | None = None,
) -> int:
    """Write one hospital's DICOM files and ``labels.csv``; return the number of images.

    Each patient has one label (drawn with ``class_weights``, which is how scenarios
    give sites a non-IID label skew) and 1-3 images, all with that label. The first
    class is "no finding"; every other class gets the bright blob. Same seed, same
    bytes.
    """
    weights = _checked_weights(patients, classes, class_weights, image_size)
    _check_fractions(
        multi_frame_fraction=multi_frame_fraction, monochrome1_fraction=monochrome1_fraction
    )
    spec = _modality(modality)

    # The order of the draws from rng is part of "same seed, same bytes".
    rng = np.random.default_rng(seed)
    institution = institution or _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]
    roster = _roster(rng, patients, classes, weights)

    directory.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    index = 0
    for p, patient in enumerate(roster):
        study_uid, series_uid = _uid(seed, "study", p), _uid(seed, "series", p)
        for instance in range(patient.images):
            stored, monochrome1 = _draw_image(
                rng,
                spec,
                image_size,
                lesion=patient.label != classes[0],
                multi_frame_fraction=multi_frame_fraction,
                monochrome1_fraction=monochrome1_fraction,
            )
            ds = _base_dataset(spec, spec.sop_class, _uid(seed, "image", index))
            _add_patient(ds, patient, institution)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 1
            ds.InstanceNumber = instance + 1
            ds.AccessionNumber = f"ACC{seed % 1000:03d}{p:06d}"
            _add_pixels(ds, spec, stored, monochrome1)
            rows.append((_save(ds, directory, index), patient.label))
            index += 1

    _write_labels(directory, rows, append=False)
    return index


def _checked_weights(
    patients: int, classes: list[str], class_weights: list[float], image_size: int
) -> npt.NDArray[np.float64]:
    """The class weights as an array, once the hospital's shape is known to be usable."""
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if len(classes) < 2 or len(classes) != len(class_weights):
        raise ValueError("give at least two classes and one weight per class")
    weights = np.asarray(class_weights, dtype=np.float64)
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("class_weights must be non-negative and not all zero")
    if image_size < 8:
        raise ValueError("image_size must be at least 8")
    return weights


def _check_fractions(**fractions: float) -> None:
    """Each fraction (named as its argument) must lie in [0, 1]."""
    for name, fraction in fractions.items():
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1")


def _roster(
    rng: np.random.Generator, patients: int, classes: list[str], weights: npt.NDArray[np.float64]
) -> list[_Patient]:
    """The hospital's patients: distinct record numbers, a label each (drawn with
    ``weights``), made-up names and dates, and 1-3 images each."""
    identifiers = rng.choice(9_000_000, size=patients, replace=False) + 1_000_000
    labels = rng.choice(len(classes), size=patients, p=weights / weights.sum())
    return [
        _Patient(
            name=f"{_LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]}^"
            f"{_FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]}",
            identifier=f"MRN{int(identifiers[p]):07d}",
            birth_date=_date(rng, 1930, 2005),
            sex=str(rng.choice(["F", "M"])),
            study_date=_date(rng, 2018, 2024),
            label=classes[int(labels[p])],
            images=int(rng.integers(1, 4)),
        )
        for p in range(patients)
    ]


def _draw_image(
    rng: np.random.Generator,
    spec: _Modality,
    size: int,
    *,
    lesion: bool,
    multi_frame_fraction: float,
    monochrome1_fraction: float,
) -> tuple[npt.NDArray[np.integer], bool]:
    """One image's stored pixel values [F, S, S] (3 frames or 1), and whether it is
    MONOCHROME1."""
    frames = 3 if rng.random() < multi_frame_fraction else 1
    monochrome1 = bool(rng.random() < monochrome1_fraction)
    display = _frames(rng, size, spec, lesion, frames)
    if monochrome1:  # stored inverted: 1 - f, so it looks the same once inverted
        display = 1.0 - display
    return spec.to_stored(display), monochrome1


def _save(ds: Dataset, directory: Path, index: int) -> str:
    """Write image number ``index`` under ``directory``; its path relative to it."""
    relative = _relative_path(index)
    target = directory / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return relative
