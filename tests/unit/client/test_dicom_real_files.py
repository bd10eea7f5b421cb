"""Real DICOM files, from pydicom's own test corpus: every compressed transfer syntax
it ships a sample of decodes at a site, colour and palette images become the model's
channels, and every file of the corpus is accounted for (used, or rejected with a reason).

The files are read from the installed package (``pydicom/data/test_files``), never
downloaded. Run this module (``python -m tests.unit.client.test_dicom_real_files``) to
print the corpus figure the README quotes.
"""

from __future__ import annotations

import csv
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID

from client.data import SiteData
from client.data.dicom import load_dicom_dataset, preprocess_dataset, read_dicom
from common.config import DicomDataConfig
from common.data_config import PersonKey
from common.tasks.image_input import ImageInput

SAMPLES = Path(pydicom.data.__file__).parent / "test_files"
SALT = b"corpus"
GRAY = ImageInput(32, 1, (0.0,), (1.0,))
"""Unnormalised, so values are the cleaned [0, 1] image."""
RGB = ImageInput(32, 3, (0.0,) * 3, (1.0,) * 3)

# One sample per syntax (and colour space) a site must decode: name -> transfer syntax.
SYNTAX_SAMPLES = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline, YBR_FULL_422
    "examples_ybr_color.dcm": "1.2.840.10008.1.2.4.50",  # 30 frames, YBR_FULL_422
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG Extended, 12 bit
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "GDCMJ2K_TextGBR.dcm": "1.2.840.10008.1.2.4.90",  # YBR_RCT colour
    "693_J2KI.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
    "SC_rgb_rle_16bit_2frame.dcm": "1.2.840.10008.1.2.5",
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",
    "liver_1frame.dcm": "1.2.840.10008.1.2.1",  # 1 bit
    "rtdose.dcm": "1.2.840.10008.1.2",  # 32 bit, 15 frames
}
KNOWN_UNDECODABLE = {
    # pydicom's own tests decode these with GDCM only (not a pinned plugin).
    "JPEG-lossy.dcm": "pixel data could not be decoded (JPEG Extended (Process 2 and 4)): "
    "pylibjpeg: libjpeg error code '-1038'",
    # Its SIZ segment is broken (a sequence delimiter inside it): refused before decoding.
    "JPEG2000-embedded-sequence-delimiter.dcm": "compressed frame is 1024 x 3722445056 x 1, "
    "but the header says 1024 x 256 x 1",
}


def _config(path: Path, person_key: PersonKey = "file") -> DicomDataConfig:
    return DicomDataConfig(format="dicom", path=path, classes=["a", "b"], person_key=person_key)


def _site_folder(directory: Path, names: list[str] | None = None) -> list[str]:
    """A site's data folder holding copies of the corpus (or of ``names``), all
    labelled ``a``; returns the records listed."""
    if names is None:
        shutil.copytree(SAMPLES, directory)
        records = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))
        records = [r for r in records if (directory / r).is_file()]
    else:
        directory.mkdir()
        for name in names:
            shutil.copy(SAMPLES / name, directory / name)
        records = sorted(names)
    with (directory / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((record, "a") for record in records)
    return records


def _clean(name: str, image: ImageInput = GRAY) -> np.ndarray:
    return preprocess_dataset(read_dicom(SAMPLES / name), _config(SAMPLES), image)


# ------------------------------------------------------------- transfer syntaxes ---


def test_the_samples_are_the_syntaxes_they_are_said_to_be() -> None:
    for name, syntax in SYNTAX_SAMPLES.items():
        assert read_dicom(SAMPLES / name).file_meta.TransferSyntaxUID == syntax, name


def test_every_sample_syntax_decodes_at_a_site(tmp_path: Path) -> None:
    records = _site_folder(tmp_path / "site", list(SYNTAX_SAMPLES))
    data = load_dicom_dataset(_config(tmp_path / "site"), SALT, RGB)
    assert data.rejected == []
    assert data.accepted == len(records)
    pixels = data.features["pixel_values"]
    assert pixels.shape == (len(records), 3, 32, 32)
    assert np.all(np.isfinite(pixels)) and pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert np.all(pixels.std(axis=(1, 2, 3)) > 0.01)  # no image came out blank


def test_every_compressed_syntax_pydicom_ships_a_sample_of_decodes() -> None:
    """Any compressed (or deflated) syntax in the corpus has a sample that decodes, and
    a sample that does not is one of the two pydicom itself decodes with GDCM only."""
    decoded: set[UID] = set()
    shipped: dict[UID, list[str]] = {}
    for path in sorted(SAMPLES.glob("*.dcm")):
        try:
            ds = read_dicom(path)
            syntax = UID(ds.file_meta.TransferSyntaxUID)
        except Exception:  # no meta, not DICOM: not a sample of a syntax
            continue
        if "PixelData" not in ds:  # a header-only file is no sample of its syntax
            continue
        if not (syntax.is_compressed or syntax.is_deflated):
            continue
        shipped.setdefault(syntax, []).append(path.name)
        try:
            _clean(path.name)
        except Exception as exc:
            assert path.name in KNOWN_UNDECODABLE, (path.name, exc)
            assert str(getattr(exc, "reason", exc)).startswith(KNOWN_UNDECODABLE[path.name])
            continue
        decoded.add(syntax)
    assert len(shipped) >= 9  # Baseline, Extended, Lossless, 2 x JPEG-LS, 2 x J2K, RLE, deflate
    assert {syntax.name for syntax in shipped if syntax not in decoded} == set()


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_twins_give_the_same_image(twin: str) -> None:
    np.testing.assert_array_equal(_clean(twin), _clean("MR_small.dcm"))


def test_a_multi_frame_colour_file_uses_its_middle_frame() -> None:
    """30 YBR frames of 240 x 320: the cleaned image is frame 15, box-averaged to 80 x 80
    (blocks of 3 x 4 pixels), in RGB scaled to [0, 1]."""
    path = SAMPLES / "examples_ybr_color.dcm"
    cleaned = preprocess_dataset(
        read_dicom(path), _config(SAMPLES), ImageInput(80, 3, (0.0,) * 3, (1.0,) * 3)
    )

    def boxed(index: int) -> np.ndarray:
        frame = pydicom.pixels.pixel_array(path, index=index).astype(np.float64) / 255
        return np.moveaxis(frame.reshape(80, 3, 80, 4, 3).mean(axis=(1, 3)), -1, 0)

    np.testing.assert_allclose(cleaned, boxed(15), atol=1e-5)
    assert np.abs(cleaned - boxed(0)).mean() > 1e-3  # the frames differ: it is frame 15


# ------------------------------------------------------------------------- colour ---


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
)
def test_colour_becomes_the_models_channels(name: str) -> None:
    colour = _clean(name, RGB)
    gray = _clean(name, GRAY)
    assert colour.shape == (3, 32, 32) and gray.shape == (1, 32, 32)
    luma = np.tensordot([0.299, 0.587, 0.114], colour, axes=1)
    np.testing.assert_allclose(gray[0], luma, atol=1e-5)  # resizing is linear
    assert np.abs(colour[0] - colour[2]).mean() > 0.05  # really colour, not gray


def test_ybr_and_higher_bit_depths_match_their_rgb_twin() -> None:
    """pydicom converts YBR to RGB; values are scaled by their bit depth."""
    reference = _clean("SC_rgb_rle.dcm", RGB)
    for name in ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_gdcm_KY.dcm"):
        np.testing.assert_allclose(_clean(name, RGB), reference, atol=1e-6, err_msg=name)
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        assert np.abs(_clean(name, RGB) - reference).mean() < 0.01, name


def test_palette_colour_goes_through_its_lookup_table() -> None:
    ds = read_dicom(SAMPLES / "examples_palette.dcm")
    side = 64
    expected_rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64) / 65535  # 16-bit LUT
    cleaned = preprocess_dataset(ds, _config(SAMPLES), ImageInput(side, 3, (0.0,) * 3, (1.0,) * 3))
    gray = preprocess_dataset(ds, _config(SAMPLES), ImageInput(side, 1, (0.0,), (1.0,)))
    assert cleaned.shape == (3, side, side) and gray.shape == (1, side, side)
    # Box-averaged to 64 x 64: the channel means are those of the full-size RGB image.
    np.testing.assert_allclose(cleaned.mean(axis=(1, 2)), expected_rgb.mean(axis=(0, 1)), atol=2e-3)
    np.testing.assert_allclose(gray[0], np.tensordot([0.299, 0.587, 0.114], cleaned, 1), atol=1e-5)


# ------------------------------------------------------------------ corpus figure ---


def corpus_figure(directory: Path, person_key: PersonKey) -> tuple[int, SiteData]:
    """(files listed, the site's data) for a copy of the whole corpus in ``directory``."""
    records = _site_folder(directory)
    return len(records), load_dicom_dataset(_config(directory, person_key), SALT, GRAY)


def test_every_corpus_file_is_used_or_rejected_with_a_reason(tmp_path: Path) -> None:
    files, data = corpus_figure(tmp_path / "corpus", "file")
    assert data.accepted + len(data.rejected) == files == 176
    reasons = {r.record: r.reason for r in data.rejected}
    assert data.accepted == 89, Counter(reasons.values())
    assert all(0 < len(reason) <= 200 for reason in reasons.values())
    for name, start in KNOWN_UNDECODABLE.items():
        assert reasons[name].startswith(start)
    assert reasons["MR_truncated.dcm"].startswith("truncated DICOM file")
    assert reasons["badVR.dcm"] == "invalid Number of Frames"
    assert reasons["README.txt"] == "not a DICOM file"
    assert reasons["rtplan.dcm"] == "no Pixel Data (RT Plan Storage)"
    # Bare datasets without the DICM preamble are read (and are header-only here).
    assert reasons["ExplVR_LitEndNoMeta.dcm"].startswith("no Pixel Data")
    kinds = Counter(reason.split(" (")[0].split(":")[0] for reason in reasons.values())
    assert kinds == {
        "no Pixel Data": 71,  # reports, plans, DICOMDIRs, header-only test files
        "not a DICOM file": 10,
        "missing or invalid Rows, Columns or BitsAllocated": 2,
        "pixel data could not be decoded": 1,
        "compressed frame is 1024 x 3722445056 x 1, but the header says 1024 x 256 x 1": 1,
        "truncated DICOM file": 1,
        "invalid Number of Frames": 1,
    }


def _print_figure(person_key: PersonKey) -> None:  # pragma: no cover - a report
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        files, data = corpus_figure(Path(scratch) / "corpus", person_key)
    print(f"person_key = {person_key!r}: {data.accepted} of {files} files used")
    for reason, count in Counter(r.reason for r in data.rejected).most_common():
        print(f"  {count:3d} x {reason}")


if __name__ == "__main__":  # pragma: no cover
    for key in sys.argv[1:] or ["patient", "file"]:
        _print_figure(key)  # type: ignore[arg-type]
