"""The synthetic hospital generator: reproducible, realistic headers, learnable label."""

from __future__ import annotations

import csv
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as functional

from client.data.dicom import load_dicom_dataset
from common.config import DicomDataConfig
from common.tasks.image_input import ImageInput
from simulations.generators.dicom import write_hospital
from simulations.generators.dicom_corrupt import CORRUPT_KINDS, write_corrupt_examples

CLASSES = ["normal", "lesion"]


def _hospital(directory: Path, **overrides: Any) -> int:
    arguments: dict[str, Any] = {
        "patients": 10,
        "classes": CLASSES,
        "class_weights": [0.5, 0.5],
        "seed": 7,
        "modality": "CT",
    }
    arguments.update(overrides)
    return write_hospital(directory, **arguments)


def _rows(directory: Path) -> list[dict[str, str]]:
    with (directory / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _files(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    assert _hospital(tmp_path / "a") == _hospital(tmp_path / "b")
    write_corrupt_examples(tmp_path / "a", seed=7)
    write_corrupt_examples(tmp_path / "b", seed=7)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) > 10
    assert first == second

    _hospital(tmp_path / "c", seed=8)
    third = _files(tmp_path / "c")
    shared = set(first) & set(third) - {"labels.csv"}
    assert shared and all(first[name] != third[name] for name in shared)


@pytest.mark.parametrize(
    ("modality", "slope", "intercept", "window", "sop_class"),
    [
        ("CT", 1.0, -1024.0, (40.0, 400.0), "1.2.840.10008.5.1.4.1.1.2"),
        ("MR", 1.0, 0.0, (500.0, 1000.0), "1.2.840.10008.5.1.4.1.1.4"),
        ("CR", 0.5, 0.0, (1024.0, 2048.0), "1.2.840.10008.5.1.4.1.1.1"),
    ],
)
def test_headers_are_realistic(
    tmp_path: Path,
    modality: str,
    slope: float,
    intercept: float,
    window: tuple[float, float],
    sop_class: str,
) -> None:
    written = _hospital(tmp_path, modality=modality, patients=8, image_size=40)
    rows = _rows(tmp_path)
    assert len(rows) == written
    study_by_patient: dict[str, set[str]] = defaultdict(set)
    sop_instances = set()
    for row in rows:
        assert re.fullmatch(r"series-\d{2}/img-\d{6}\.dcm", row["path"])
        ds = pydicom.dcmread(tmp_path / row["path"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == sop_class == ds.SOPClassUID
        assert ds.Modality == modality
        assert re.fullmatch(r"[A-Z][a-z]+\^[A-Z][a-z]+", str(ds.PatientName))
        assert re.fullmatch(r"MRN\d{7}", ds.PatientID)
        assert re.fullmatch(r"(19|20)\d{6}", ds.PatientBirthDate)
        assert re.fullmatch(r"20\d{6}", ds.StudyDate)
        assert ds.PatientSex in ("F", "M")
        assert ds.InstitutionName and ds.BodyPartExamined
        assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (40, 40, 1)
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (slope, intercept)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == window
        assert ds.PatientID not in row["path"]
        assert str(ds.PatientName).split("^")[0] not in row["path"]
        study_by_patient[ds.PatientID].add(ds.StudyInstanceUID)
        sop_instances.add(ds.SOPInstanceUID)
    assert len(sop_instances) == written
    assert len(study_by_patient) == 8
    assert all(len(studies) == 1 for studies in study_by_patient.values())


def test_patients_have_one_to_three_images_with_one_label(tmp_path: Path) -> None:
    written = _hospital(tmp_path, patients=40)
    images: dict[str, list[str]] = defaultdict(list)
    for row in _rows(tmp_path):
        images[pydicom.dcmread(tmp_path / row["path"]).PatientID].append(row["label"])
    assert len(images) == 40
    assert sum(len(labels) for labels in images.values()) == written
    assert {len(labels) for labels in images.values()} == {1, 2, 3}
    assert all(len(set(labels)) == 1 for labels in images.values())


def test_class_weights_skew_the_labels(tmp_path: Path) -> None:
    _hospital(tmp_path / "a", patients=150, class_weights=[0.9, 0.1], image_size=8)
    _hospital(tmp_path / "b", patients=150, class_weights=[0.1, 0.9], image_size=8)
    share_a = np.mean([row["label"] == "normal" for row in _rows(tmp_path / "a")])
    share_b = np.mean([row["label"] == "normal" for row in _rows(tmp_path / "b")])
    assert share_a > 0.8 and share_b < 0.2


def test_fractions_control_multi_frame_and_monochrome1(tmp_path: Path) -> None:
    _hospital(tmp_path / "all", patients=4, multi_frame_fraction=1.0, monochrome1_fraction=1.0)
    _hospital(tmp_path / "none", patients=4, multi_frame_fraction=0.0, monochrome1_fraction=0.0)
    for row in _rows(tmp_path / "all"):
        ds = pydicom.dcmread(tmp_path / "all" / row["path"])
        assert ds.NumberOfFrames == 3 and ds.PhotometricInterpretation == "MONOCHROME1"
        frames = ds.pixel_array.astype(np.float64)
        assert frames.shape == (3, 64, 64)
        assert all(np.corrcoef(frames[0].ravel(), frame.ravel())[0, 1] > 0.9 for frame in frames)
    for row in _rows(tmp_path / "none"):
        ds = pydicom.dcmread(tmp_path / "none" / row["path"])
        assert "NumberOfFrames" not in ds and ds.PhotometricInterpretation == "MONOCHROME2"


def test_ct_values_are_hounsfield_units(tmp_path: Path) -> None:
    _hospital(tmp_path, patients=30, monochrome1_fraction=0.0, multi_frame_fraction=0.0)
    for row in _rows(tmp_path)[:20]:
        ds = pydicom.dcmread(tmp_path / row["path"])
        hu = ds.pixel_array.astype(np.float64) + float(ds.RescaleIntercept)
        centre = hu[24:40, 24:40]
        assert hu[0, 0] < -900  # air
        if row["label"] == "normal":
            assert 0 < np.median(centre) < 80  # soft tissue around 40 HU
            assert hu.max() < 150
        else:
            assert hu.max() > 300  # the lesion: about +300 HU over soft tissue


def test_learnable_by_a_simple_feature_after_loading(tmp_path: Path) -> None:
    """Max of a 3x3 mean filter, threshold fitted on one half, scored on the other."""
    for modality in ("CT", "MR", "CR"):
        directory = tmp_path / modality
        _hospital(directory, patients=60, modality=modality, seed=21)
        config = DicomDataConfig(format="dicom", path=directory, classes=CLASSES)
        data = load_dicom_dataset(config, b"salt", ImageInput(32, 1, (0.5,), (0.5,)))
        pixels = torch.from_numpy(data.features["pixel_values"])
        feature = functional.avg_pool2d(pixels, 3, stride=1).amax(dim=(1, 2, 3)).numpy()
        labels = data.labels
        assert 0.25 < labels.mean() < 0.75

        half = len(labels) // 2
        train_x, train_y = feature[:half], labels[:half]
        candidates = np.sort(train_x)
        accuracies = [np.mean((train_x > t) == train_y) for t in candidates]
        threshold = candidates[int(np.argmax(accuracies))]
        accuracy = np.mean((feature[half:] > threshold) == labels[half:])
        assert accuracy >= 0.95, (modality, accuracy)


def test_corrupt_examples_are_listed_once(tmp_path: Path) -> None:
    written = _hospital(tmp_path, patients=3)
    paths = write_corrupt_examples(tmp_path, seed=1, kinds=["not-dicom", "rgb", "truncated"])
    assert paths == [
        "incoming/img-900000.dcm",
        "incoming/img-900004.dcm",
        "incoming/img-900001.dcm",
    ]
    assert all((tmp_path / path).is_file() for path in paths)
    again = write_corrupt_examples(tmp_path, seed=1)
    assert len(again) == len(CORRUPT_KINDS)
    listed = [row["path"] for row in _rows(tmp_path)]
    assert len(listed) == written + len(CORRUPT_KINDS) == len(set(listed))
    assert {row["label"] for row in _rows(tmp_path)} <= set(CLASSES)

    with pytest.raises(ValueError, match="unknown corrupt kinds"):
        write_corrupt_examples(tmp_path, seed=1, kinds=["on-fire"])
    with pytest.raises(FileNotFoundError):
        write_corrupt_examples(tmp_path / "empty", seed=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modality": "PET"}, "modality"),
        ({"class_weights": [1.0]}, "one weight per class"),
        ({"class_weights": [0.0, 0.0]}, "not all zero"),
        ({"patients": 0}, "patients"),
        ({"monochrome1_fraction": 1.5}, "monochrome1_fraction"),
    ],
)
def test_invalid_arguments(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _hospital(tmp_path, **overrides)


def test_four_hundred_images_are_quick(tmp_path: Path) -> None:
    start = time.perf_counter()
    written = _hospital(tmp_path, patients=200)
    elapsed = time.perf_counter() - start
    assert written >= 300
    assert elapsed < 10.0  # budget is 5 s; the margin absorbs slow CI machines
