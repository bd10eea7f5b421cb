"""Site data loaders: records in, validated model inputs out.

A loader never raises for one bad record: it rejects it with a reason and carries on.
It raises :class:`~common.errors.DataError` only when the data as a whole is unusable.
Identifiers (patient or customer ids) are salted and hashed inside the loader and
used only to group records by person; the raw values never leave it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.files import hash_file


@dataclass(frozen=True)
class Rejection:
    """A record the loader could not use, and why (shown to the site operator only)."""

    record: str
    reason: str


@dataclass
class SiteData:
    """Model-ready arrays for one site, plus what was rejected on the way."""

    features: dict[str, npt.NDArray[np.generic]]
    """Model input name -> array with the record axis first."""
    labels: npt.NDArray[np.int64]
    person_keys: list[str]
    """Salted hash of the owner of each record (same person, same key)."""
    classes: list[str]
    rejected: list[Rejection] = field(default_factory=list)
    adjusted: dict[str, int] = field(default_factory=dict)
    """Records kept but changed, counted by what was done (texts cut to max_tokens)."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, values in self.features.items():
            if len(values) != n:
                raise ValueError(f"feature {name!r} has {len(values)} records, labels {n}")
        if len(self.person_keys) != n:
            raise ValueError("person_keys must have one entry per record")

    @property
    def accepted(self) -> int:
        return len(self.labels)

    @property
    def persons(self) -> int:
        return len(set(self.person_keys))

    def label_counts(self) -> dict[str, int]:
        counts = Counter(int(label) for label in self.labels)
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}

    def subset(self, indices: npt.NDArray[np.int64]) -> SiteData:
        return SiteData(
            features={name: values[indices] for name, values in self.features.items()},
            labels=self.labels[indices],
            person_keys=[self.person_keys[i] for i in indices],
            classes=self.classes,
            rejected=[],
        )


def person_key(raw_identifier: str, salt: bytes) -> str:
    """A site-local pseudonym: stable within the site, meaningless outside it."""
    return hashlib.sha256(salt + raw_identifier.encode("utf-8")).hexdigest()[:16]


def split_holdout(data: SiteData, fraction: float, seed: int) -> tuple[SiteData, SiteData]:
    """Split by person, so one patient's records never sit on both sides.

    People are ranked by a hash of their (salted) key and the seed, and the first
    ``round(fraction * people)`` are held out: the held-out share is exact, and every round
    and every run of a site sees the same held-out people.
    """
    people = sorted(
        set(data.person_keys),
        key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(),
    )
    held_out = set(people[: round(fraction * len(people))])
    in_holdout = np.array([key in held_out for key in data.person_keys], dtype=bool)
    indices = np.arange(len(data.labels))
    return data.subset(indices[~in_holdout]), data.subset(indices[in_holdout])


def dataset_fingerprint(path: Path, exclude: Path | None = None) -> str:
    """SHA-256 of a dataset's content: a table file's bytes, or every file of a folder
    (relative names and bytes). It names the dataset's privacy ledger: the same data
    keeps its budget across runs and restarts; changed data is a new dataset.
    """
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
        root = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        root = path
    for file in files:
        if exclude is not None and file.is_relative_to(exclude):
            continue
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        hash_file(digest, file)
        digest.update(b"\0")
    return digest.hexdigest()
