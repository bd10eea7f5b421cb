"""Load a hospital's DICOM images into model-ready arrays.

Each image is cleaned the same way, in this order, by :func:`preprocess_dataset`
(which ``predict`` reuses, so training and inference see identical inputs):

1. Decode the pixel data. Multi-frame files (Number of Frames > 1) are reduced to
   their **middle frame** (0-based index ``frames // 2``): the model takes one 2-D
   image, and the middle of a short cine/stack is the frame most likely to show the
   region the study was taken for. Only that frame is decoded.
2. Modality LUT: Rescale Slope / Rescale Intercept (or a Modality LUT Sequence), so
   values are in physical units (e.g. Hounsfield units for CT).
3. Window: ``window_center``/``window_width`` from the site config if set, else the
   file's first Window Center / Window Width, else the image's own min-max. Values are
   clipped to ``[center - width/2, center + width/2]`` and scaled to [0, 1].
4. MONOCHROME1 is inverted after windowing, so 1 is always bright.
5. Resize to ``image_size`` x ``image_size`` (box average when shrinking, antialiased
   bilinear otherwise). Non-square images are stretched, not padded.
6. Normalise with mean 0.5 / std 0.5, giving values in [-1, 1].

A file that cannot be used becomes a :class:`~client.data.Rejection` with a short
reason; it never stops the load and is never dropped silently. Patient IDs are read
as raw bytes, salted and hashed here, and only the hash is kept: no patient name or
identifier is stored, logged, or written into a rejection reason. Files are read from
memory so pydicom's own warnings cannot name them either.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt
import pydicom
import torch
import torch.nn.functional as functional
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from client.data import Rejection, SiteData, person_key
from common.config import DicomDataConfig
from common.errors import DataError

__all__ = [
    "UnusableImageError",
    "load_dicom_dataset",
    "preprocess_dataset",
    "preprocess_file",
    "read_dicom",
]

logger = logging.getLogger(__name__)

_PATIENT_ID_TAG = 0x00100020
_MAX_LABEL_SHOWN = 40

# Rejection reasons that do not depend on the file (the others are built inline).
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable DICOM file (corrupt header)"
UNREADABLE_IO = "file cannot be read (permission or I/O error)"
TRUNCATED = "truncated DICOM file (pixel data shorter than the image needs)"
NO_PIXEL_DATA = "no Pixel Data"
NO_TRANSFER_SYNTAX = "no Transfer Syntax UID in the file meta information"
MISSING_PATIENT_ID = "missing PatientID"
FILE_NOT_FOUND = "file listed in the labels file does not exist"
OUTSIDE_DIRECTORY = "path in the labels file points outside the data directory"
DUPLICATE = "listed more than once in the labels file"


class UnusableImageError(DataError):
    """One image cannot be used. ``reason`` is short and free of patient data.

    The loader turns it into a rejection; ``predict`` lets it surface as an error.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------ single image ---


@contextmanager
def _quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Collect pydicom's warnings instead of printing them (they may quote values)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def read_dicom(path: Path) -> Dataset:
    """Read one file fully, or raise :class:`UnusableImageError` saying why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnusableImageError(UNREADABLE_IO) from exc
    with _quiet_pydicom() as caught:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError as exc:
            raise UnusableImageError(NOT_DICOM) from exc
        except Exception as exc:  # any parser failure is one bad file, not a crash
            raise UnusableImageError(UNREADABLE) from exc
    if any("end of file" in str(warning.message).lower() for warning in caught):
        raise UnusableImageError(TRUNCATED)
    return ds


def _frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _check_image_type(ds: Dataset) -> None:
    samples = ds.get("SamplesPerPixel", 1)
    if samples != 1:
        raise UnusableImageError(
            f"unsupported image: SamplesPerPixel = {samples} "
            "(only single-channel grayscale is supported)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnusableImageError(
            f"unsupported photometric interpretation {photometric[:16]!r} "
            "(only MONOCHROME1 and MONOCHROME2 are supported)"
        )


def _transfer_syntax(ds: Dataset) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    value = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    if not value:
        raise UnusableImageError(NO_TRANSFER_SYNTAX)
    return UID(str(value))


def _decode_frame(ds: Dataset) -> npt.NDArray[np.generic]:
    """The stored values of the (middle) frame, as a 2-D array."""
    if "PixelData" not in ds:
        raise UnusableImageError(NO_PIXEL_DATA)
    _check_image_type(ds)
    syntax = _transfer_syntax(ds)
    frames = _frame_count(ds)
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise UnusableImageError(f"transfer syntax {syntax.name} is not supported") from exc
        if not decoder.is_available:
            raise UnusableImageError(
                f"compressed transfer syntax {syntax.name} needs a pixel-data plugin "
                "(e.g. pylibjpeg)"
            )
    else:
        try:
            rows, columns = int(ds.Rows), int(ds.Columns)
            bits = int(ds.BitsAllocated)
        except (AttributeError, TypeError, ValueError) as exc:
            raise UnusableImageError("missing or invalid Rows, Columns or BitsAllocated") from exc
        if len(ds.PixelData) * 8 < rows * columns * frames * bits:
            raise UnusableImageError(TRUNCATED)
    with _quiet_pydicom():
        try:
            array = pixel_array(ds, index=frames // 2 if frames > 1 else None)
        except Exception as exc:  # a decoder's failure is one bad file, not a crash
            raise UnusableImageError(f"pixel data could not be decoded ({syntax.name})") from exc
    if array.ndim != 2 or min(array.shape) < 1:
        raise UnusableImageError(f"unsupported pixel array shape {tuple(array.shape)}")
    return array


def _file_window(ds: Dataset) -> tuple[float, float] | None:
    """The file's first Window Center/Width, or None if absent or unusable."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        first_center = float(center[0] if isinstance(center, MultiValue) else center)
        first_width = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(first_center) and np.isfinite(first_width)) or first_width <= 0:
        return None
    return first_center, first_width


def _window(
    values: npt.NDArray[np.float64], ds: Dataset, config: DicomDataConfig
) -> npt.NDArray[np.float64]:
    """Clip to the window and scale to [0, 1]."""
    window: tuple[float, float] | None
    if config.window_center is not None and config.window_width is not None:
        window = (config.window_center, config.window_width)
    else:
        window = _file_window(ds)
    if window is None:
        low, high = float(values.min()), float(values.max())
    else:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    if high <= low:  # a constant image without a window carries no contrast
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _resize(image: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.float32]:
    if image.shape == (size, size):
        return image.astype(np.float32)
    tensor = torch.from_numpy(image.astype(np.float32))[None, None]
    if image.shape[0] >= size and image.shape[1] >= size:
        resized = functional.interpolate(tensor, size=(size, size), mode="area")
    else:
        resized = functional.interpolate(
            tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return np.asarray(resized[0, 0].clamp_(0.0, 1.0).numpy(), dtype=np.float32)


def preprocess_dataset(ds: Dataset, config: DicomDataConfig) -> npt.NDArray[np.float32]:
    """Clean one DICOM dataset into a ``[1, S, S]`` float32 array in [-1, 1].

    Raises :class:`UnusableImageError` when the image cannot be used. Pure: ``ds`` is not
    modified.
    """
    stored = _decode_frame(ds)
    with _quiet_pydicom():
        try:
            physical = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        except Exception as exc:
            raise UnusableImageError("invalid Rescale Slope/Intercept or Modality LUT") from exc
    if not np.all(np.isfinite(physical)):
        raise UnusableImageError("pixel values are not finite after rescaling")
    scaled = _window(physical, ds, config)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        scaled = 1.0 - scaled
    resized = _resize(scaled, config.image_size)
    normalised: npt.NDArray[np.float32] = ((resized - 0.5) / 0.5)[None, :, :]
    return normalised


def preprocess_file(path: Path, config: DicomDataConfig) -> npt.NDArray[np.float32]:
    """Read and clean one file (for ``predict``); raises :class:`UnusableImageError`."""
    return preprocess_dataset(read_dicom(path), config)


def _patient_identifier(ds: Dataset) -> str | None:
    """The raw PatientID without letting pydicom convert (and possibly log) it."""
    if _PATIENT_ID_TAG not in ds:
        return None
    value = ds.get_item(_PATIENT_ID_TAG).value
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    return text.strip(" \t\r\n\x00") or None


# ------------------------------------------------------------------------ labels ---


@dataclass(frozen=True)
class _Entry:
    """One record to load: where it is and which class it is labelled with."""

    record: str
    path: Path
    label: int


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _csv_entries(config: DicomDataConfig, root: Path) -> tuple[list[_Entry], list[Rejection]]:
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
                raise DataError(
                    f"labels file {labels_path} must have the columns path,label "
                    f"(found: {', '.join(fields) or 'nothing'})"
                )
            reader.fieldnames = fields
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"labels file {labels_path} cannot be read ({exc})") from exc
    if not rows:
        raise DataError(f"labels file {labels_path} lists no images")

    class_index = {name: index for index, name in enumerate(config.classes)}
    entries: list[_Entry] = []
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
        elif not full.is_file():
            rejected.append(Rejection(record, FILE_NOT_FOUND))
        else:
            entries.append(_Entry(record, full, class_index[label]))
    return entries, rejected


def _folder_entries(config: DicomDataConfig, root: Path) -> list[_Entry]:
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
                entries.append(_Entry(_relative(path, root), path, index))
    return entries


# ----------------------------------------------------------------------- loading ---


def load_dicom_dataset(config: DicomDataConfig, salt: bytes) -> SiteData:
    """Load every labelled image under ``config.path``; bad files become rejections.

    Raises :class:`DataError` when the directory, the labels or the class folders are
    missing, or when no image at all can be used.
    """
    root = config.path.resolve()
    if not root.is_dir():
        raise DataError(f"DICOM directory {root} does not exist or is not a directory")
    if not any(path.is_file() for path in root.rglob("*")):
        raise DataError(f"DICOM directory {root} contains no files")

    if config.labels == "csv":
        entries, rejected = _csv_entries(config, root)
    else:
        entries, rejected = _folder_entries(config, root), []
    entries.sort(key=lambda entry: entry.record)

    images: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    keys: list[str] = []
    for entry in entries:
        try:
            ds = read_dicom(entry.path)
            identifier = _patient_identifier(ds)
            if identifier is None:
                raise UnusableImageError(MISSING_PATIENT_ID)
            image = preprocess_dataset(ds, config)
        except UnusableImageError as exc:
            rejected.append(Rejection(entry.record, exc.reason))
            continue
        except Exception as exc:  # never let one odd file stop the site
            reason = f"unexpected error while reading ({type(exc).__name__})"
            rejected.append(Rejection(entry.record, reason))
            continue
        images.append(image)
        labels.append(entry.label)
        keys.append(person_key(identifier, salt))
    rejected.sort(key=lambda rejection: rejection.record)

    if not images:
        reasons: dict[str, int] = {}
        for rejection in rejected:
            reasons[rejection.reason] = reasons.get(rejection.reason, 0) + 1
        summary = "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items()))
        raise DataError(
            f"no usable DICOM images in {root}: all {len(rejected)} records were rejected"
            + (f" ({summary})" if summary else "")
        )

    data = SiteData(
        features={"pixel_values": np.stack(images).astype(np.float32, copy=False)},
        labels=np.asarray(labels, dtype=np.int64),
        person_keys=keys,
        classes=list(config.classes),
        rejected=rejected,
    )
    logger.info(
        "DICOM data: accepted %d images of %d persons, rejected %d",
        data.accepted,
        data.persons,
        len(rejected),
    )
    if rejected:
        logger.warning(
            "%d DICOM records were rejected; the site's rejection list gives the reasons",
            len(rejected),
        )
    return data
