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
:mod:`client.data.dicom_persons`); the identifier is read as raw bytes, salted and hashed
here, and only the hash is kept: no patient name or identifier is stored, logged, or
written into a rejection reason. Files are read from memory so no message names them.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from client.data import Rejection, SiteData, person_key
from client.data.dicom_capture import (
    UnusableImageError,
    captured,
    library_failure,
    raw_text,
    reason,
)
from client.data.dicom_labels import LabelledFile, labelled_files
from client.data.dicom_persons import (
    PersonRef,
    missing_key_reason,
    person_identifiers,
    person_ref,
)
from client.data.dicom_pixels import (
    NO_PIXEL_DATA,
    NO_TRANSFER_SYNTAX,
    SOP_CLASS_UID,
    TRUNCATED,
)
from client.data.dicom_values import image_array
from common.config import DicomDataConfig
from common.errors import DataError
from common.tasks.image_input import ImageInput

__all__ = [
    "NO_PIXEL_DATA",
    "NO_TRANSFER_SYNTAX",
    "TRUNCATED",
    "UnusableImageError",
    "load_dicom_dataset",
    "preprocess_dataset",
    "preprocess_file",
    "read_dicom",
]

logger = logging.getLogger(__name__)

# Rejection reasons that do not depend on the file (the others are built inline).
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable DICOM file (corrupt header)"
UNREADABLE_IO = "file cannot be read (permission or I/O error)"
PIXEL_DATA_LOST = (
    UNREADABLE + ": the file holds a Pixel Data element, but a malformed element "
    "before it hid it from the parser"
)
MAX_FILE_BYTES = 4 << 30
"""Largest file read (4 GiB): its size is checked before it is read into memory."""
MAX_INFLATED_BYTES = 1 << 30
"""Largest dataset a deflated file may inflate to (1 GiB), checked before pydicom
inflates it whole: a small deflated file can otherwise expand without bound."""
_INFLATE_CHUNK = 1 << 24
_TRANSFER_SYNTAX_UID = 0x00020010
_PIXEL_DATA_CANDIDATES = 4
"""Tag-like byte runs, from the end of a file, read in search of its Pixel Data."""


# ------------------------------------------------------------------ single image ---


def _check_inflated_size(data: bytes) -> None:
    """A Deflated Explicit VR file must not inflate past :data:`MAX_INFLATED_BYTES`;
    counted in chunks, so the check itself holds little memory."""
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
    except Exception:  # no preamble or meta: not deflated (or not DICOM, refused later)
        return
    if raw_text(meta, _TRANSFER_SYNTAX_UID) != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = data[stream.tell() :], 0
    try:
        while pending and total <= MAX_INFLATED_BYTES:
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # pydicom's own read reports the broken stream
    if total > MAX_INFLATED_BYTES:
        raise UnusableImageError(
            f"deflated dataset inflates to over {MAX_INFLATED_BYTES >> 30} GiB"
        )


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
        if SOP_CLASS_UID not in ds:
            capture.messages.clear()
            raise UnusableImageError(NOT_DICOM)
    return ds


def read_dicom(path: Path) -> Dataset:
    """Read one file fully, or raise :class:`UnusableImageError` saying why not."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UnusableImageError(f"file larger than {MAX_FILE_BYTES >> 30} GiB")
        data = path.read_bytes()
    except OSError as exc:
        raise UnusableImageError(UNREADABLE_IO) from exc
    with captured() as capture:
        try:
            _check_inflated_size(data)
            ds = _parse(data)
        except UnusableImageError:
            raise
        except Exception as exc:  # any parser failure is one bad file, not a crash
            raise UnusableImageError(reason(UNREADABLE, capture, exc)) from exc
        if capture.first("end of file"):
            raise UnusableImageError(TRUNCATED)
    _check_pixel_data_found(ds, data)
    return ds


def _check_pixel_data_found(ds: Dataset, data: bytes) -> None:
    """A dataset without Pixel Data in a file whose bytes end with a top-level Pixel Data
    element is a corrupt header, not a header-only export or a report: a damaged length
    or VR made the parser read the pixels as part of an earlier element. A deflated file
    is not judged (its bytes on disk are compressed)."""
    if "PixelData" in ds:
        return
    implicit, little = ds.original_encoding
    if little is None or raw_text(getattr(ds, "file_meta", None), _TRANSFER_SYNTAX_UID) == (
        DeflatedExplicitVRLittleEndian
    ):
        return
    if ends_with_pixel_data(data, implicit=bool(implicit), little=bool(little)):
        raise UnusableImageError(PIXEL_DATA_LOST)


def ends_with_pixel_data(data: bytes, *, implicit: bool, little: bool) -> bool:
    """Whether ``data`` ends with a (7FE0,0010) element, as a dataset's top-level Pixel
    Data does: its value runs to the end of the file, or to the trailing padding or
    digital signatures that alone may follow it. A Pixel Data nested in a sequence (an
    icon, a DICOMDIR record's icon) is followed by item delimiters and more elements,
    and four random bytes that look like the tag almost never also carry a length that
    lands there. Only the last few candidates are read, from the end: a file packed with
    tag-like bytes costs one backward search each, not one step per match."""
    order = "<" if little else ">"
    tag = struct.pack(order + "HH", 0x7FE0, 0x0010)
    trailers = tuple(struct.pack(order + "HH", group, group) for group in (0xFFFA, 0xFFFC))
    delimiter = struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0)
    end = len(data)
    for _ in range(_PIXEL_DATA_CANDIDATES):
        start = data.rfind(tag, 0, end)
        if start < 0:
            return False
        end = start
        if implicit:
            header = 8  # tag, 4-byte length
        elif data[start + 4 : start + 8] in (b"OB\0\0", b"OW\0\0"):
            header = 12  # tag, VR, reserved, 4-byte length
        else:
            continue
        if start + header > len(data):
            continue
        (length,) = struct.unpack_from(order + "I", data, start + header - 4)
        if length == 0xFFFFFFFF:  # encapsulated: the fragments end with a delimiter
            stop = data.find(delimiter, start + header)
            value_end = -1 if stop < 0 else stop + len(delimiter)
        else:
            value_end = start + header + length
        if value_end == len(data) or data[value_end : value_end + 4] in trailers:
            return True
    return False


def preprocess_dataset(
    ds: Dataset, config: DicomDataConfig, image: ImageInput
) -> npt.NDArray[np.float32]:
    """Clean one DICOM dataset into the model's float32 ``[channels, size, size]`` input
    (the steps of the module docstring).

    Raises :class:`UnusableImageError` when the image cannot be used. Pure: ``ds`` is not
    modified.
    """
    with captured() as capture:
        try:
            return image_array(ds, config, image)
        except NotImplementedError as exc:
            if "Value Representation" not in str(exc):
                raise  # not pydicom meeting an element of an unknown VR
            raise UnusableImageError(reason(UNREADABLE, capture, exc, ds)) from exc


def preprocess_file(
    path: Path, config: DicomDataConfig, image: ImageInput
) -> npt.NDArray[np.float32]:
    """Read and clean one file (for ``predict``); raises :class:`UnusableImageError`."""
    with captured():
        return preprocess_dataset(read_dicom(path), config, image)


# ----------------------------------------------------------------------- loading ---


def _read_image(
    path: Path, config: DicomDataConfig, image: ImageInput
) -> tuple[npt.NDArray[np.float32], PersonRef]:
    """One file's model input and person, or :class:`UnusableImageError` saying why."""
    with captured():  # one file's messages, from reading to the last LUT
        ds = read_dicom(path)
        # The image first: a file that is no usable image (a report, a broken file)
        # says so, rather than asking for another person key.
        values = preprocess_dataset(ds, config, image)
        ref = person_ref(ds, config.person_key)
        if ref is None:
            raise UnusableImageError(missing_key_reason(config.person_key))
    return values, ref


def _read_images(
    files: list[LabelledFile], config: DicomDataConfig, image: ImageInput
) -> tuple[list[npt.NDArray[np.float32]], list[int], list[PersonRef], list[Rejection]]:
    """The usable files' inputs, labels and persons; the others as rejections."""
    images: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    refs: list[PersonRef] = []
    rejected: list[Rejection] = []
    for entry in files:
        try:
            values, ref = _read_image(entry.path, config, image)
        except UnusableImageError as exc:
            rejected.append(Rejection(entry.record, exc.reason))
            continue
        except BaseException as exc:  # never let one odd file stop the site
            if not library_failure(exc):
                raise
            why = f"unexpected error while reading ({type(exc).__name__})"
            rejected.append(Rejection(entry.record, why))
            continue
        images.append(values)
        labels.append(entry.label)
        refs.append(ref)
    return images, labels, refs, rejected


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

    files, rejected = labelled_files(config, root)
    images, labels, refs, unusable = _read_images(files, config, image)
    rejected.extend(unusable)
    keys = [person_key(identifier, salt) for identifier in person_identifiers(refs)]
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
