"""One DICOM dataset's pixels as the base model's input: the steps listed, in order, in
:mod:`client.data.dicom`'s docstring (decode, LUTs or colour, channels, resize,
normalise). pydicom does the DICOM parts (decoders and their plugins, modality LUT,
VOI LUT and windowing, palette colour); this module checks the header before anything
is decoded and decides what happens when the file's own values cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
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
from common.config import DicomDataConfig
from common.tasks.image_input import ImageInput

__all__ = ["MAX_FRAME_PIXELS", "SOP_CLASS_UID", "image_array", "syntax_name"]

MAX_FRAME_PIXELS = 1 << 26
"""Largest frame decoded (64 Mi pixels, e.g. 8192 x 8192): checked from the header
before decoding, so one odd file cannot exhaust the site's memory."""
TRUNCATED = "truncated DICOM file (pixel data shorter than the image needs)"
NO_PIXEL_DATA = "no Pixel Data"
NO_TRANSFER_SYNTAX = "no Transfer Syntax UID in the file meta information"
BAD_GEOMETRY = "missing or invalid Rows, Columns or BitsAllocated"
BAD_STREAM_HEADER = "compressed frame header cannot be read"
_GRAY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PALETTE = "PALETTE COLOR"
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
"""Three-sample colour spaces pydicom's decoders return as RGB."""
_DEFINED_PHOTOMETRIC = (
    _GRAY
    | _COLOUR
    | {
        _PALETTE,
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
_LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R BT.601 luma weights: colour to one channel."""
_WINDOW_CENTER, _WINDOW_WIDTH = 0x00281050, 0x00281051
SOP_CLASS_UID, _MEDIA_SOP_CLASS = 0x00080016, 0x00020002
_PHOTOMETRIC = 0x00280004
_WINDOW_OUT = 65535.0
"""The output range of pydicom's windowing for the 16-bit unsigned view it is given."""


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
class _Frame:
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


def _shown(photometric: str) -> str:
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
    if rows * columns > MAX_FRAME_PIXELS:
        raise UnusableImageError(
            f"image too large ({rows} x {columns} pixels; at most {MAX_FRAME_PIXELS} per frame)"
        )
    photometric = (raw_text(ds, _PHOTOMETRIC) or "").upper()
    if not photometric and samples == 1:
        photometric = "MONOCHROME2"  # the only reading of a grayscale file without one
    usable = (samples == 1 and (photometric in _GRAY or photometric == _PALETTE)) or (
        samples == 3 and photometric in _COLOUR
    )
    if not usable:
        raise UnusableImageError(
            f"unsupported image: Photometric Interpretation {_shown(photometric)} with "
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


def decode_frame(ds: Dataset) -> _Frame:
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
    return _Frame(array, photometric.upper(), bits)


# ---------------------------------------------------------------------- grayscale ---


def _voi_view(ds: Dataset, keywords: tuple[str, ...]) -> Dataset:
    """The VOI elements of ``ds`` over a fixed 16-bit unsigned range, for pydicom's
    ``apply_voi_lut``: the modality LUT has been applied already, so the file's rescale
    must not shift the output range again, and ``ds`` itself is not touched."""
    view = Dataset()
    for keyword in keywords:
        if keyword in ds:
            view.add(ds[keyword])
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 16
    view.PixelRepresentation = 0
    # The byte order of OW LUT data: the transfer syntax's, else the one pydicom read.
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID"):
        view.file_meta = file_meta
    else:
        view.set_original_encoding(*ds.original_encoding[:2])
    return view


def _windowed(values: npt.NDArray[np.float64], view: Dataset) -> npt.NDArray[np.float64]:
    return np.asarray(apply_voi_lut(values, view), dtype=np.float64) / _WINDOW_OUT


def _config_window(
    values: npt.NDArray[np.float64], config: DicomDataConfig
) -> npt.NDArray[np.float64]:
    """The site's window, applied exactly: [center - width/2, center + width/2] to [0, 1]."""
    view = _voi_view(Dataset(), ())
    # FD, not the dictionary's DS: a decimal string is capped at 16 characters.
    view.add_new(_WINDOW_CENTER, "FD", float(config.window_center or 0.0))
    view.add_new(_WINDOW_WIDTH, "FD", float(config.window_width or 1.0))
    view.VOILUTFunction = "LINEAR_EXACT"
    return _windowed(values, view)


def _file_lut(values: npt.NDArray[np.float64], ds: Dataset) -> npt.NDArray[np.float64] | None:
    """The file's first VOI LUT (VOI LUT Sequence), scaled by its output bit depth."""
    items = ds.get("VOILUTSequence")
    if not items or "LUTDescriptor" not in items[0] or "LUTData" not in items[0]:
        return None
    entries, first, depth = (int(v) for v in items[0].LUTDescriptor)
    entries = entries or 1 << 16
    # pydicom indexes its LUT with the input in the LUT's own dtype: clip first, so an
    # input outside the LUT maps to its first or last entry instead of wrapping around.
    inputs = np.clip(np.floor(values), first, first + entries - 1).astype(np.int64)
    mapped = apply_voi_lut(inputs, _voi_view(ds, ("VOILUTSequence",)))
    return np.clip(np.asarray(mapped, dtype=np.float64) / ((1 << depth) - 1), 0.0, 1.0)


def _file_window(values: npt.NDArray[np.float64], ds: Dataset) -> npt.NDArray[np.float64] | None:
    """The file's first Window Center/Width, with its VOI LUT Function (LINEAR by
    default, LINEAR_EXACT or SIGMOID)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    view = _voi_view(ds, ("WindowCenter", "WindowWidth", "VOILUTFunction"))
    return _windowed(values, view)


def _min_max(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a constant image without a window carries no contrast
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _voi(
    values: npt.NDArray[np.float64], ds: Dataset, config: DicomDataConfig
) -> npt.NDArray[np.float64]:
    """Values of interest in [0, 1]: the site's window, else the file's VOI LUT, else
    its window; a file VOI that pydicom refuses (a width below 1, an unknown function)
    or that gives non-finite values falls through to the next, then to min-max."""
    if config.window_center is not None and config.window_width is not None:
        return _config_window(values, config)
    for attempt in (_file_lut, _file_window):
        with captured():
            try:
                scaled = attempt(values, ds)
            except Exception:  # an unusable VOI in the file: the next one is tried
                continue
        if scaled is not None and np.all(np.isfinite(scaled)):
            return np.clip(scaled, 0.0, 1.0)
    return _min_max(values)


def _grayscale(
    stored: npt.NDArray[np.generic], ds: Dataset, photometric: str, config: DicomDataConfig
) -> npt.NDArray[np.float64]:
    with captured() as capture:
        try:
            physical = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        except Exception as exc:
            summary = "invalid Rescale Slope/Intercept or Modality LUT"
            raise UnusableImageError(reason(summary, capture, exc, ds)) from exc
    if not np.all(np.isfinite(physical)):
        raise UnusableImageError("pixel values are not finite after rescaling")
    scaled = _voi(physical, ds, config)
    return 1.0 - scaled if photometric == "MONOCHROME1" else scaled


# ------------------------------------------------------------------------- colour ---


def _colour(frame: _Frame, ds: Dataset) -> npt.NDArray[np.float64]:
    """[R, C, 3] RGB in [0, 1], scaled by the bit depth (no modality or VOI LUT: PS3.3
    C.11 applies them to grayscale only)."""
    if frame.photometric == _PALETTE:
        with captured() as capture:
            try:
                rgb = apply_color_lut(frame.array, ds)[..., :3]  # an alpha LUT is dropped
                depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
            except Exception as exc:
                raise UnusableImageError(
                    reason("invalid Palette Color Lookup Table", capture, exc, ds)
                ) from exc
    elif frame.photometric == "RGB":
        rgb, depth = frame.array, frame.bits
        if np.issubdtype(rgb.dtype, np.signedinteger):
            rgb = rgb.astype(np.float64) + (1 << (depth - 1))
    else:
        raise UnusableImageError(
            f"colour space {_shown(frame.photometric)} is not RGB after decoding"
        )
    return np.clip(np.asarray(rgb, dtype=np.float64) / ((1 << depth) - 1), 0.0, 1.0)


def _planes(unit: npt.NDArray[np.float64], channels: int) -> npt.NDArray[np.float64]:
    """[C, R, C'] planes: colour becomes BT.601 luma for a 1-channel model; grayscale
    stays one plane (replicated to 3 after resizing, which is cheaper)."""
    if unit.ndim == 2:
        return unit[None]
    if channels == 1:
        return (unit @ _LUMA)[None]
    return np.moveaxis(unit, -1, 0)


def _resize(planes: npt.NDArray[np.float64], image: ImageInput) -> npt.NDArray[np.float32]:
    """Resized and cropped as the base model's processor does (``ImageInput.crop_region``): box
    average when shrinking, antialiased bilinear otherwise."""
    rows, columns = image.crop_region(planes.shape[1], planes.shape[2])
    region = planes[:, rows, columns]
    size = image.size
    if region.shape[1:] == (size, size):
        return region.astype(np.float32)
    tensor = torch.from_numpy(region.astype(np.float32))[None]
    if region.shape[1] >= size and region.shape[2] >= size:
        resized = functional.interpolate(tensor, size=(size, size), mode="area")
    else:
        resized = functional.interpolate(
            tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return np.asarray(resized[0].clamp_(0.0, 1.0).numpy(), dtype=np.float32)


def image_array(ds: Dataset, config: DicomDataConfig, image: ImageInput) -> npt.NDArray[np.float32]:
    """``ds``'s image as a float32 ``[channels, size, size]`` array, normalised per
    channel; raises :class:`UnusableImageError` saying why it cannot be."""
    frame = decode_frame(ds)
    if frame.photometric in _GRAY:
        unit = _grayscale(frame.array, ds, frame.photometric, config)
    else:
        unit = _colour(frame, ds)
    resized = _resize(_planes(unit, image.channels), image)
    if resized.shape[0] != image.channels:
        resized = np.repeat(resized, image.channels, axis=0)
    mean = np.asarray(image.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None, None]
    normalised: npt.NDArray[np.float32] = ((resized - mean) / std).astype(np.float32)
    return normalised
