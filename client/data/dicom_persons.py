"""Whose each DICOM file is: the person a record is counted against for privacy.

``data.person_key`` chooses the unit (patient, study, series or file). The loader and
a simulation's split both read persons here, so the people a split keeps apart are
the people the site's accounting counts. Identifiers are read raw (no pydicom
conversion, which could log the value) and never leave memory: the loader hashes
them (client.data.person_key), the split numbers them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

from pydicom.dataset import Dataset

from client.data.dicom_capture import raw_text
from common.data_config import PersonKey

__all__ = [
    "PersonRef",
    "missing_key_reason",
    "person_identifiers",
    "person_ref",
    "privacy_unit",
]

_PATIENT_ID, _ISSUER_OF_PATIENT_ID = 0x00100020, 0x00100021
_MEDIA_SOP_INSTANCE_UID = 0x00020003
_KEY_TAGS: dict[str, tuple[int, str]] = {
    "patient": (_PATIENT_ID, "PatientID"),
    "study": (0x0020000D, "StudyInstanceUID"),
    "series": (0x0020000E, "SeriesInstanceUID"),
    "file": (0x00080018, "SOPInstanceUID"),
}
_KEY_ADVICE = {
    "patient": ' (de-identified? set data.person_key = "study" or "file")',
    "study": ' (set data.person_key = "series" or "file")',
    "series": ' (set data.person_key = "file")',
    "file": " (not a complete DICOM instance)",
}
_UNITS = {
    "patient": "one person per patient (PatientID, qualified by IssuerOfPatientID when "
    "every file of that PatientID names one): ε is per patient",
    "study": "one person per study (StudyInstanceUID): a patient with several studies "
    "counts as several people, so ε is per study, not per patient",
    "series": "one person per series (SeriesInstanceUID): a patient with several series "
    "counts as several people, so ε is per series, not per patient",
    "file": "one person per image (SOPInstanceUID): a patient with several images counts "
    "as several people, so ε is per image, not per patient",
}


@dataclass(frozen=True)
class PersonRef:
    """One file's raw person identifier (never logged, never stored)."""

    value: str
    issuer: str | None = None
    """IssuerOfPatientID, for ``person_key = "patient"`` when the file has one."""


def person_ref(ds: Dataset, person_key: PersonKey) -> PersonRef | None:
    """Whose ``ds`` is under ``person_key``, or None when the file does not say.

    - ``"patient"``: PatientID, with IssuerOfPatientID when present (see
      :func:`person_identifiers` for how the two combine across files);
    - ``"study"``: StudyInstanceUID; ``"series"``: SeriesInstanceUID;
    - ``"file"``: SOPInstanceUID (else the file meta's Media Storage SOP Instance UID):
      one person per image, and two copies of one image are one.
    """
    if person_key not in _KEY_TAGS:
        raise ValueError(f"unknown person key {person_key!r}; choose from {get_args(PersonKey)}")
    value = raw_text(ds, _KEY_TAGS[person_key][0])
    if person_key == "file" and value is None:
        value = raw_text(getattr(ds, "file_meta", None), _MEDIA_SOP_INSTANCE_UID)
    if value is None:
        return None
    issuer = raw_text(ds, _ISSUER_OF_PATIENT_ID) if person_key == "patient" else None
    return PersonRef(value, issuer)


def person_identifiers(refs: Sequence[PersonRef]) -> list[str]:
    """One identifier string per record: equal strings are one person.

    Two issuers' patient "123" are two people only when every file with PatientID
    "123" names its issuer. When any of them does not, that file could be either
    patient, so all files of "123" are counted as one person: merging people only
    makes the accounting more conservative, splitting one person in two would not.
    A patient without an issuer (and every other key) is its value as it is; an
    issuer-qualified patient is the JSON array ``[issuer, id]``, unambiguous whatever
    the values hold (a PatientID that happens to spell such an array merges with it,
    the conservative direction again).
    """
    unqualified = {ref.value for ref in refs if ref.issuer is None}
    return [
        ref.value
        if ref.issuer is None or ref.value in unqualified
        else json.dumps([ref.issuer, ref.value])
        for ref in refs
    ]


def missing_key_reason(person_key: PersonKey) -> str:
    """The rejection reason of a file without the chosen person key, with what to do."""
    return f"missing {_KEY_TAGS[person_key][1]}{_KEY_ADVICE[person_key]}"


def privacy_unit(person_key: PersonKey) -> str:
    """What ``data.person_key`` means for the privacy unit (``fedlora site check``)."""
    return _UNITS[person_key]
