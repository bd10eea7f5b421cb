"""Who an image belongs to (``data.person_key``): the privacy unit of a DICOM site."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.data import SiteData, person_key
from client.data.dicom import load_dicom_dataset, read_dicom
from client.data.dicom_persons import (
    PersonRef,
    missing_key_reason,
    person_identifiers,
    person_ref,
    privacy_unit,
)
from common.config import DicomDataConfig
from common.data_config import PersonKey
from common.errors import DataError
from common.tasks.image_input import ImageInput

SALT = b"persons"


def _write(
    path: Path,
    *,
    patient: str | None = "123",
    issuer: str | None = None,
    study: str | None = "1.2.3.1",
    series: str | None = "1.2.3.1.1",
    instance: str | None = None,
) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(instance) if instance else generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword, value in (
        ("PatientID", patient),
        ("IssuerOfPatientID", issuer),
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(16, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _load(directory: Path, key: PersonKey) -> SiteData:
    names = sorted(p.name for p in directory.glob("*.dcm"))
    with (directory / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *((name, "a") for name in names)])
    config = DicomDataConfig(format="dicom", path=directory, classes=["a", "b"], person_key=key)
    return load_dicom_dataset(config, SALT, ImageInput(4, 1, (0.5,), (0.5,)))


def _hospital(directory: Path) -> None:
    """Patient 123 of issuer A: two studies (one with two series, one image each);
    patient 123 of issuer B: one study; patient 456 (no issuer): one image."""
    _write(directory / "a1.dcm", issuer="A", study="1.1", series="1.1.1")
    _write(directory / "a2.dcm", issuer="A", study="1.1", series="1.1.2")
    _write(directory / "a3.dcm", issuer="A", study="1.2", series="1.2.1")
    _write(directory / "b1.dcm", issuer="B", study="2.1", series="2.1.1")
    _write(directory / "c1.dcm", patient="456", study="3.1", series="3.1.1")


@pytest.mark.parametrize(
    ("key", "persons"), [("patient", 3), ("study", 4), ("series", 5), ("file", 5)]
)
def test_each_person_key_groups_images_into_people(
    tmp_path: Path, key: PersonKey, persons: int
) -> None:
    _hospital(tmp_path)
    data = _load(tmp_path, key)
    assert data.accepted == 5 and data.rejected == []
    assert data.persons == persons


def test_the_issuer_qualifies_the_patient_id(tmp_path: Path) -> None:
    _hospital(tmp_path)
    keys = _load(tmp_path, "patient").person_keys  # a1, a2, a3, b1, c1
    assert keys[0] == keys[1] == keys[2]
    assert keys[3] != keys[0]  # issuer B's patient 123 is another person
    assert keys[4] == person_key("456", SALT)  # without an issuer: the ID alone
    assert keys[0] == person_key('["A", "123"]', SALT)


def test_a_patient_id_seen_without_its_issuer_is_one_person_across_issuers(
    tmp_path: Path,
) -> None:
    """A file of PatientID 123 that names no issuer could be either issuer's patient:
    all files of 123 count as one person (merging is the conservative direction)."""
    _hospital(tmp_path)
    _write(tmp_path / "d1.dcm", patient="123", study="4.1", series="4.1.1")
    data = _load(tmp_path, "patient")  # a1, a2, a3, b1, c1, d1
    assert data.persons == 2  # 123 (A, B and no issuer) and 456
    keys = data.person_keys
    assert keys[0] == keys[3] == keys[5] != keys[4]


def test_person_identifiers_are_unambiguous_whatever_the_values_hold() -> None:
    refs = [
        PersonRef("C", "A\\B"),
        PersonRef("B\\C", "A"),
        PersonRef("A\\B\\C"),
    ]
    identifiers = person_identifiers(refs)
    assert len(set(identifiers)) == 3
    assert person_identifiers([PersonRef("7", "A"), PersonRef("7", "B")]) == [
        '["A", "7"]',
        '["B", "7"]',
    ]


def test_identifiers_are_read_raw(tmp_path: Path) -> None:
    _write(tmp_path / "x.dcm", patient="  007\x00", issuer="HOSP", study="9.9", series="9.9.1")
    ds = read_dicom(tmp_path / "x.dcm")
    assert person_ref(ds, "patient") == PersonRef("007", "HOSP")
    assert person_ref(ds, "study") == PersonRef("9.9")
    assert person_ref(ds, "series") == PersonRef("9.9.1")
    assert person_ref(ds, "file") == PersonRef(str(ds.SOPInstanceUID))
    with pytest.raises(ValueError, match="unknown person key"):
        person_ref(ds, "visit")  # type: ignore[arg-type]


def test_a_file_without_its_sop_instance_uid_uses_the_file_meta(tmp_path: Path) -> None:
    _write(tmp_path / "x.dcm", instance="1.2.826.0.1.42")
    ds = read_dicom(tmp_path / "x.dcm")
    del ds.SOPInstanceUID
    assert person_ref(ds, "file") == PersonRef("1.2.826.0.1.42")


@pytest.mark.parametrize(
    ("key", "missing", "reason"),
    [
        (
            "patient",
            {"patient": None},
            'missing PatientID (de-identified? set data.person_key = "study" or "file")',
        ),
        ("patient", {"patient": " "}, missing_key_reason("patient")),
        (
            "study",
            {"study": None},
            'missing StudyInstanceUID (set data.person_key = "series" or "file")',
        ),
        ("series", {"series": None}, 'missing SeriesInstanceUID (set data.person_key = "file")'),
    ],
)
def test_a_file_without_the_chosen_key_is_rejected_saying_what_to_do(
    tmp_path: Path, key: PersonKey, missing: dict[str, str | None], reason: str
) -> None:
    _write(tmp_path / "good.dcm")
    _write(tmp_path / "odd.dcm", **missing)
    data = _load(tmp_path, key)
    assert data.accepted == 1
    assert [(r.record, r.reason) for r in data.rejected] == [("odd.dcm", reason)]


def test_a_de_identified_export_loads_by_study_or_file(tmp_path: Path) -> None:
    for index in range(4):
        _write(tmp_path / f"{index}.dcm", patient=None, study=f"5.{index // 2}")
    with pytest.raises(DataError, match=r"4 x missing PatientID \(de-identified\?"):
        _load(tmp_path, "patient")
    by_study, by_file = _load(tmp_path, "study"), _load(tmp_path, "file")
    assert (by_study.accepted, by_study.persons) == (4, 2)
    assert (by_file.accepted, by_file.persons) == (4, 4)


def test_the_privacy_unit_is_spelled_out() -> None:
    assert "ε is per patient" in privacy_unit("patient")
    assert privacy_unit("study") == (
        "one person per study (StudyInstanceUID): a patient with several studies counts "
        "as several people, so ε is per study, not per patient"
    )
    assert "ε is per series, not per patient" in privacy_unit("series")
    assert "ε is per image, not per patient" in privacy_unit("file")
