"""The audit log's mathematics, kept apart from files and locks: how an entry is encoded,
hashed, signed and chained, and how a sequence of lines is verified.

An entry is one JSON object per line::

    {"seq": 3, "time": "...Z", "actor": "coordinator", "event": "update-received",
     "data": {...}, "prev": "<hash of entry 2>", "hash": "<sha256>", "signature": "<b64>"}

``hash`` is the SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the
other six fields, so it commits to the previous entry's hash and through it to the whole
history. ``signature`` is the party's Ed25519 signature of ``hash``. Entry 0 is always
``log-opened`` and carries the party's public key; ``--key`` pins the key to expect.

A *head* (``<log>.head.json``, or the one an artifact manifest records) is a signed
statement "the log identified by its first entry had N+1 entries, the last with hash H";
it is what makes a cut tail detectable.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import SigningError
from common.signing import (
    fingerprint,
    public_key_from_text,
    public_key_text,
    sign,
    signature_valid,
)

FORMAT_VERSION = 1
GENESIS_PREV = "0" * 64
LOG_OPENED = "log-opened"
BODY_FIELDS = ("seq", "time", "actor", "event", "data", "prev")
ENTRY_FIELDS = frozenset((*BODY_FIELDS, "hash", "signature"))
HEAD_FIELDS = ("log", "seq", "hash", "time")


def json_safe(value: Any) -> Any:
    """Plain JSON values only: numpy scalars become numbers, non-finite floats None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalar
        return json_safe(value.item())
    raise TypeError(f"audit data must be JSON values, got {type(value).__name__}")


def canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_digest(entry: Mapping[str, Any]) -> str:
    return sha256_hex(canonical({name: entry[name] for name in BODY_FIELDS}))


def seal(
    private_key: Ed25519PrivateKey,
    *,
    seq: int,
    time: str,
    actor: str,
    event: str,
    data: Mapping[str, Any],
    prev: str,
) -> dict[str, Any]:
    """A complete entry: the body, its hash and the signature of that hash."""
    body = {
        "seq": seq,
        "time": time,
        "actor": actor,
        "event": event,
        "data": json_safe(data),
        "prev": prev,
    }
    digest = entry_digest(body)
    return {**body, "hash": digest, "signature": sign(private_key, digest.encode("ascii"))}


def opening_data(private_key: Ed25519PrivateKey) -> dict[str, Any]:
    public = private_key.public_key()
    return {
        "format": FORMAT_VERSION,
        "public_key": public_key_text(public),
        "key": fingerprint(public),
    }


def sign_head(
    private_key: Ed25519PrivateKey, *, log: str, seq: int, digest: str, time: str
) -> dict[str, Any]:
    statement = {"log": log, "seq": seq, "hash": digest, "time": time}
    return {
        **statement,
        "key": fingerprint(private_key.public_key()),
        "signature": sign(private_key, canonical(statement)),
    }


def head_signed_by(head: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    try:
        message = canonical({name: head[name] for name in HEAD_FIELDS})
    except (KeyError, TypeError, ValueError):
        return False
    return signature_valid(public_key, message, str(head.get("signature", "")))


# ----------------------------------------------------------------- verification ---


@dataclass(frozen=True)
class Finding:
    line: int
    """1-based line of the log (0: the log as a whole, e.g. its head)."""
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}" if self.line else self.problem


@dataclass
class Verification:
    """What verifying one log found. ``ok`` only when there is nothing to report."""

    entries: int = 0
    actor: str | None = None
    key: str | None = None
    """Fingerprint of the key the entries were checked against."""
    key_pinned: bool = False
    head_seq: int | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_problem(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def add(self, line: int, problem: str) -> None:
        self.findings.append(Finding(line, problem))


FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int,
    "time": str,
    "actor": str,
    "event": str,
    "data": dict,
    "prev": str,
    "hash": str,
    "signature": str,
}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A field given twice could show one value to one reader and another to the next."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"field(s) {', '.join(repeated)} given twice")
    return dict(pairs)


def _parse(line: str) -> dict[str, Any] | str:
    """The entry on this line, or why it is not one."""
    try:
        value = json.loads(line, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg}); the line was cut or edited by hand"
    except (ValueError, RecursionError) as exc:
        return f"not a valid entry ({str(exc)[:80] or type(exc).__name__}); edited by hand"
    if not isinstance(value, dict):
        return "not a JSON object"
    fields = set(value)
    if fields != ENTRY_FIELDS:
        missing, extra = ENTRY_FIELDS - fields, fields - ENTRY_FIELDS
        parts = []
        if missing:
            parts.append("missing " + ", ".join(sorted(missing)))
        if extra:
            parts.append("unexpected " + ", ".join(sorted(extra)))
        return "fields changed: " + "; ".join(parts)
    wrong = [
        name
        for name, kind in FIELD_TYPES.items()
        if not isinstance(value[name], kind) or isinstance(value[name], bool)
    ]
    if wrong:
        return "field types changed: " + ", ".join(wrong)
    return value


def _opening_key(entry: dict[str, Any]) -> Ed25519PublicKey | str:
    if entry["event"] != LOG_OPENED or not isinstance(entry["data"], dict):
        return f"the first entry must be {LOG_OPENED!r}, found {entry['event']!r}"
    try:
        key = public_key_from_text(str(entry["data"].get("public_key", "")))
    except SigningError as exc:
        return f"the opening entry's public key is unusable: {exc}"
    if entry["data"].get("key") != fingerprint(key):
        return "the opening entry's key fingerprint does not match its public key"
    return key


def verify_lines(
    lines: Sequence[str],
    pinned_key: Ed25519PublicKey | None = None,
    head: Mapping[str, Any] | None = None,
) -> Verification:
    """Check order, chain, hashes, signatures and (when given) the signed head.

    Entries are checked against ``pinned_key`` when given, otherwise against the key
    the log opened with (which proves integrity, not authorship).
    """
    result = Verification(key_pinned=pinned_key is not None)
    if pinned_key is not None:
        result.key = fingerprint(pinned_key)
    lines = _without_trailing_blanks(lines)
    if not lines:
        result.add(0, "the log is empty")
        return result
    key, entries = _check_entries(result, lines, pinned_key)
    result.entries = len(entries)
    if head is None:
        result.add(0, "no signed head to compare with: a cut tail could not be detected")
    elif key is not None and entries:
        _check_head(result, head, key, entries, len(lines))
    return result


def _without_trailing_blanks(lines: Sequence[str]) -> list[str]:
    """The lines less the blank ones at the end: a trailing blank line is layout, not
    content."""
    kept = list(lines)
    while kept and not kept[-1].strip():
        kept.pop()
    return kept


def _check_entries(
    result: Verification, lines: list[str], key: Ed25519PublicKey | None
) -> tuple[Ed25519PublicKey | None, list[dict[str, Any]]]:
    """Check every line in turn, each finding added to ``result``. Returns the key the
    entries were checked against (``key``, else the one the log opened with; None when
    neither is known) and the entries that could be hashed."""
    entries: list[dict[str, Any]] = []
    previous_hash = GENESIS_PREV  # "": unknown (the line before was no entry)
    foreign_key = False
    position = 0  # entries seen so far, blank lines aside
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            result.add(number, "an empty line where an entry belongs")
            continue
        position += 1
        entry = _parse(line)
        if isinstance(entry, str):
            result.add(number, entry)
            previous_hash = ""
            continue
        if position == 1:
            key, foreign_key = _check_opening(result, number, entry, key)
        _check_order(result, number, entry, position - 1, previous_hash)
        previous_hash = str(entry["hash"])
        if _check_seal(result, number, entry, key, foreign_key):
            _check_actor(result, number, entry)
            entries.append(entry)
    return key, entries


def _check_opening(
    result: Verification, number: int, entry: dict[str, Any], key: Ed25519PublicKey | None
) -> tuple[Ed25519PublicKey | None, bool]:
    """Check the first entry opens the log with a usable key, the expected one when
    ``key`` is pinned; records the log's actor (and key, when none was pinned). Returns
    the key to check the entries against, and whether the log was opened with another
    key than the pinned one (then every signature fails: one finding says why)."""
    foreign_key = False
    opened = _opening_key(entry)
    if isinstance(opened, str):
        result.add(number, opened)
    elif key is None:
        key, result.key = opened, fingerprint(opened)
    elif fingerprint(opened) != result.key:
        foreign_key = True
        result.add(
            number,
            f"the log was opened with key {fingerprint(opened)}, not the "
            f"expected {result.key}: it was re-signed by another party",
        )
    result.actor = str(entry["actor"])
    return key, foreign_key


def _check_order(
    result: Verification,
    number: int,
    entry: dict[str, Any],
    expected_seq: int,
    previous_hash: str,
) -> None:
    """Check the entry's sequence number, and that it chains to the entry before it
    (when that one's hash is known: ``previous_hash`` is not empty)."""
    if entry["seq"] != expected_seq:
        result.add(
            number,
            f"sequence number {entry['seq']} where {expected_seq} belongs: an entry "
            "was deleted, inserted or moved",
        )
    if entry["prev"] != previous_hash and previous_hash:
        result.add(
            number,
            f"entry {entry['seq']} does not follow the entry before it (its 'prev' hash "
            "differs): the chain is broken here",
        )


def _check_seal(
    result: Verification,
    number: int,
    entry: dict[str, Any],
    key: Ed25519PublicKey | None,
    foreign_key: bool,
) -> bool:
    """Check the entry's hash matches its content and, when there is a key to check it
    against (and the log is not known to be signed by another), its signature. Returns
    False when the entry cannot even be hashed (it holds values no writer produces)."""
    try:
        digest = entry_digest(entry)
    except (ValueError, UnicodeError, RecursionError):
        result.add(number, f"entry {entry['seq']} holds values no writer produces")
        return False
    if digest != entry["hash"]:
        result.add(
            number, f"entry {entry['seq']} was edited: its content no longer matches its hash"
        )
    elif (
        key is not None
        and not foreign_key
        and not signature_valid(key, str(entry["hash"]).encode("ascii"), str(entry["signature"]))
    ):
        result.add(
            number,
            f"entry {entry['seq']}'s signature is not by key {result.key}",
        )
    return True


def _check_actor(result: Verification, number: int, entry: dict[str, Any]) -> None:
    """Check the entry names the actor the log opened with."""
    if entry["actor"] != result.actor:
        result.add(number, f"entry {entry['seq']} names another actor ({entry['actor']!r})")


def _check_head(
    result: Verification,
    head: Mapping[str, Any],
    key: Ed25519PublicKey,
    entries: list[dict[str, Any]],
    lines: int,
) -> None:
    try:
        statement = {name: head[name] for name in HEAD_FIELDS}
        signature = str(head["signature"])
    except KeyError as exc:
        result.add(0, f"the signed head lacks {exc.args[0]!r}")
        return
    try:
        message = canonical(statement)
    except (TypeError, ValueError):
        result.add(0, "the signed head holds values that are not plain JSON")
        return
    if not signature_valid(key, message, signature):
        result.add(0, f"the head's signature is not by key {result.key}")
        return
    if statement["log"] != entries[0]["hash"]:
        result.add(0, "the head belongs to another log (its first entry differs)")
        return
    seq = statement["seq"]
    result.head_seq = int(seq) if isinstance(seq, int) else None
    last = entries[-1]["seq"]
    by_seq = {entry["seq"]: entry for entry in entries}
    if not isinstance(seq, int) or seq < 0:
        result.add(0, "the head's sequence number is not a count")
    elif seq > last:
        result.add(
            lines + 1,
            f"the log ends at entry {last} but its signed head records entry {seq}: "
            f"{seq - last} entr{'y was' if seq - last == 1 else 'ies were'} cut from the end",
        )
    elif (recorded := by_seq.get(seq)) is not None and recorded["hash"] != statement["hash"]:
        result.add(
            entries.index(recorded) + 1,
            f"entry {seq} differs from the one the signed head records: history was rewritten",
        )
