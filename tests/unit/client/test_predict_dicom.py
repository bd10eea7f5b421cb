"""``artifact predict --dicom``: files are cleaned as the site trained, into the base
model's input (side, channels, normalisation), also from older preprocessing records."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from client.data.dicom import preprocess_file
from client.predict import dicom_preprocessing, dicom_records, load_preprocessing
from common.config import DicomDataConfig
from common.errors import DataError
from common.tasks.image_input import ImageInput
from simulations.generators.dicom import write_hospital

IMAGENET = ImageInput(16, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("predict") / "dicom"
    write_hospital(
        directory, patients=3, classes=["a", "b"], class_weights=[0.5, 0.5], seed=2, modality="CT"
    )
    return directory


def _first(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*.dcm"))[0]


def test_the_record_holds_the_model_input_and_the_window(folder: Path) -> None:
    config = DicomDataConfig(
        format="dicom", path=folder, classes=["a", "b"], window_center=40, window_width=400
    )
    record = dicom_preprocessing(config, IMAGENET)
    assert record == {
        "format": "dicom",
        "classes": ["a", "b"],
        "image_size": 16,
        "channels": 3,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "window_center": 40,
        "window_width": 400,
    }
    json.dumps(record)  # written as preprocessing.json
    records = dicom_records(record, folder)
    pixels = records.features["pixel_values"]
    assert pixels.shape == (len(records.names), 3, 16, 16)
    expected = preprocess_file(folder / records.names[0], config, IMAGENET)
    np.testing.assert_array_equal(pixels[0], expected)


def test_an_older_record_with_only_image_size_is_the_demo_input(folder: Path) -> None:
    old: dict[str, Any] = {"format": "dicom", "classes": ["a", "b"], "image_size": 8}
    records = dicom_records(old, _first(folder))
    config = DicomDataConfig(format="dicom", path=folder, classes=["a", "b"])
    demo = ImageInput(8, 1, (0.5,), (0.5,))
    np.testing.assert_array_equal(
        records.features["pixel_values"][0], preprocess_file(_first(folder), config, demo)
    )


def test_no_usable_file_gives_an_empty_batch_of_the_models_shape(tmp_path: Path) -> None:
    (tmp_path / "note.dcm").write_text("not an image")
    records = dicom_records({"format": "dicom", "classes": None, **IMAGENET.to_dict()}, tmp_path)
    assert records.features["pixel_values"].shape == (0, 3, 16, 16)
    assert [(s.record, s.reason) for s in records.skipped] == [("note.dcm", "not a DICOM file")]
    with pytest.raises(DataError, match="no usable image input"):
        dicom_records({"format": "dicom"}, tmp_path)


def test_without_a_record_the_manifest_shape_gives_side_and_channels(tmp_path: Path) -> None:
    manifest = SimpleNamespace(inputs={"pixel_values": SimpleNamespace(shape=["n", 3, 24, 24])})
    cleaning = load_preprocessing(tmp_path, manifest, None)  # type: ignore[arg-type]
    assert ImageInput.from_dict(cleaning) == ImageInput(24, 3, (0.5,) * 3, (0.5,) * 3)
    manifest.inputs["pixel_values"].shape = ["n", 1, 32, 32]
    cleaning = load_preprocessing(tmp_path, manifest, None)  # type: ignore[arg-type]
    assert ImageInput.from_dict(cleaning) == ImageInput(32, 1, (0.5,), (0.5,))
