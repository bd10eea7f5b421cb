"""Load a hospital's DICOM images into the base model's input arrays.

Each image is cleaned the same way, in this order, by :func:`preprocess_dataset`
(which ``predict`` reuses, so training and inference see identical inputs):

1. Check the header, then decode. Geometry, colour space, that a decoder exists and
   (native pixel data) that the data holds every frame are checked before anything is
   decoded; a frame over 64 Mi pixels is refused. pydicom decodes every transfer syntax
   its installed plugins can (native little/big endian, deflated, RLE, JPEG Baseline,
   Extended and Lossless, JPEG-LS, JPEG 2000); a file without File Meta Information is
   read in the encoding pydicom found. Multi-frame files (Number of Frames > 1) are
   reduced to their **middle frame** (0-based index ``frames // 2``): the model takes one
   2-D image, and the middle of a short cine/stack is the frame most likely to show the
   region the study was taken for. Only that frame is decoded. YBR colour comes out of
   pydicom as RGB.
2. Grayscale (MONOCHROME1/2), with pydicom's LUT functions:
   a. Modality LUT (``apply_modality_lut``): Rescale Slope / Intercept or a Modality LUT
      Sequence, so values are in physical units (e.g. Hounsfield units for CT).
   b. VOI (``apply_voi_lut``), to [0, 1]: the site config's ``window_center`` /
      ``window_width`` if set (applied exactly: ``[center - width/2, center + width/2]``,
      LINEAR_EXACT), else the file's first VOI LUT (VOI LUT Sequence, scaled by its
      output bit depth), else its first Window Center/Width with its VOI LUT Function
      (LINEAR by default, LINEAR_EXACT, SIGMOID), else the image's own min-max. A file
      VOI pydicom refuses falls through to the next.
   c. MONOCHROME1 is inverted, so 1 is always bright.
   Colour (RGB, YBR_*, PALETTE COLOR through ``apply_color_lut``): scaled to [0, 1] by
   its bit depth (the palette's entry depth); no modality or VOI LUT, as PS3.3 C.11 says.
3. Channels follow the base model: colour becomes ITU-R BT.601 luma
   (0.299 R + 0.587 G + 0.114 B) for a 1-channel model and stays RGB for a 3-channel
   one; grayscale is replicated to 3 channels for a 3-channel model.
4. Resize to the model's ``size`` x ``size`` (box average when shrinking, antialiased
   bilinear otherwise). Non-square images are stretched, not padded.
5. Normalise per channel, ``(x - mean) / std``, with the model's mean and std
   (:func:`common.tasks.image_input.image_input`; the demo bases: 0.5 and 0.5, [-1, 1]).

A file that cannot be used becomes a :class:`~client.data.Rejection` with a short
reason; it never stops the load and is never dropped silently. What pydicom and its
plugins log or warn while a file is read is captured (client.data.dicom_capture): it
never reaches the console, and becomes the reason when the file fails.

Each record belongs to one person, chosen by ``data.person_key`` (see
:func:`person_identifier`); the identifier is read as raw bytes, salted and hashed
here, and only the hash is kept: no patient name or identifier is stored, logged, or
written into a rejection reason. Files are read from memory so no message names them.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import get_args

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from client.data import Rejection, SiteData, person_key
from client.data.dicom_capture import UnusableImageError, captured, reason
from client.data.dicom_pixels import NO_PIXEL_DATA, NO_TRANSFER_SYNTAX, TRUNCATED, image_array
from common.config import DicomDataConfig
from common.data_config import PersonKey
from common.errors import DataError
from common.tasks.image_input import ImageInput

__all__ = [
    "NO_PIXEL_DATA",
    "NO_TRANSFER_SYNTAX",
    "TRUNCATED",
    "UnusableImageError",
    "load_dicom_dataset",
    "missing_key_reason",
    "person_identifier",
    "preprocess_dataset",
    "preprocess_file",
    "privacy_unit",
    "read_dicom",
]

logger = logging.getLogger(__name__)

_MAX_LABEL_SHOWN = 40
_SOP_CLASS_UID = 0x00080016
_PATIENT_ID, _ISSUER_OF_PATIENT_ID = 0x00100020, 0x00100021
_KEY_TAGS: dict[str, tuple[int, str]] = {
    "patient": (_PATIENT_ID, "PatientID"),
    "study": (0x0020000D, "StudyInstanceUID"),
    "series": (0x0020000E, "SeriesInstanceUID"),
    "file": (0x00080018, "SOPInstanceUID"),
}
_MEDIA_SOP_INSTANCE_UID = 0x00020003
_KEY_ADVICE = {
    "patient": ' (de-identified? set data.person_key = "study" or "file")',
    "study": ' (set data.person_key = "series" or "file")',
    "series": ' (set data.person_key = "file")',
    "file": " (not a complete DICOM instance)",
}
_UNITS = {
    "patient": "one person per patient (PatientID, qualified by IssuerOfPatientID when "
    "present): ε is per patient",
    "study": "one person per study (StudyInstanceUID): a patient with several studies "
    "counts as several people, so ε is per study, not per patient",
    "series": "one person per series (SeriesInstanceUID): a patient with several series "
    "counts as several people, so ε is per series, not per patient",
    "file": "one person per image (SOPInstanceUID): a patient with several images counts "
    "as several people, so ε is per image, not per patient",
}

# Rejection reasons that do not depend on the file (the others are built inline).
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable DICOM file (corrupt header)"
UNREADABLE_IO = "file cannot be read (permission or I/O error)"
FILE_NOT_FOUND = "file listed in the labels file does not exist"
OUTSIDE_DIRECTORY = "path in the labels file points outside the data directory"
DUPLICATE = "listed more than once in the labels file"


# ------------------------------------------------------------------ single image ---


def _parse(data: bytes) -> Dataset:
    """The dataset in ``data``; a file without the DICM preamble (older archives write
    bare datasets) is read with ``force`` and kept only if it names its SOP Class."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass
    with captured() as capture:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception:  # forced parsing of a non-DICOM file fails in many ways
            raise UnusableImageError(NOT_DICOM) from None
        if _SOP_CLASS_UID not in ds:
            capture.messages.clear()
            raise UnusableImageError(NOT_DICOM)
    return ds


def read_dicom(path: Path) -> Dataset:
    """Read one file fully, or raise :class:`UnusableImageError` saying why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnusableImageError(UNREADABLE_IO) from exc
    with captured() as capture:
        try:
            ds = _parse(data)
        except UnusableImageError:
            raise
        except Exception as exc:  # any parser failure is one bad file, not a crash
            raise UnusableImageError(reason(UNREADABLE, capture, exc)) from exc
        if capture.first("end of file"):
            raise UnusableImageError(TRUNCATED)
    return ds


def preprocess_dataset(
    ds: Dataset, config: DicomDataConfig, image: ImageInput
) -> npt.NDArray[np.float32]:
    """Clean one DICOM dataset into the model's float32 ``[channels, size, size]`` input
    (the steps of the module docstring).

    Raises :class:`UnusableImageError` when the image cannot be used. Pure: ``ds`` is not
    modified.
    """
    with captured():
        return image_array(ds, config, image)


def preprocess_file(
    path: Path, config: DicomDataConfig, image: ImageInput
) -> npt.NDArray[np.float32]:
    """Read and clean one file (for ``predict``); raises :class:`UnusableImageError`."""
    with captured():
        return preprocess_dataset(read_dicom(path), config, image)


# ---------------------------------------------------------------------- persons ---


def _raw_text(ds: Dataset | None, tag: int) -> str | None:
    """An element's raw value as text, without letting pydicom convert (and possibly
    log) it: pydicom's warnings about a malformed value would quote that value."""
    if ds is None or tag not in ds:
        return None
    value = ds.get_item(tag).value
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    return text.strip(" \t\r\n\x00") or None


def person_identifier(ds: Dataset, person_key: PersonKey) -> str | None:
    """The raw identifier of the person ``ds`` belongs to under ``person_key``, or None
    when the file does not carry it.

    - ``"patient"``: PatientID, qualified by IssuerOfPatientID when present (two
      issuers' patient "123" are two people): ``"ISSUER\\ID"``; neither value can hold a
      backslash, DICOM's value delimiter, so different pairs never give one string.
    - ``"study"``: StudyInstanceUID; ``"series"``: SeriesInstanceUID.
    - ``"file"``: SOPInstanceUID (else the file meta's Media Storage SOP Instance UID):
      one person per image, and two copies of one image are one.

    The value is raw: hash it (client.data.person_key) before it leaves the caller.
    """
    if person_key not in _KEY_TAGS:
        raise ValueError(f"unknown person key {person_key!r}; choose from {get_args(PersonKey)}")
    tag = _KEY_TAGS[person_key][0]
    identifier = _raw_text(ds, tag)
    if person_key == "file" and identifier is None:
        identifier = _raw_text(getattr(ds, "file_meta", None), _MEDIA_SOP_INSTANCE_UID)
    if person_key == "patient" and identifier is not None:
        issuer = _raw_text(ds, _ISSUER_OF_PATIENT_ID)
        if issuer is not None:
            identifier = f"{issuer}\\{identifier}"
    return identifier


def missing_key_reason(person_key: PersonKey) -> str:
    """The rejection reason of a file without the chosen person key, with what to do."""
    return f"missing {_KEY_TAGS[person_key][1]}{_KEY_ADVICE[person_key]}"


def privacy_unit(person_key: PersonKey) -> str:
    """What ``data.person_key`` means for the privacy unit (``fedlora site check``)."""
    return _UNITS[person_key]


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


def load_dicom_dataset(config: DicomDataConfig, salt: bytes, image: ImageInput) -> SiteData:
    """Load every labelled image under ``config.path`` as ``image`` inputs (the base
    model's); bad files become rejections. Records are grouped by ``config.person_key``.

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
            with captured():  # one file's messages, from reading to the last LUT
                ds = read_dicom(entry.path)
                # The image first: a file that is no usable image (a report, a broken
                # file) says so, rather than asking for another person key.
                values = preprocess_dataset(ds, config, image)
                identifier = person_identifier(ds, config.person_key)
                if identifier is None:
                    raise UnusableImageError(missing_key_reason(config.person_key))
        except UnusableImageError as exc:
            rejected.append(Rejection(entry.record, exc.reason))
            continue
        except Exception as exc:  # never let one odd file stop the site
            why = f"unexpected error while reading ({type(exc).__name__})"
            rejected.append(Rejection(entry.record, why))
            continue
        images.append(values)
        labels.append(entry.label)
        keys.append(person_key(identifier, salt))
    rejected.sort(key=lambda rejection: rejection.record)

    if not images:
        reasons: dict[str, int] = {}
        for rejection in rejected:
            reasons[rejection.reason] = reasons.get(rejection.reason, 0) + 1
        summary = "; ".join(f"{count} x {why}" for why, count in sorted(reasons.items()))
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
