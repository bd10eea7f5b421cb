"""One decoded DICOM frame as the base model's input: the steps listed, in order, in
:mod:`client.data.dicom`'s docstring after decoding (LUTs or colour, channels, resize,
normalise). pydicom does the DICOM parts (modality LUT, VOI LUT and windowing, palette
colour); this module decides what happens when the file's own values cannot be used.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut

from client.data.dicom_capture import UnusableImageError, captured, reason
from client.data.dicom_pixels import GRAY, PALETTE, DecodedFrame, decode_frame, shown_term
from common.config import DicomDataConfig
from common.tasks.image_input import ImageInput

__all__ = ["PALETTE_DESCRIPTOR", "image_array"]

PALETTE_DESCRIPTOR = "invalid Palette Color Lookup Table Descriptor"
_LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R BT.601 luma weights: colour to one channel."""
_WINDOW_CENTER, _WINDOW_WIDTH = 0x00281050, 0x00281051
_WINDOW_OUT = 65535.0
"""The output range of pydicom's windowing for the 16-bit unsigned view it is given."""


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
    # Halved first: a range wider than float64's largest value (a rescale slope of
    # 1e308 on ±1) would make high - low infinite and every pixel NaN.
    return (values / 2 - low / 2) / (high / 2 - low / 2)


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


def _palette_depth(ds: Dataset) -> int:
    """The palette's bit depth, once its three descriptors are what PS3.3 C.7.6.3.1.5
    allows (entries, first mapped value, depth 8 or 16; 0 entries means 65536) and each
    table that is not segmented holds its entries: anything else would be scaled wrong
    (a depth of 32 gives a blank image) or fail inside NumPy with a message of its own."""
    depths = set()
    for colour in ("Red", "Green", "Blue"):
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        try:
            entries, _, depth = (int(value) for value in descriptor)
        except (TypeError, ValueError):
            raise UnusableImageError(PALETTE_DESCRIPTOR) from None
        if depth not in (8, 16):
            raise UnusableImageError(PALETTE_DESCRIPTOR)
        data = ds.get(f"{colour}PaletteColorLookupTableData")
        needed = (entries or 1 << 16) * (depth // 8)
        if data is not None and len(data) < needed:
            raise UnusableImageError(PALETTE_DESCRIPTOR + ": its table is shorter than its entries")
        depths.add(depth)
    if len(depths) != 1:
        raise UnusableImageError(PALETTE_DESCRIPTOR + ": the three depths differ")
    return depths.pop()


def _colour(frame: DecodedFrame, ds: Dataset) -> npt.NDArray[np.float64]:
    """[R, C, 3] RGB in [0, 1], scaled by the bit depth (no modality or VOI LUT: PS3.3
    C.11 applies them to grayscale only)."""
    if frame.photometric == PALETTE:
        depth = _palette_depth(ds)
        with captured() as capture:
            try:
                rgb = apply_color_lut(frame.array, ds)[..., :3]  # an alpha LUT is dropped
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
            f"colour space {shown_term(frame.photometric)} is not RGB after decoding"
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
    if frame.photometric in GRAY:
        unit = _grayscale(frame.array, ds, frame.photometric, config)
    else:
        unit = _colour(frame, ds)
    resized = _resize(_planes(unit, image.channels), image)
    if resized.shape[0] != image.channels:
        resized = np.repeat(resized, image.channels, axis=0)
    mean = np.asarray(image.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image.std, dtype=np.float32)[:, None, None]
    normalised: npt.NDArray[np.float32] = ((resized - mean) / std).astype(np.float32)
    if not np.isfinite(normalised).all():  # the last guard: no NaN ever reaches training
        raise UnusableImageError("image values are not finite after cleaning")
    return normalised
