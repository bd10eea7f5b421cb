"""One DICOM dataset's stored pixel values: the header checked before anything is
decoded (geometry, colour space, a decoder, the data's length, a codestream's own
size), then the one frame decoded by pydicom and its plugins. What the values become
(LUTs or colour, channels, resize, normalise) is :mod:`client.data.dicom_values`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    UID_dictionary,
)

from client.data.dicom_capture import (
    UnusableImageError,
    captured,
    library_failure,
    raw_text,
    reason,
)
from client.data.dicom_streams import sizes_itself, stream_geometry

__all__ = [
    "GRAY",
    "MAX_FRAME_PIXELS",
    "PALETTE",
    "SOP_CLASS_UID",
    "DecodedFrame",
    "decode_frame",
    "shown_term",
    "syntax_name",
]

MAX_FRAME_PIXELS = 1 << 26
"""Largest frame decoded (64 Mi pixels, e.g. 8192 x 8192): checked from the header
before decoding, so one odd file cannot exhaust the site's memory."""
TRUNCATED = "truncated DICOM file (pixel data shorter than the image needs)"
NO_PIXEL_DATA = "no Pixel Data"
NO_TRANSFER_SYNTAX = "no Transfer Syntax UID in the file meta information"
BAD_GEOMETRY = "missing or invalid Rows, Columns or BitsAllocated"
BAD_STREAM_HEADER = "compressed frame header cannot be read"
GRAY = frozenset({"MONOCHROME1", "MONOCHROME2"})
PALETTE = "PALETTE COLOR"
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
"""Three-sample colour spaces pydicom's decoders return as RGB."""
_DEFINED_PHOTOMETRIC = (
    GRAY
    | _COLOUR
    | {
        PALETTE,
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "XYZ",
    }
)
"""PS3.3 C.7.6.3.1.2's defined terms (current and retired): the only values a reason
quotes; anything else in the element could be any text."""
SOP_CLASS_UID, _MEDIA_SOP_CLASS = 0x00080016, 0x00020002
_PHOTOMETRIC = 0x00280004


@dataclass(frozen=True)
class _Header:
    """The Image Pixel values that are checked before anything is decoded."""

    rows: int
    columns: int
    samples: int
    bits: int
    frames: int
    photometric: str


@dataclass(frozen=True)
class DecodedFrame:
    array: npt.NDArray[np.generic]
    """[R, C] or [R, C, 3]."""
    photometric: str
    """After decoding: pydicom returns YCbCr colour as RGB."""
    bits: int


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise TypeError("not a number")
    return int(value)


def _frame_count(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or value == "" or value == 0:
        return 1  # absent or empty: one frame (pydicom assumes the same)
    try:
        frames = _int(value)
    except (TypeError, ValueError):
        raise UnusableImageError("invalid Number of Frames") from None
    if frames < 1:
        raise UnusableImageError("invalid Number of Frames")
    return frames


def shown_term(photometric: str) -> str:
    """A Photometric Interpretation as a reason may quote it: a defined term, or not."""
    if photometric in _DEFINED_PHOTOMETRIC:
        return repr(photometric)
    return "(empty)" if not photometric else "(not a defined term)"


def syntax_name(syntax: UID) -> str:
    """A transfer syntax as a reason may name it: a UID pydicom knows, by name; any
    other value is unknown (a corrupt file meta may hold any bytes there, patient
    data included)."""
    entry = UID_dictionary.get(str(syntax))
    return entry[0] if entry else "(unknown UID)"


def _header(ds: Dataset) -> _Header:
    try:
        rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
        bits = _int(ds.get("BitsAllocated"))
        samples = _int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise UnusableImageError(BAD_GEOMETRY) from None
    if rows < 1 or columns < 1 or bits < 1:
        raise UnusableImageError(BAD_GEOMETRY)
    if bits != 1 and (bits % 8 or bits > 64):  # PS3.5 8.1.1: 1, or whole bytes
        raise UnusableImageError(f"Bits Allocated {bits} is not 1 or a multiple of 8 up to 64")
    if rows * columns > MAX_FRAME_PIXELS:
        raise UnusableImageError(
            f"image too large ({rows} x {columns} pixels; at most {MAX_FRAME_PIXELS} per frame)"
        )
    photometric = (raw_text(ds, _PHOTOMETRIC) or "").upper()
    if not photometric and samples == 1:
        photometric = "MONOCHROME2"  # the only reading of a grayscale file without one
    usable = (samples == 1 and (photometric in GRAY or photometric == PALETTE)) or (
        samples == 3 and photometric in _COLOUR
    )
    if not usable:
        raise UnusableImageError(
            f"unsupported image: Photometric Interpretation {shown_term(photometric)} with "
            f"SamplesPerPixel = {samples} (supported: MONOCHROME1/2, PALETTE COLOR, "
            "RGB and YBR colour)"
        )
    return _Header(rows, columns, samples, bits, _frame_count(ds), photometric)


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax; for a file without one (no File Meta Information,
    as older archives export them) the encoding pydicom read it in, when its pixel data
    is native and so fully described by that encoding."""
    file_meta = getattr(ds, "file_meta", None)
    value = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    if value:
        return UID(str(value))
    if ds["PixelData"].is_undefined_length:  # encapsulated: the codec is unknown
        raise UnusableImageError(NO_TRANSFER_SYNTAX + " (compressed pixel data)")
    implicit, little = ds.original_encoding
    if little is None:
        raise UnusableImageError(NO_TRANSFER_SYNTAX)
    if little:
        return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ExplicitVRBigEndian


def _decoder(syntax: UID) -> Decoder:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnusableImageError(
            f"transfer syntax {syntax_name(syntax)} is not supported"
        ) from None
    if not decoder.is_available:
        raise UnusableImageError(
            f"compressed transfer syntax {syntax_name(syntax)} needs a pixel-data plugin "
            "(e.g. pylibjpeg)"
        )
    return decoder


def _check_native_length(ds: Dataset, header: _Header) -> None:
    """Native pixel data must hold every frame (PS3.5 8.1.1; 1-bit data is packed,
    YBR_FULL_422 stores two samples per pixel)."""
    values = header.rows * header.columns * header.samples * header.frames
    needed = -(-values // 8) if header.bits == 1 else values * (header.bits // 8)
    if header.photometric == "YBR_FULL_422":
        needed = needed // 3 * 2
    if len(ds.PixelData) < needed:
        raise UnusableImageError(TRUNCATED)


def _check_stream(ds: Dataset, header: _Header, syntax: UID, index: int) -> None:
    """The frame's own header must declare the file's geometry: JPEG-family decoders
    size their output from it (see :mod:`client.data.dicom_streams`)."""
    with captured():
        try:
            stream = get_frame(ds.PixelData, index, number_of_frames=header.frames)
        except Exception:  # no such frame, broken fragments: the decoder would fail too
            raise UnusableImageError(BAD_STREAM_HEADER) from None
    geometry = stream_geometry(syntax, bytes(stream))
    if geometry is None:
        raise UnusableImageError(BAD_STREAM_HEADER)
    declared = (geometry.rows, geometry.columns, geometry.components)
    if declared != (header.rows, header.columns, header.samples):
        raise UnusableImageError(
            f"compressed frame is {geometry.rows} x {geometry.columns} x "
            f"{geometry.components}, but the header says {header.rows} x {header.columns} "
            f"x {header.samples} (Rows x Columns x SamplesPerPixel)"
        )


def _what_it_is(ds: Dataset) -> str:
    """`` (its SOP Class name)``, e.g. a structured report or a DICOMDIR, when the UID
    (the dataset's, else the file meta's) is a known one."""
    for source, tag in ((ds, SOP_CLASS_UID), (getattr(ds, "file_meta", None), _MEDIA_SOP_CLASS)):
        name = UID_dictionary.get(raw_text(source, tag) or "")
        if name:
            return f" ({name[0]})"
    return ""


def decode_frame(ds: Dataset) -> DecodedFrame:
    """The stored values of the image (the middle frame of a multi-frame file).

    The header is checked first (size, geometry, colour space, that a decoder exists);
    only then is the one frame decoded."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnusableImageError("float pixel data (e.g. a parametric map) is not supported")
        raise UnusableImageError(NO_PIXEL_DATA + _what_it_is(ds))
    header = _header(ds)
    syntax = _transfer_syntax(ds)
    decoder = _decoder(syntax)
    if not syntax.is_encapsulated:
        _check_native_length(ds, header)
    index = header.frames // 2 if header.frames > 1 else None
    if syntax.is_encapsulated and sizes_itself(syntax):
        _check_stream(ds, header, syntax, index or 0)
    with captured() as capture:
        try:
            options = as_pixel_options(
                ds, number_of_frames=header.frames, photometric_interpretation=header.photometric
            )
            if syntax == RLELossless:  # pydicom's own: pylibjpeg-rle panics on bad input
                options["decoding_plugin"] = "pydicom"
            array, meta = decoder.as_array(ds, index=index, validate=True, raw=False, **options)
        except BaseException as exc:  # a decoder's failure (or panic) is one bad file
            if not library_failure(exc):
                raise
            summary = f"pixel data could not be decoded ({syntax_name(syntax)})"
            raise UnusableImageError(reason(summary, capture, exc, ds)) from exc
    expected = 2 if header.samples == 1 else 3
    if array.ndim != expected or min(array.shape) < 1:
        raise UnusableImageError(f"unsupported pixel array shape {tuple(array.shape)}")
    photometric = str(meta.get("photometric_interpretation", header.photometric))
    bits = int(meta.get("bits_stored", ds.get("BitsStored", header.bits)) or header.bits)
    return DecodedFrame(array, photometric.upper(), bits)
