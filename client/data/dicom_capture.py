"""What pydicom and its pixel-data plugins say about one file, kept off the console.

pydicom, pylibjpeg (and its libjpeg, openjpeg and RLE back ends) and Pillow report odd
files through :mod:`logging` and :mod:`warnings`. Left alone, those lines reach the
operator's console and the site's log files, one per odd file, and they may quote a
file's values (a malformed Patient Name, a UID). While one file is read and decoded,
:func:`captured` collects them instead; when the file is rejected, :func:`reason`
turns the failure into the rejection's short reason, and otherwise they are dropped.

A reason never names a path (files are read from memory, and anything path-like is
removed) and never a patient value: quoted values other than DICOM names are replaced
by ``'…'`` and the file's own identifying values are redacted wherever they appear.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache

from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from common.errors import DataError

__all__ = [
    "Capture",
    "UnusableImageError",
    "captured",
    "library_failure",
    "raw_text",
    "reason",
    "scrub",
]

CAPTURED_LOGGERS = ("pydicom", "pylibjpeg", "libjpeg", "openjpeg", "rle", "PIL")
"""The libraries that read and decode DICOM files, by their logger names."""
MAX_REASON = 200
"""Longest rejection reason, in characters: the site's report shows one per record."""
MAX_DETAIL = 160

# Elements whose values identify a person, or could (after PS3.15's Basic Application
# Level Confidentiality Profile), redacted from every reason: the Patient (0010) and
# Visit (0038) groups, plus dates and times, names of staff, institution and device,
# accession number, study/series/instance UIDs and the study's descriptions.
_IDENTIFYING_GROUPS = frozenset({0x0010, 0x0038})
_IDENTIFYING_TAGS = frozenset(
    {
        *range(0x00080020, 0x00080024),  # Study, Series, Acquisition, Content Date
        *range(0x00080030, 0x00080034),  # ... and Time
        0x00080018,  # SOP Instance UID
        0x00080050,  # Accession Number
        *range(0x00080080, 0x00080083),  # Institution Name, Address, Code Sequence
        *range(0x00080090, 0x00080097),  # Referring Physician: name, address, phones
        0x00081010,  # Station Name
        0x00081030,  # Study Description
        0x0008103E,  # Series Description
        0x00081040,  # Institutional Department Name
        0x00081048,  # Physician(s) of Record
        0x00081050,  # Performing Physician's Name
        0x00081060,  # Name of Physician(s) Reading Study
        0x00081070,  # Operators' Name
        0x00181000,  # Device Serial Number
        0x0020000D,  # Study Instance UID
        0x0020000E,  # Series Instance UID
        0x00200010,  # Study ID
        0x00321032,  # Requesting Physician
        0x00400244,  # Performed Procedure Step Start Date
        0x00400253,  # Performed Procedure Step ID
        0x00401001,  # Requested Procedure ID
    }
)
_QUOTED = re.compile(r"""b?'([^']*)'|b?"([^"]*)\"""")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-~ ]+){2,}")
_ERROR_CODE = re.compile(r"-?\d{1,5}")
"""A decoder's error code: too short to be an identifier worth hiding."""
_NOISE = ("Unable to decode as exceptions were raised by all available plugins:",)
"""pydicom's preambles that say nothing the summary does not."""
_LOCK = threading.RLock()
"""Logger and warning-filter state is process-wide: one file is captured at a time."""
_ACTIVE = threading.local()
"""The capture this thread is in, so nested steps of one file share it."""


class UnusableImageError(DataError):
    """One image cannot be used. ``reason`` is short and free of patient data.

    The loader turns it into a rejection; ``predict`` lets it surface as an error.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Capture:
    """The messages the DICOM libraries emitted while one file was handled."""

    messages: list[str] = field(default_factory=list)

    def warned(self, message: Warning | str, *_args: object, **_kwargs: object) -> None:
        """Stands in for :func:`warnings.showwarning` while capturing."""
        self.messages.append(str(message))

    def first(self, *needles: str) -> str | None:
        """The first message containing one of ``needles`` (case-insensitive)."""
        for message in self.messages:
            lowered = message.lower()
            if any(needle in lowered for needle in needles):
                return message
        return None


class _Collector(logging.Handler):
    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.WARNING)
        self._capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        with suppress(Exception):  # a record that cannot be formatted is just not kept
            self._capture.messages.append(record.getMessage())


@contextmanager
def captured() -> Iterator[Capture]:
    """Collect the DICOM libraries' log records (WARNING and above) and warnings.

    Their loggers stop propagating for the duration, so nothing reaches the root
    logger's handlers (the console, the site's log) and no warning is printed. Nested
    calls (one file's decoding inside its loading) share the outer capture.
    """
    active: Capture | None = getattr(_ACTIVE, "capture", None)
    if active is not None:  # nested (a file's decoding inside its loading): one capture
        yield active
        return
    capture = Capture()
    collector = _Collector(capture)
    with _LOCK:
        _ACTIVE.capture = capture
        saved = []
        for name in CAPTURED_LOGGERS:
            log = logging.getLogger(name)
            saved.append((log, log.propagate, list(log.handlers)))
            log.propagate = False
            log.handlers = [collector]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = capture.warned  # as they come, like log records
                yield capture
        finally:
            _ACTIVE.capture = None
            for log, propagate, handlers in saved:
                log.propagate = propagate
                log.handlers = handlers


def library_failure(error: BaseException) -> bool:
    """Whether ``error`` is a library's failure on one file rather than an interrupt.

    Decoders fail with any :class:`Exception`, and a Rust back end (pylibjpeg-rle)
    panics with pyo3's ``PanicException``, a :class:`BaseException`: both are one bad
    file. ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` are not."""
    return not isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit))


def raw_text(ds: Dataset | None, tag: int) -> str | None:
    """An element's value as text, read raw (bytes as Latin-1) so that pydicom does not
    convert it, and possibly log a warning quoting it; None when absent or blank, or
    when the element cannot even be fetched."""
    if ds is None or tag not in ds:
        return None
    try:
        element = ds.get_item(tag)
        if element.VR == "SQ":
            return None
        value = element.value
    except Exception:  # a broken element quotes nothing
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value or "")
    return text.strip(" \t\r\n\x00") or None


@cache
def _dicom_names() -> frozenset[str]:
    """Names a message may quote safely: element names and keywords, UID names."""
    names = {entry[2] for entry in DicomDictionary.values()}
    names |= {entry[4] for entry in DicomDictionary.values()}
    names |= {entry[0] for entry in UID_dictionary.values()}
    return frozenset(name for name in names if name)


def _identifying_values(ds: Dataset | None) -> list[str]:
    """The file's identifying values as raw text (read without pydicom converting them)."""
    if ds is None:
        return []
    values: list[str] = []
    for tag in list(ds.keys()):
        if tag.group not in _IDENTIFYING_GROUPS and int(tag) not in _IDENTIFYING_TAGS:
            continue
        text = raw_text(ds, int(tag)) or ""
        values.extend(part.strip(" \x00") for part in re.split(r"[\\^=]", text))
    return sorted({value for value in values if len(value) >= 3}, key=len, reverse=True)


def _keep_quoted(match: re.Match[str]) -> str:
    text = match.group(1) if match.group(1) is not None else match.group(2)
    safe = text in _dicom_names() or _ERROR_CODE.fullmatch(text) is not None
    return f"'{text}'" if safe else "'…'"


def scrub(text: str, ds: Dataset | None = None, limit: int = MAX_DETAIL) -> str:
    """``text`` (a library's message) made safe for a rejection reason: one line, no
    paths, no quoted values except DICOM names, none of ``ds``'s identifying values."""
    for value in _identifying_values(ds):
        text = text.replace(value, "…")
    for noise in _NOISE:
        text = text.replace(noise, "")
    text = _QUOTED.sub(_keep_quoted, text)
    text = _PATH.sub("…", text)
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    text = re.sub(r"\s+", " ", text).strip(" :;")
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def reason(
    summary: str, capture: Capture, error: BaseException | None = None, ds: Dataset | None = None
) -> str:
    """A rejection reason: ``summary``, then what the library said (its error, else its
    first warning), scrubbed and capped at :data:`MAX_REASON` characters."""
    said = str(error) if error is not None and str(error) else ""
    if not said and capture.messages:
        said = capture.messages[0]
    detail = scrub(said, ds, MAX_REASON - len(summary) - 2) if said else ""
    text = f"{summary}: {detail}" if detail else summary
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1].rstrip() + "…"
