"""The DICOM loader: cleaning steps, rejections, person grouping and privacy of logs."""

from __future__ import annotations

import csv
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.data import SiteData, person_key
from client.data.dicom import (
    UnusableImageError,
    load_dicom_dataset,
    preprocess_dataset,
    preprocess_file,
)
from client.data.dicom_labels import UNCHECKABLE
from common.config import DicomDataConfig
from common.errors import DataError
from common.tasks.image_input import ImageInput
from simulations.generators.dicom import write_hospital
from simulations.generators.dicom_corrupt import CORRUPT_KINDS, write_corrupt_examples

CLASSES = ["normal", "lesion"]
SALT = b"test-salt"


def _config(path: Path, **overrides: Any) -> DicomDataConfig:
    return DicomDataConfig(format="dicom", path=path, classes=CLASSES, **overrides)


def _image(size: int = 32) -> ImageInput:
    """The demo bases' input: one channel, mean 0.5, std 0.5."""
    return ImageInput(size, 1, (0.5,), (0.5,))


def _load(config: DicomDataConfig, size: int = 32, salt: bytes = SALT) -> SiteData:
    return load_dicom_dataset(config, salt, _image(size))


def _hospital(directory: Path, patients: int = 12, seed: int = 1, **kwargs: Any) -> int:
    return write_hospital(
        directory,
        patients=patients,
        classes=CLASSES,
        class_weights=[0.5, 0.5],
        seed=seed,
        modality=kwargs.pop("modality", "CT"),
        **kwargs,
    )


def _labels(directory: Path) -> list[dict[str, str]]:
    with (directory / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_labels(directory: Path, rows: list[tuple[str, str]]) -> None:
    with (directory / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


def _write_image(
    path: Path,
    stored: npt.NDArray[np.integer],
    *,
    patient_id: str | None = "MRN0000001",
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
) -> None:
    """A minimal uncompressed 16-bit file; ``stored`` is [R, C] or [F, R, C]."""
    frames = stored.shape[0] if stored.ndim == 3 else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if patient_id is not None:
        ds.PatientID = patient_id
        ds.PatientName = "Tester^Tina"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _ramp(rows: int = 8, columns: int = 8) -> npt.NDArray[np.uint16]:
    return (np.arange(rows * columns, dtype=np.uint16) * 10).reshape(rows, columns)


def _expected(physical: npt.NDArray[np.floating], center: float, width: float) -> Any:
    """The site's window: LINEAR_EXACT, exactly [center - width/2, center + width/2]."""
    windowed = np.clip((physical - (center - width / 2)) / width, 0.0, 1.0)
    return (windowed - 0.5) / 0.5


def _expected_linear(physical: npt.NDArray[np.floating], center: float, width: float) -> Any:
    """A file's window, VOI LUT Function LINEAR (PS3.3 C.11.2.1.2.1): center - 0.5 and
    width - 1, values at or below the bottom edge are 0."""
    center, width = center - 0.5, width - 1
    windowed = np.clip((physical - center) / width + 0.5, 0.0, 1.0)
    windowed = np.where(physical <= center - width / 2, 0.0, windowed)
    return (windowed - 0.5) / 0.5


def _single(directory: Path, **config: Any) -> SiteData:
    _write_labels(directory, [("a.dcm", "normal")])
    size = config.pop("size", 8)
    return _load(_config(directory, **config), size)


def _identifiers(directory: Path) -> dict[str, tuple[str, str]]:
    """Relative path -> (PatientID, PatientName), read straight from the files."""
    result = {}
    for row in _labels(directory):
        if row["path"].startswith("incoming/"):  # the deliberately broken files
            continue
        ds = pydicom.dcmread(directory / row["path"])
        result[row["path"]] = (str(ds.PatientID), str(ds.PatientName))
    return result


# ------------------------------------------------------------- generated sites ---


def test_generated_hospital_loads_with_shapes_labels_and_person_keys(tmp_path: Path) -> None:
    written = _hospital(tmp_path, patients=15)
    data = _load(_config(tmp_path), 16)

    pixels = data.features["pixel_values"]
    assert data.accepted == written
    assert pixels.shape == (written, 1, 16, 16)
    assert pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() == pytest.approx(-1.0)  # air is below the window
    assert data.rejected == []
    assert data.classes == CLASSES

    rows = sorted(_labels(tmp_path), key=lambda row: row["path"])
    assert data.labels.tolist() == [CLASSES.index(row["label"]) for row in rows]

    identifiers = _identifiers(tmp_path)
    raw_ids = [identifiers[row["path"]][0] for row in rows]
    assert data.persons == len(set(raw_ids)) == 15
    assert data.person_keys == [person_key(raw, SALT) for raw in raw_ids]
    assert any(raw_ids.count(raw) > 1 for raw in raw_ids)  # some share a key
    for i, j in [(i, j) for i in range(len(rows)) for j in range(len(rows))]:
        assert (data.person_keys[i] == data.person_keys[j]) == (raw_ids[i] == raw_ids[j])


def test_no_raw_patient_identifiers_in_site_data(tmp_path: Path) -> None:
    _hospital(tmp_path, patients=10)
    write_corrupt_examples(tmp_path, seed=1)
    data = _load(_config(tmp_path))

    text = repr(data) + "".join(
        repr(getattr(data, field.name)) for field in dataclasses.fields(data)
    )
    text += "".join(data.person_keys) + "".join(r.reason + r.record for r in data.rejected)
    identifiers = _identifiers(tmp_path)
    assert identifiers
    for patient_id, patient_name in identifiers.values():
        assert patient_id not in text
        assert patient_name.split("^")[0] not in text
        assert patient_id.removeprefix("MRN") not in text


def test_different_salt_gives_different_keys(tmp_path: Path) -> None:
    _hospital(tmp_path, patients=4)
    first = _load(_config(tmp_path), salt=b"salt-a")
    second = _load(_config(tmp_path), salt=b"salt-b")
    assert set(first.person_keys).isdisjoint(second.person_keys)


def test_record_order_does_not_depend_on_labels_file_order(tmp_path: Path) -> None:
    _hospital(tmp_path, patients=8)
    before = _load(_config(tmp_path))
    rows = [(row["path"], row["label"]) for row in reversed(_labels(tmp_path))]
    _write_labels(tmp_path, rows)
    after = _load(_config(tmp_path))
    assert after.person_keys == before.person_keys
    assert after.labels.tolist() == before.labels.tolist()
    np.testing.assert_array_equal(after.features["pixel_values"], before.features["pixel_values"])


@pytest.mark.parametrize("modality", ["CT", "MR", "CR"])
def test_monochrome1_files_look_like_their_monochrome2_twins(tmp_path: Path, modality: str) -> None:
    """The generator stores MONOCHROME1 inverted; the loader must undo exactly that."""
    _hospital(tmp_path / "m2", patients=5, modality=modality, monochrome1_fraction=0.0)
    _hospital(tmp_path / "m1", patients=5, modality=modality, monochrome1_fraction=1.0)
    plain, inverted = (
        np.asarray(_load(_config(tmp_path / name)).features["pixel_values"])
        for name in ("m2", "m1")
    )
    assert np.abs(plain - inverted).max() < 0.02
    assert plain.std() > 0.3  # not trivially equal (e.g. all black)


# ------------------------------------------------------------------- rejections ---


def test_each_corrupt_kind_is_rejected_and_the_rest_still_load(tmp_path: Path) -> None:
    written = _hospital(tmp_path, patients=10)
    corrupt = dict(zip(CORRUPT_KINDS, write_corrupt_examples(tmp_path, seed=2), strict=True))
    (tmp_path / "notes.txt").write_text("not listed in labels.csv, so ignored")

    data = _load(_config(tmp_path))

    # The generator's RGB secondary capture is a usable colour image now (as luma).
    assert data.accepted == written + 1
    broken = {kind: path for kind, path in corrupt.items() if kind != "rgb"}
    reasons = {rejection.record: rejection.reason for rejection in data.rejected}
    assert sorted(reasons) == sorted(broken.values())
    assert reasons[broken["not-dicom"]] == "not a DICOM file"
    assert reasons[broken["truncated"]] == (
        "truncated DICOM file (pixel data shorter than the image needs)"
    )
    assert reasons[broken["no-pixel-data"]] == "no Pixel Data (CT Image Storage)"
    # A JPEG-LS stream of garbage: refused before the decoder sizes anything from it.
    assert reasons[broken["compressed"]] == "compressed frame header cannot be read"
    assert reasons[broken["no-patient-id"]].startswith("missing PatientID (de-identified?")
    assert [r.record for r in data.rejected] == sorted(broken.values())


def test_label_problems_are_rejections(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.dcm", _ramp())
    _write_image(tmp_path / "b.dcm", _ramp())
    (tmp_path.parent / "outside.dcm").write_bytes(b"")
    _write_labels(
        tmp_path,
        [
            ("a.dcm", "normal"),
            ("b.dcm", "tumour"),
            ("gone.dcm", "lesion"),
            ("../outside.dcm", "lesion"),
            ("./a.dcm", "lesion"),
            ("x" * 300 + ".dcm", "lesion"),  # a name the system refuses: one row, not the load
        ],
    )
    data = _load(_config(tmp_path), 8)
    assert data.accepted == 1
    assert {(r.record, r.reason) for r in data.rejected} == {
        ("b.dcm", "label 'tumour' is not one of the configured classes"),
        ("gone.dcm", "file listed in the labels file does not exist"),
        ("x" * 300 + ".dcm", UNCHECKABLE),
        ("../outside.dcm", "path in the labels file points outside the data directory"),
        ("a.dcm", "listed more than once in the labels file"),
    }


def test_missing_patient_id_is_rejected(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.dcm", _ramp())
    _write_image(tmp_path / "b.dcm", _ramp(), patient_id=None)
    _write_image(tmp_path / "c.dcm", _ramp(), patient_id="   ")
    _write_labels(tmp_path, [("a.dcm", "normal"), ("b.dcm", "normal"), ("c.dcm", "lesion")])
    data = _load(_config(tmp_path), 8)
    assert data.accepted == 1
    reason = 'missing PatientID (de-identified? set data.person_key = "study" or "file")'
    assert [(r.record, r.reason) for r in data.rejected] == [("b.dcm", reason), ("c.dcm", reason)]


def test_whole_directory_problems_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _load(_config(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="contains no files"):
        _load(_config(tmp_path))
    _write_image(tmp_path / "a.dcm", _ramp())
    with pytest.raises(DataError, match=r"labels file .*labels\.csv not found"):
        _load(_config(tmp_path))
    (tmp_path / "labels.csv").write_text("file,class\na.dcm,normal\n")
    with pytest.raises(DataError, match="header row naming the columns path,label"):
        _load(_config(tmp_path))
    # Without a header, the first row is data: named by its field count, never quoted.
    (tmp_path / "labels.csv").write_text("Doe_John_4711/a.dcm,normal\n")
    with pytest.raises(DataError, match=r"first row \(2 fields\) has no path and label") as info:
        _load(_config(tmp_path))
    assert "Doe_John" not in str(info.value)
    _write_labels(tmp_path, [])
    with pytest.raises(DataError, match="lists no images"):
        _load(_config(tmp_path))


def test_all_rejected_raises_data_error_with_reason_counts(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_text("hello")
    (tmp_path / "b.dcm").write_text("world")
    _write_labels(tmp_path, [("a.dcm", "normal"), ("b.dcm", "lesion")])
    with pytest.raises(DataError, match=r"all 2 records were rejected \(2 x not a DICOM file\)"):
        _load(_config(tmp_path))


# --------------------------------------------------------------- folders labels ---


def test_folder_labels(tmp_path: Path) -> None:
    source = tmp_path / "source"
    written = _hospital(source, patients=10)
    rows = _labels(source)
    target = tmp_path / "site"
    for index, row in enumerate(rows):  # nested, to check files anywhere below count
        destination = target / row["label"] / f"batch-{index % 2}" / f"{index:04d}.dcm"
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / row["path"], destination)
    (target / "lesion" / "README.txt").write_text("a stray note")

    data = _load(_config(target, labels="folders"))

    assert data.accepted == written
    expected = {name: sum(row["label"] == name for row in rows) for name in CLASSES}
    assert data.label_counts() == expected
    assert [(r.record, r.reason) for r in data.rejected] == [
        ("lesion/README.txt", "not a DICOM file")
    ]

    shutil.rmtree(target / "lesion")
    with pytest.raises(DataError, match="class folder"):
        _load(_config(target, labels="folders"))


# ------------------------------------------------------------------- cleaning ---


def test_rescale_is_applied_before_the_file_window(tmp_path: Path) -> None:
    stored = _ramp()  # 0, 10, ..., 630
    _write_image(tmp_path / "a.dcm", stored, slope=2.0, intercept=-100.0, window=(300.0, 800.0))
    data = _single(tmp_path)
    physical = stored.astype(np.float64) * 2.0 - 100.0  # -100 ... 1160
    expected = _expected_linear(physical, 300.0, 800.0)
    np.testing.assert_allclose(data.features["pixel_values"][0, 0], expected, atol=1e-6)
    assert data.features["pixel_values"].min() == -1.0  # below -100 clips at the bottom
    assert data.features["pixel_values"].max() == 1.0  # above 700 clips at the top


def test_first_of_several_file_windows_is_used(tmp_path: Path) -> None:
    stored = _ramp()
    _write_image(tmp_path / "a.dcm", stored)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.WindowCenter, ds.WindowWidth = [100.0, 2000.0], [200.0, 5000.0]
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    image = _single(tmp_path).features["pixel_values"][0, 0]
    expected = _expected_linear(stored.astype(np.float64), 100.0, 200.0)
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_config_window_overrides_the_file_window(tmp_path: Path) -> None:
    stored = _ramp()
    _write_image(tmp_path / "a.dcm", stored, slope=1.0, intercept=-1024.0, window=(300.0, 800.0))
    data = _single(tmp_path, window_center=-800.0, window_width=200.0)
    expected = _expected(stored.astype(np.float64) - 1024.0, -800.0, 200.0)
    np.testing.assert_allclose(data.features["pixel_values"][0, 0], expected, atol=1e-6)


def test_without_any_window_min_max_is_used(tmp_path: Path) -> None:
    stored = _ramp() + 1000
    _write_image(tmp_path / "a.dcm", stored)
    image = _single(tmp_path).features["pixel_values"][0, 0]
    expected = _expected(stored.astype(np.float64), 1000.0 + 315.0, 630.0)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.min() == -1.0 and image.max() == 1.0


def test_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    stored = _ramp()
    _write_image(tmp_path / "a.dcm", stored, photometric="MONOCHROME1", window=(200.0, 400.0))
    image = _single(tmp_path).features["pixel_values"][0, 0]
    expected = -_expected_linear(stored.astype(np.float64), 200.0, 400.0)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image[0, 0] == 1.0  # the lowest stored value is the brightest in MONOCHROME1


def test_multi_frame_uses_the_middle_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), value, dtype=np.uint16) for value in (100, 300, 500)])
    frames[1, 0, 0] = 0
    # LINEAR: center - 0.5 and width - 1, so 300 sits exactly at this window's centre.
    _write_image(tmp_path / "a.dcm", frames, window=(300.5, 401.0))
    image = _single(tmp_path).features["pixel_values"][0, 0]
    assert image[0, 0] == -1.0
    assert np.all(image.ravel()[1:] == 0.0)


def test_signed_pixels_and_upscaling_of_non_square_images(tmp_path: Path) -> None:
    stored = (np.arange(6 * 10, dtype=np.int16).reshape(6, 10) - 30) * 10
    _write_image(tmp_path / "a.dcm", stored, window=(0.0, 600.0))
    image = _single(tmp_path, size=16).features["pixel_values"][0, 0]
    assert image.shape == (16, 16)
    assert image[0, 0] < -0.8 and image[-1, -1] > 0.8  # the ramp survives resizing
    assert np.all(np.diff(image.mean(axis=1)) > 0)


def test_preprocess_file_matches_the_loader_and_explains_bad_files(tmp_path: Path) -> None:
    _hospital(tmp_path, patients=3)
    write_corrupt_examples(tmp_path, seed=1, kinds=["compressed"])
    config = _config(tmp_path)
    data = _load(config, 16)
    first = sorted(row["path"] for row in _labels(tmp_path) if row["path"].startswith("series"))
    single = preprocess_file(tmp_path / first[0], config, _image(16))
    assert single.shape == (1, 16, 16) and single.dtype == np.float32
    np.testing.assert_array_equal(single, data.features["pixel_values"][0])

    ds = pydicom.dcmread(tmp_path / first[0])
    before = ds.to_json()
    np.testing.assert_array_equal(preprocess_dataset(ds, config, _image(16)), single)
    assert ds.to_json() == before  # pure: the caller's dataset is untouched

    with pytest.raises(UnusableImageError, match="compressed frame header cannot be read") as info:
        preprocess_file(tmp_path / "incoming" / "img-900003.dcm", config, _image(16))
    assert isinstance(info.value, DataError)


# ----------------------------------------------------------------------- logging ---


def test_logs_carry_counts_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _hospital(tmp_path, patients=6)
    write_corrupt_examples(tmp_path, seed=3)
    identifiers = _identifiers(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="client.data.dicom"):
        data = _load(_config(tmp_path))

    messages = [record.getMessage() for record in caplog.records]
    assert any(f"accepted {data.accepted} images" in message for message in messages)
    assert any("rejected 5" in message for message in messages)  # the RGB one is used
    text = "\n".join(messages)
    forbidden = {str(tmp_path), "img-", "series-", "incoming", ".dcm", "MRN"}
    for patient_id, patient_name in identifiers.values():
        forbidden |= {patient_id, *patient_name.split("^")}
    for needle in forbidden:
        assert needle not in text
