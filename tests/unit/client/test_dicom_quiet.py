"""What pydicom and its plugins say about odd files stays off the console: it is
captured per file and becomes the (short, scrubbed) reason when a file is rejected."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom.dataset import Dataset

from client.data.dicom import load_dicom_dataset
from client.data.dicom_capture import CAPTURED_LOGGERS, Capture, captured, reason, scrub
from client.data.kinds import kind_of
from client.predict import dicom_records
from common.config import DicomDataConfig
from common.tasks.image_input import ImageInput
from simulations.generators.dicom import write_hospital
from simulations.generators.dicom_corrupt import write_corrupt_examples

SAMPLES = Path(pydicom.data.__file__).parent / "test_files"
OURS = ("DICOM records were rejected", "DICOM data: accepted")
"""The loader's own log lines (counts only): the one thing allowed on the console."""


def _library_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name.split(".")[0] in CAPTURED_LOGGERS and record.levelno >= logging.WARNING
    ]


def test_capture_collects_logs_and_warnings_and_restores_the_loggers(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    pydicom_logger = logging.getLogger("pydicom")
    handlers, propagate = list(pydicom_logger.handlers), pydicom_logger.propagate
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with captured() as capture:
            logging.getLogger("pydicom.pixels").warning("a log line")
            logging.getLogger("PIL.Image").error("an error")
            warnings.warn("a warning", UserWarning, stacklevel=1)
            with captured() as nested:  # one file's steps share one capture
                logging.getLogger("pylibjpeg").warning("nested")
            logging.getLogger("pydicom").debug("below WARNING: dropped")
    assert nested is capture
    assert capture.messages == ["a log line", "an error", "a warning", "nested"]
    assert outer == [] and _library_records(caplog) == []
    out, err = capfd.readouterr()
    assert out == err == ""
    assert pydicom_logger.handlers == handlers and pydicom_logger.propagate == propagate
    logging.getLogger("pydicom").warning("after: propagates again")
    assert [r.getMessage() for r in _library_records(caplog)] == ["after: propagates again"]


def test_reasons_name_no_value_no_path_and_stay_short() -> None:
    ds = Dataset()
    ds.PatientID = "MRN0042"
    ds.PatientName = "Doe^Jane"
    ds.AccessionNumber = "ACC991"
    said = (
        "Invalid value for VR PN: 'Doe^Jane'\n  bad element in /srv/pacs/MRN0042/img.dcm: "
        "MRN0042 ACC991; (0028,0008) 'Number of Frames' error code '-1038' b'\\x01secret'"
    )
    text = reason("pixel data could not be decoded (RLE Lossless)", Capture(), ValueError(said), ds)
    for secret in ("Doe", "Jane", "MRN0042", "ACC991", "/srv", "pacs", "secret"):
        assert secret not in text
    assert "'Number of Frames'" in text and "'-1038'" in text  # names and codes are kept
    assert "\n" not in text
    long = reason("summary", Capture(["x" * 1000]))
    assert len(long) == 200 and long.startswith("summary: xxx") and long.endswith("…")
    assert scrub("  ") == "" and reason("fixed", Capture()) == "fixed"


def _odd_folder(directory: Path) -> None:
    """pydicom's whole test corpus (reports, bare datasets, broken, compressed, colour
    files), a generated hospital and its corrupt files, all listed in labels.csv."""
    write_hospital(
        directory, patients=4, classes=["a", "b"], class_weights=[0.5, 0.5], seed=5, modality="CT"
    )
    write_corrupt_examples(directory, seed=5)
    shutil.copytree(SAMPLES, directory / "corpus")
    with (directory / "labels.csv").open("a", newline="") as handle:
        writer = csv.writer(handle)
        for path in sorted((directory / "corpus").rglob("*")):
            if path.is_file():
                writer.writerow([path.relative_to(directory).as_posix(), "a"])


def test_loading_odd_files_prints_nothing_and_logs_nothing_from_the_libraries(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "site"
    _odd_folder(folder)
    base = tmp_path / "model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"num_channels": 3, "image_size": 16}))
    config = DicomDataConfig(format="dicom", path=folder, classes=["a", "b"], person_key="file")
    image = ImageInput(16, 3, (0.5,) * 3, (0.5,) * 3)
    capfd.readouterr()

    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        data = load_dicom_dataset(config, b"salt", image)
        loaded = kind_of(config).load(config, b"salt", base)  # as ``site check`` loads
        records = dicom_records(  # as ``artifact predict --dicom`` reads a folder
            {"format": "dicom", "classes": ["a", "b"], **image.to_dict()}, folder / "corpus"
        )

    out, err = capfd.readouterr()
    console = [line for line in (out + err).splitlines() if line.strip()]
    assert [line for line in console if not any(ours in line for ours in OURS)] == []
    assert "Traceback" not in out + err
    assert leaked == []
    assert _library_records(caplog) == []
    # The libraries did speak, and what they said became reasons:
    assert any("pylibjpeg:" in r.reason for r in data.rejected)
    assert loaded.data.rejected == data.rejected
    assert len(records.skipped) > 50 and len(records.names) > 80
    assert all(len(r.reason) <= 200 for r in data.rejected + records.skipped)
