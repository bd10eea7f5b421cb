"""Real public datasets that ship inside PyPI packages, written as a site would hold them.

Nothing is downloaded: scikit-learn bundles these tables and images in its wheel.

- tables: Wisconsin breast cancer (scikit-learn; 569 people, 30 numeric features,
  binary) and the 1996 American National Election Study (statsmodels' ``anes96``; 944
  people, 10 numeric features, party identification on a 7-point scale), written as
  CSV with one row per person;
- images: the UCI handwritten digits (1,797 images of 8 × 8 pixels, 10 classes), each
  written as a real DICOM file (Secondary Capture, MONOCHROME2, 8 bits) with its own
  patient, and a ``labels.csv``.

The public feature bounds a federation would declare in its schema are taken here as
the range of each column over the whole published table, rounded outward: that range
is part of the dataset's public description, not a statistic of any one site. The
digits' intensity window (0–16) is likewise the dataset's documented value range.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

DIGITS_WINDOW = (8.0, 16.0)
"""Window center and width of the digits: their documented values 0–16."""


@dataclass(frozen=True)
class RealDataset:
    name: str
    task: str
    classes: list[str]
    whole_config: Path
    """A site config whose [data] describes the whole dataset (the split's source)."""
    records: int


def _rounded_bounds(values: pd.Series) -> tuple[float, float]:
    """[low, high] of a column, rounded outward to two significant digits of its range."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low - 1.0, high + 1.0
    step = 10 ** math.floor(math.log10(high - low) - 1)
    return math.floor(low / step) * step, math.ceil(high / step) * step


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def _site_header(task: str, kind: str) -> list[str]:
    return [
        "[site]",
        'id = "whole"',
        f'kind = "{kind}"',
        f'task = "{task}"',
        'base_model = "base"',
        "[privacy]",
        "epsilon = 8.0",
        "delta = 1e-5",
        "[policy]",
        "min_cohort = 20",
    ]


PARTIES = (
    "strong-democrat",
    "weak-democrat",
    "independent-democrat",
    "independent",
    "independent-republican",
    "weak-republican",
    "strong-republican",
)
"""anes96's PID codes 0-6, in order."""


def _breast_cancer() -> tuple[pd.DataFrame, list[str], list[str]]:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.copy()
    features = [str(column).replace(" ", "_") for column in bunch.feature_names]
    frame.columns = [*features, "target"]
    classes = [str(value) for value in bunch.target_names]
    frame["target"] = [classes[int(value)] for value in frame["target"]]
    return frame, features, classes


def _anes96() -> tuple[pd.DataFrame, list[str], list[str]]:
    from statsmodels.datasets import anes96

    frame = anes96.load_pandas().data.drop(columns=["logpopul"])  # log of popul
    frame["target"] = [PARTIES[int(value)] for value in frame.pop("PID")]
    features = [str(column) for column in frame.columns if column != "target"]
    return frame, features, list(PARTIES)


TABLES = {"breast-cancer": _breast_cancer, "anes96": _anes96}


def write_table(name: str, folder: Path) -> RealDataset:
    """A bundled table as ``table.csv`` plus its whole-dataset site config."""
    frame, features, classes = TABLES[name]()
    frame.insert(0, "person", [f"person-{index}" for index in range(len(frame))])
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "table.csv", index=False)
    lines = [
        *_site_header("tabular-classification", "bank"),
        "[data]",
        'format = "csv"',
        'path = "table.csv"',
        f"classes = {_toml_list(classes)}",
        'label_column = "target"',
        'person_column = "person"',
        f"numeric_features = {_toml_list(features)}",
        "[data.numeric_bounds]",
        *(
            f"{name} = [{low!r}, {high!r}]"
            for name in features
            for low, high in [_rounded_bounds(frame[name])]
        ),
    ]
    config = folder / "whole.toml"
    config.write_text("\n".join(lines) + "\n")
    return RealDataset(name, "tabular-classification", classes, config, len(frame))


def _digit_file(image: np.ndarray, index: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = f"digits-{index:05d}"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = DIGITS_WINDOW
    ds.PixelData = image.astype(np.uint8).tobytes()
    return ds


def write_digits(folder: Path) -> RealDataset:
    """scikit-learn's digits as one DICOM file per image (one patient each)."""
    from sklearn import datasets

    bunch = datasets.load_digits()
    classes = [f"digit-{value}" for value in bunch.target_names]
    scans = folder / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, target) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        relative = f"{index // 500:02d}/{index:05d}.dcm"
        (scans / relative).parent.mkdir(exist_ok=True)
        _digit_file(image, index).save_as(scans / relative, enforce_file_format=True)
        rows.append((relative, classes[int(target)]))
    with (scans / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    lines = [
        *_site_header("dicom-classification", "hospital"),
        "[data]",
        'format = "dicom"',
        'path = "scans"',
        f"classes = {_toml_list(classes)}",
    ]
    config = folder / "whole.toml"
    config.write_text("\n".join(lines) + "\n")
    return RealDataset("digits", "dicom-classification", classes, config, len(rows))
