"""Hostile DICOM files: each is one rejection with a safe reason, never a crash, a
leak of header values, or an allocation the file's own header does not bound."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from client.data.dicom import (
    PIXEL_DATA_LOST,
    ends_with_pixel_data,
    preprocess_dataset,
    read_dicom,
)
from client.data.dicom_capture import UnusableImageError
from client.data.dicom_pixels import decode_frame
from client.data.dicom_streams import j2k_geometry, jpeg_geometry
from common.config import DicomDataConfig
from common.tasks.image_input import ImageInput

SECRET = "DOE^JANE^SECRET"

# An 8 x 8 16-bit RLE frame with four bytes changed: pylibjpeg-rle panics on it (a
# Rust index out of bounds, raised as pyo3's PanicException, a BaseException).
PANICKING_RLE = bytes.fromhex(
    "feff00e00400000000000000feff00e09800000002000000400000005000000000000000"
    + "00" * 52
    + "f900f900f900f900f900f900f900f9000700010203040506070708090a2e0c0d0e0f0710"
    "111213141516170718191a1b1c1d1e1f0720212223242526270728292a2b2c2d2e2f9330"
    "313233343536370738393a3b3c3d3e3f"
)


def _dataset(syntax: UID, rows: int = 8, columns: int = 8) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = SECRET, "ID-4711-SECRET"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def test_a_decoder_panic_is_one_rejection(capfd: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(RLELossless)
    ds.PixelData = PANICKING_RLE
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(UnusableImageError, match="pixel data could not be decoded"):
        decode_frame(ds)
    assert capfd.readouterr().err == ""  # no Rust panic message on the operator's console


def _jpeg_claiming(height: int, width: int) -> bytes:
    """SOI, then a baseline SOF0 segment declaring ``height`` x ``width``, 1 component."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def test_a_compressed_frame_claiming_another_size_is_refused_before_decoding() -> None:
    ds = _dataset(JPEGBaseline8Bit)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([_jpeg_claiming(65535, 65535)])
    with pytest.raises(UnusableImageError) as info:
        decode_frame(ds)
    assert info.value.reason.startswith("compressed frame is 65535 x 65535 x 1, but the header")
    assert jpeg_geometry(_jpeg_claiming(8, 8)) is not None
    assert jpeg_geometry(b"garbage") is None


def test_j2k_geometry_reads_the_siz_segment_of_a_codestream_and_a_jp2() -> None:
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, 300, 200, 44, 0, 300, 200, 0, 0, 3)
    stream = b"\xff\x4f\xff\x51" + siz + b"\x07\x01\x01" * 3
    geometry = j2k_geometry(stream)
    assert geometry is not None and (geometry.rows, geometry.columns) == (200, 256)
    assert geometry.components == 3
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x0cftypjp2 "
    jp2 += struct.pack(">I", 8 + len(stream)) + b"jp2c" + stream
    assert j2k_geometry(jp2) == geometry
    assert j2k_geometry(b"\xff\x4f\xff\x52" + siz) is None


def test_an_unknown_transfer_syntax_is_not_quoted() -> None:
    ds = _dataset(UID("1.2.3." + "4711"))
    ds.PixelData = np.zeros(64, np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = UID(SECRET)
    with pytest.raises(UnusableImageError) as info:
        decode_frame(ds)
    assert "SECRET" not in info.value.reason and "(unknown UID)" in info.value.reason


def test_an_undefined_photometric_interpretation_is_not_quoted() -> None:
    ds = _dataset(ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = "JANE DOE"
    ds.PixelData = np.zeros(64, np.uint16).tobytes()
    with pytest.raises(UnusableImageError) as info:
        decode_frame(ds)
    assert "JANE" not in info.value.reason and "not a defined term" in info.value.reason


def _saved_with_pixels(tmp_path: Path) -> tuple[Path, bytes]:
    ds = _dataset(ExplicitVRLittleEndian)
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, path.read_bytes()


def test_a_damaged_length_that_hides_the_pixels_is_a_corrupt_header(tmp_path: Path) -> None:
    path, data = _saved_with_pixels(tmp_path)
    columns = data.index(b"\x28\x00\x11\x00US")  # (0028,0011) Columns, 2-byte length
    pixels = data.index(b"\xe0\x7f\x10\x00OB") if b"\xe0\x7f\x10\x00OB" in data else None
    pixels = pixels if pixels is not None else data.index(b"\xe0\x7f\x10\x00OW")
    swallow = pixels + 12 - (columns + 8)  # Columns' value now runs past the Pixel Data tag
    path.write_bytes(data[: columns + 6] + struct.pack("<H", swallow) + data[columns + 8 :])
    with pytest.raises(UnusableImageError) as info:
        read_dicom(path)
    assert info.value.reason == PIXEL_DATA_LOST
    header_only = _dataset(ExplicitVRLittleEndian)  # a header-only export says what it is
    header_only.save_as(path, enforce_file_format=True)
    with pytest.raises(UnusableImageError, match=r"^no Pixel Data"):
        decode_frame(read_dicom(path))


def test_only_a_pixel_data_element_that_ends_the_file_counts_as_hidden() -> None:
    explicit = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 4) + b"\x01\x02\x03\x04"
    assert ends_with_pixel_data(b"header" + explicit, implicit=False, little=True)
    padding = b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<I", 2) + b"\x00\x00"
    assert ends_with_pixel_data(b"h" + explicit + padding, implicit=False, little=True)
    # Nested (an icon in a DICOMDIR record): item delimiters and more records follow.
    nested = b"h" + explicit + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"more records"
    assert not ends_with_pixel_data(nested, implicit=False, little=True)
    # Tag-like bytes inside another payload, read as implicit VR: no length lands at the
    # end; the big-endian tag in a little-endian file is not the tag.
    payload = b"%PDF" + b"\xe0\x7f\x10\x00" + b"\x00" * 100 + b"\x7f\xe0\x00\x10" + b"%%EOF"
    assert not ends_with_pixel_data(payload, implicit=True, little=True)
    big = b"\x7f\xe0\x00\x10OB\x00\x00" + struct.pack(">I", 2) + b"\x00\x00"
    assert ends_with_pixel_data(big, implicit=False, little=False)
    assert not ends_with_pixel_data(big, implicit=False, little=True)
    encapsulated = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"fragments"
    assert ends_with_pixel_data(
        encapsulated + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", implicit=False, little=True
    )
    assert not ends_with_pixel_data(encapsulated, implicit=False, little=True)


def test_a_file_packed_with_tag_like_bytes_is_judged_in_a_few_steps() -> None:
    data = b"\xe0\x7f\x10\x00" * (1 << 22)  # 16 MiB, four million candidates
    started = time.perf_counter()
    assert not ends_with_pixel_data(data, implicit=False, little=True)
    assert time.perf_counter() - started < 0.5  # one backward search per candidate read


def test_an_element_of_unknown_vr_is_one_rejection(tmp_path: Path) -> None:
    path, data = _saved_with_pixels(tmp_path)
    columns = data.index(b"\x28\x00\x11\x00US")
    path.write_bytes(data[: columns + 4] + b"U%" + data[columns + 6 :])
    image = ImageInput(size=8, channels=1, mean=(0.5,), std=(0.5,))
    config = DicomDataConfig(format="dicom", path=tmp_path, classes=["a", "b"])
    with pytest.raises(UnusableImageError, match=r"^unreadable DICOM file \(corrupt header\)"):
        preprocess_dataset(read_dicom(path), config, image)


def test_a_rescale_wider_than_float64_still_gives_a_finite_image() -> None:
    """Slope 1e308 on ±1: min-max over a range float64 cannot hold must not be NaN."""
    ds = _dataset(ExplicitVRLittleEndian)
    ds.PixelRepresentation = 1
    ds.PixelData = np.array([-1, 1] * 32, dtype=np.int16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "1e308", "0"
    image = ImageInput(size=8, channels=1, mean=(0.5,), std=(0.5,))
    config = DicomDataConfig(format="dicom", path=Path("."), classes=["a", "b"])
    values = preprocess_dataset(ds, config, image)
    assert np.isfinite(values).all() and values.min() == -1.0 and values.max() == 1.0


@pytest.mark.parametrize("change", ["depth 32", "depth 0", "short table", "depths differ"])
def test_a_palette_whose_descriptor_lies_is_refused(change: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    image = ImageInput(size=8, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    config = DicomDataConfig(format="dicom", path=Path("."), classes=["a", "b"])
    assert np.isfinite(preprocess_dataset(ds, config, image)).all()  # as it is: usable
    entries = int(ds.RedPaletteColorLookupTableDescriptor[0])
    for colour in ("Red", "Green", "Blue"):
        if change.startswith("depth "):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, int(change[6:])])
        elif change == "short table":
            table = f"{colour}PaletteColorLookupTableData"
            setattr(ds, table, getattr(ds, table)[: entries // 2])
    if change == "depths differ":
        ds.BluePaletteColorLookupTableDescriptor = [entries, 0, 8]
    with pytest.raises(UnusableImageError, match=r"^invalid Palette Color Lookup Table Desc"):
        preprocess_dataset(ds, config, image)


@pytest.mark.parametrize("bits", [12, 65535])
def test_bits_allocated_that_no_decoder_reads_is_named_not_called_truncation(bits: int) -> None:
    ds = _dataset(ExplicitVRLittleEndian)
    ds.BitsAllocated = bits
    ds.PixelData = np.zeros(64, np.uint16).tobytes()
    with pytest.raises(UnusableImageError, match=f"^Bits Allocated {bits} is not 1 or a mul"):
        decode_frame(ds)


def test_a_deflate_bomb_is_refused_before_it_is_inflated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("client.data.dicom.MAX_INFLATED_BYTES", 1 << 20)
    ds = _dataset(DeflatedExplicitVRLittleEndian, rows=1024, columns=1024)
    ds.PixelData = np.zeros(1 << 20, np.uint16).tobytes()  # 2 MiB of zeros: tiny deflated
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1 << 16
    with pytest.raises(UnusableImageError, match="deflated dataset inflates to over"):
        read_dicom(path)
    monkeypatch.setattr("client.data.dicom.MAX_INFLATED_BYTES", 1 << 30)
    assert read_dicom(path).Rows == 1024  # the same file under the real limit is read
