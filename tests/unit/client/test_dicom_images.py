"""The cleaning of one image, on files built to know the answer: colour to the model's
channels, per-channel normalisation, pydicom's VOI LUT and windowing functions, and the
header checks that come before any decoding."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from client.data.dicom import UnusableImageError, preprocess_dataset, read_dicom
from client.data.dicom_pixels import MAX_FRAME_PIXELS
from common.config import DicomDataConfig
from common.tasks.image_input import ImageInput

CONFIG = DicomDataConfig(format="dicom", path=Path("."), classes=["a", "b"])
PLAIN = ImageInput(4, 1, (0.0,), (1.0,))
"""4 x 4, one channel, unnormalised: the cleaned [0, 1] values."""
PLAIN_RGB = ImageInput(4, 3, (0.0,) * 3, (1.0,) * 3)


def _dataset(stored: npt.NDArray[np.integer], **attributes: Any) -> Dataset:
    """An uncompressed image: [R, C] grayscale or [R, C, 3] colour, of ``stored``'s
    dtype; ``attributes`` are set last (and override the defaults)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    colour = stored.ndim == 3
    ds.SOPClassUID = SecondaryCaptureImageStorage if colour else CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(np.issubdtype(stored.dtype, np.signedinteger))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _clean(ds: Dataset, image: ImageInput = PLAIN, **config: Any) -> npt.NDArray[np.float32]:
    settings = CONFIG.model_copy(update=config) if config else CONFIG
    return preprocess_dataset(ds, settings, image)


def _ramp() -> npt.NDArray[np.uint16]:
    return (np.arange(16, dtype=np.uint16) * 100).reshape(4, 4)  # 0 ... 1500


# ------------------------------------------------------------------------- colour ---


def _primaries() -> npt.NDArray[np.uint8]:
    """Rows of pure red, green, blue and white."""
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    for row, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        rgb[row] = colour
    return rgb


def test_colour_is_bt601_luma_for_a_one_channel_model() -> None:
    gray = _clean(_dataset(_primaries()))
    assert gray.shape == (1, 4, 4)
    np.testing.assert_allclose(gray[0, :, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)


def test_colour_stays_rgb_for_a_three_channel_model() -> None:
    colour = _clean(_dataset(_primaries()), PLAIN_RGB)
    assert colour.shape == (3, 4, 4)
    np.testing.assert_allclose(colour[:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(colour[:, 1, 0], [0, 1, 0])
    np.testing.assert_allclose(colour[:, 2, 0], [0, 0, 1])
    np.testing.assert_allclose(colour[:, 3, 0], [1, 1, 1])


def test_colour_is_scaled_by_its_bit_depth_without_any_lut() -> None:
    rgb = np.full((4, 4, 3), 16383, dtype=np.uint16)  # a quarter of 16 bits
    rgb[0, 0] = 65535
    # Rescale and window would wreck colour; the standard applies them to grayscale only.
    ds = _dataset(rgb, RescaleSlope=5, RescaleIntercept=-100, WindowCenter=10, WindowWidth=5)
    colour = _clean(ds, PLAIN_RGB)
    np.testing.assert_allclose(colour[:, 0, 0], [1, 1, 1])
    np.testing.assert_allclose(colour[:, 1, 1], [16383 / 65535] * 3, atol=1e-6)


def test_ybr_full_is_converted_to_rgb() -> None:
    ybr = np.zeros((4, 4, 3), dtype=np.uint8)
    ybr[..., 0], ybr[..., 1], ybr[..., 2] = 76, 85, 255  # BT.601 full range: pure red
    colour = _clean(_dataset(ybr, PhotometricInterpretation="YBR_FULL"), PLAIN_RGB)
    np.testing.assert_allclose(colour[:, 0, 0], [1, 0, 0], atol=0.01)


def test_palette_colour_maps_indices_through_its_lut() -> None:
    indices = np.array([[0, 1, 2, 3]] * 4, dtype=np.uint8)
    ds = _dataset(indices, PhotometricInterpretation="PALETTE COLOR")
    red, green, blue = (np.zeros(256, dtype=np.uint16) for _ in range(3))
    red[1], green[2], blue[3] = 65535, 65535, 32768
    for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", lut.tobytes())
    colour = _clean(ds, PLAIN_RGB)
    np.testing.assert_allclose(colour[:, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(colour[:, 0, 2], [0, 1, 0])
    np.testing.assert_allclose(colour[:, 0, 3], [0, 0, 32768 / 65535], atol=1e-6)
    np.testing.assert_allclose(_clean(ds)[0, 0], [0, 0.299, 0.587, 0.114 * 32768 / 65535])


def test_grayscale_is_replicated_for_a_three_channel_model() -> None:
    ds = _dataset(_ramp())
    gray = _clean(ds)
    colour = _clean(ds, PLAIN_RGB)
    assert colour.shape == (3, 4, 4)
    for channel in colour:
        np.testing.assert_array_equal(channel, gray[0])


def test_normalisation_is_per_channel() -> None:
    imagenet = ImageInput(4, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    normalised = _clean(_dataset(_primaries()), imagenet)
    unit = _clean(_dataset(_primaries()), PLAIN_RGB)
    mean = np.array(imagenet.mean)[:, None, None]
    std = np.array(imagenet.std)[:, None, None]
    np.testing.assert_allclose(normalised, (unit - mean) / std, rtol=1e-6)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(
        normalised[:, 0, 0], (np.array([1, 0, 0]) - mean[:, 0, 0]) / std[:, 0, 0], rtol=1e-6
    )


# ------------------------------------------------------------------- VOI and LUTs ---


def test_the_sites_window_is_exact_and_overrides_the_files_lut() -> None:
    ds = _dataset(_ramp(), WindowCenter=0, WindowWidth=10)
    ds.VOILUTSequence = Sequence([Dataset()])
    ds.VOILUTSequence[0].LUTDescriptor = [4, 0, 8]
    ds.VOILUTSequence[0].LUTData = [0, 0, 0, 0]
    image = _clean(ds, window_center=750.0, window_width=1500.0)
    expected = np.clip((_ramp() - 0.0) / 1500.0, 0, 1)
    np.testing.assert_allclose(image[0], expected, atol=1e-6)


def test_a_voi_lut_sequence_is_applied_and_preferred_to_the_window() -> None:
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    ds = _dataset(stored, WindowCenter=100, WindowWidth=10)
    item = Dataset()
    item.LUTDescriptor = [8, 4, 8]  # 8 entries from stored value 4, 8-bit output
    item.LUTData = [255, 200, 150, 100, 50, 25, 10, 0]  # an inverting LUT
    ds.VOILUTSequence = Sequence([item])
    image = _clean(ds)[0].ravel()
    lut = np.array(item.LUTData) / 255
    expected = lut[np.clip(np.arange(16) - 4, 0, 7)]  # below / above: first / last entry
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_a_voi_lut_stored_as_ow_bytes_is_read_in_the_files_byte_order(tmp_path: Path) -> None:
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    ds = _dataset(stored)
    item = Dataset()
    item.LUTDescriptor = [16, 0, 16]
    lut = (np.arange(16, dtype=np.uint16) * 4000)[::-1].copy()
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    image = _clean(read_dicom(tmp_path / "lut.dcm"))[0].ravel()
    np.testing.assert_allclose(image, lut / 65535, atol=1e-6)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR_EXACT", lambda x: np.clip((x - 250) / 1000, 0, 1)),
        ("SIGMOID", lambda x: 1 / (1 + np.exp(-4 * (x - 750) / 1000))),
        ("LINEAR", lambda x: np.where(x <= 249.5, 0, np.clip((x - 749.5) / 999 + 0.5, 0, 1))),
    ],
)
def test_the_files_window_follows_its_voi_lut_function(function: str, expected: Any) -> None:
    ds = _dataset(_ramp(), WindowCenter=750, WindowWidth=1000, VOILUTFunction=function)
    if function == "LINEAR":
        del ds.VOILUTFunction  # the default
    np.testing.assert_allclose(_clean(ds)[0], expected(_ramp().astype(float)), atol=1e-6)


def test_window_follows_the_modality_lut() -> None:
    ds = _dataset(_ramp(), RescaleSlope=2, RescaleIntercept=-1000)  # -1000 ... 2000
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 0, 2000, "LINEAR_EXACT"
    physical = _ramp() * 2.0 - 1000
    np.testing.assert_allclose(_clean(ds)[0], np.clip((physical + 1000) / 2000, 0, 1), atol=1e-6)


@pytest.mark.parametrize(
    "window",
    [
        {"WindowCenter": 100, "WindowWidth": 0.5},  # LINEAR needs a width of at least 1
        {"WindowCenter": 100, "WindowWidth": 10, "VOILUTFunction": "CUBIC"},
    ],
)
def test_a_window_pydicom_refuses_falls_back_to_min_max(window: dict[str, Any]) -> None:
    image = _clean(_dataset(_ramp(), **window))[0]
    np.testing.assert_allclose(image, _ramp() / 1500.0, atol=1e-6)


def test_monochrome1_is_inverted_after_the_voi() -> None:
    ds = _dataset(_ramp(), PhotometricInterpretation="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 750, 1500, "LINEAR_EXACT"
    np.testing.assert_allclose(_clean(ds)[0], 1 - _ramp() / 1500.0, atol=1e-6)


# ------------------------------------------------------------------ header checks ---


def test_truncation_counts_every_sample_of_every_frame() -> None:
    rgb = _dataset(_primaries())
    rgb.PixelData = rgb.PixelData[: 4 * 4 * 2]  # two samples per pixel only
    with pytest.raises(UnusableImageError, match="truncated DICOM file"):
        _clean(rgb)


def test_a_huge_frame_is_refused_before_decoding() -> None:
    side = int(MAX_FRAME_PIXELS**0.5) + 1
    ds = _dataset(_ramp(), Rows=side, Columns=side)  # 32 bytes of pixel data
    with pytest.raises(UnusableImageError, match=r"image too large \(8193 x 8193 pixels"):
        _clean(ds)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"SamplesPerPixel": 4, "PhotometricInterpretation": "CMYK"}, "unsupported image"),
        ({"PhotometricInterpretation": "RGB"}, "SamplesPerPixel = 1"),
        ({"Rows": 0}, "missing or invalid Rows"),
    ],
)
def test_unusable_headers_say_why(attributes: dict[str, Any], reason: str) -> None:
    with pytest.raises(UnusableImageError, match=reason):
        _clean(_dataset(_ramp(), **attributes))


def test_an_invalid_number_of_frames_is_not_guessed() -> None:
    ds = _dataset(_ramp())
    tag = Tag("NumberOfFrames")  # as read from a file: pydicom would not let us set it
    ds[tag] = RawDataElement(tag, "IS", 2, b"1A", 0, False, True)
    with pytest.raises(UnusableImageError, match=r"^invalid Number of Frames$"):
        _clean(ds)


def test_a_bare_dataset_without_file_meta_is_read(tmp_path: Path) -> None:
    """Older archives export datasets without the preamble and File Meta Information:
    pydicom reads them with ``force``, in the encoding it finds."""
    ds = _dataset(_ramp(), WindowCenter=750, WindowWidth=1500, VOILUTFunction="LINEAR_EXACT")
    del ds.file_meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    assert buffer.getvalue()[:2] == b"\x08\x00"  # the first element: no preamble, no meta
    path = tmp_path / "bare.dcm"
    path.write_bytes(buffer.getvalue())
    bare = read_dicom(path)
    assert "TransferSyntaxUID" not in getattr(bare, "file_meta", {})
    np.testing.assert_allclose(_clean(bare)[0], _ramp() / 1500.0, atol=1e-6)


def test_a_bare_file_that_names_no_sop_class_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "letter.dcm"
    path.write_bytes(b"Dear colleague, please find the images enclosed.\n" * 20)
    with pytest.raises(UnusableImageError, match=r"^not a DICOM file$"):
        read_dicom(path)


# ------------------------------------------------- resizing as the processor does ---


def _smooth(height: int, width: int) -> npt.NDArray[np.uint8]:
    """A smooth RGB pattern in which a crop, a stretch and a shift all look different."""
    rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = [rows, cols, 0.5 + 0.5 * np.sin(3 * rows + 2 * cols)]
    return np.round(255 * np.stack(channels, axis=-1)).astype(np.uint8)


@pytest.mark.parametrize("family", ["deit", "dinov2", "convnext"])
def test_a_scan_is_cropped_as_the_models_own_processor_crops_it(
    tmp_path: Path, family: str
) -> None:
    from transformers import BitImageProcessor, ConvNextImageProcessor, DeiTImageProcessor

    from common.tasks.image_input import image_input

    processor = {
        "deit": DeiTImageProcessor(),
        "dinov2": BitImageProcessor(
            size={"shortest_edge": 256}, crop_size=224, do_center_crop=True
        ),
        "convnext": ConvNextImageProcessor(size={"shortest_edge": 224}),
    }[family]
    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"num_channels": 3}')
    image = image_input(tmp_path)
    rgb = _smooth(300, 420)
    ours = _clean(_dataset(rgb), image)
    theirs = processor(rgb, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    # Only the interpolation kernels differ (fedlora's box/bilinear, their bicubic).
    assert float(np.abs(ours - theirs).max()) < 0.1
    stretched = ImageInput(224, 3, image.mean, image.std)
    assert float(np.abs(_clean(_dataset(rgb), stretched) - theirs).max()) > 0.3


def test_a_scan_of_extreme_aspect_is_cropped_without_a_huge_intermediate() -> None:
    """Kept-aspect resizing of one row of 4000 would be 256 x 1 024 000 pixels (3 GB):
    only the crop's own source pixels are resampled."""
    image = ImageInput(224, 3, (0.5,) * 3, (0.5,) * 3, resize=256, keep_aspect=True)
    rows, columns = image.crop_region(1, 4000)
    assert rows == slice(0, 1) and columns.stop - columns.start <= 2  # rounded outward
    assert 1999 <= columns.start <= 2000
    thin = np.zeros((1, 4000, 3), np.uint8)
    thin[0, columns] = 255
    assert _clean(_dataset(thin), image).shape == (3, 224, 224)
    assert float(_clean(_dataset(thin), image).min()) == 1.0  # the kept pixel, white
    whole = ImageInput(224, 1, (0.5,), (0.5,)).crop_region(300, 500)
    assert whole == (slice(0, 300), slice(0, 500))  # no crop: the whole scan
