"""An append-only, hash-chained, signed JSON-lines log on disk, and reading one back.

Appends hold an exclusive lock, so the processes of one party (a site's Flower workers,
say) extend one chain. Each entry is fsynced before the signed head beside the log is
replaced (temp file, fsync, rename), so the head never names an entry that is not on disk.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.chain import (
    GENESIS_PREV,
    LOG_OPENED,
    Verification,
    head_signed_by,
    opening_data,
    seal,
    sign_head,
    verify_lines,
)
from common.errors import AuditError
from common.files import fsync_folder, write_atomically
from common.signing import fingerprint

HEAD_SUFFIX = ".head.json"


def head_path(log: Path) -> Path:
    """``audit.jsonl`` -> ``audit.head.json``."""
    return log.with_name(log.stem + HEAD_SUFFIX)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _last_line(path: Path) -> bytes:
    """The file's last line (without its newline), read from the end."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        if end == 0:
            return b""
        handle.seek(end - 1)
        if handle.read(1) != b"\n":
            raise AuditError(
                f"audit log {path.name} does not end with a complete entry (a write was cut "
                "off); it is left untouched: verify it with `fedlora audit verify`"
            )
        position, chunk, tail = end - 1, 4096, b""
        while position > 0 and b"\n" not in tail:
            start = max(0, position - chunk)
            handle.seek(start)
            tail = handle.read(position - start) + tail
            position = start
        return tail.rsplit(b"\n", 1)[-1]


def _first_line(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.readline().rstrip(b"\n")


class AuditLog:
    """One party's log. ``actor`` is the party's public name (``coordinator``, a site id)."""

    def __init__(self, path: Path, actor: str, private_key: Ed25519PrivateKey) -> None:
        self.path = path
        self.actor = actor
        self._key = private_key

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as lock:  # the log itself is the lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, event: str, **data: Any) -> dict[str, Any]:
        """Seal and write one entry (opening the log first if it is new)."""
        with self._locked():
            last = self._tail()
            if last is None:
                opening = {"party": self.actor, **opening_data(self._key)}
                last = self._write(0, LOG_OPENED, opening, GENESIS_PREV)
            return self._write(int(last["seq"]) + 1, event, data, str(last["hash"]))

    def _tail(self) -> dict[str, Any] | None:
        """The entry to chain onto; refuses a log that is not this party's, or that no
        longer ends where its signed head says (cut or rolled back by someone else):
        extending it would sign over the damage."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        first = _parse_line(_first_line(self.path))
        expected = fingerprint(self._key.public_key())
        if first is None or not isinstance(first.get("data"), dict):
            raise AuditError(f"the first entry of audit log {self.path.name} is damaged")
        if first["data"].get("key") != expected or first.get("actor") != self.actor:
            raise AuditError(
                f"audit log {self.path.name} belongs to {first.get('actor')!r} with key "
                f"{first['data'].get('key')}, not to {self.actor!r} with {expected}"
            )
        last = _parse_line(_last_line(self.path))
        if last is None or not isinstance(last.get("seq"), int):
            raise AuditError(f"the last entry of audit log {self.path.name} is damaged")
        head = read_head(self.head_path)
        if not head or not isinstance(head.get("seq"), int):
            raise AuditError(
                f"audit log {self.path.name} has no readable signed head: it is left as it "
                "is; check it with `fedlora audit verify`"
            )
        in_step = head["seq"] == last["seq"] and head.get("hash") == last.get("hash")
        # A crash between writing an entry and its head leaves the head one behind.
        head_lagging = head["seq"] == last["seq"] - 1 and head.get("hash") == last.get("prev")
        if not (in_step or head_lagging) or not head_signed_by(head, self._key.public_key()):
            raise AuditError(
                f"audit log {self.path.name} ends at entry {last['seq']} but its signed head "
                f"names entry {head['seq']}: it was cut or altered. It is left as it is; "
                "check it with `fedlora audit verify`"
            )
        return last

    def _write(self, seq: int, event: str, data: dict[str, Any], prev: str) -> dict[str, Any]:
        time = utc_now()
        entry = seal(
            self._key, seq=seq, time=time, actor=self.actor, event=event, data=data, prev=prev
        )
        # ASCII only: no character a reader could take for a line break (U+2028, …).
        line = (json.dumps(entry, ensure_ascii=True, sort_keys=True) + "\n").encode("ascii")
        created = not self.path.exists()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = 0
            while written < len(line):
                written += os.write(descriptor, line[written:])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if created:
            fsync_folder(self.path.parent)
        log_id = entry["hash"] if seq == 0 else json.loads(_first_line(self.path))["hash"]
        head = sign_head(self._key, log=log_id, seq=seq, digest=entry["hash"], time=time)
        write_atomically(self.head_path, json.dumps(head, indent=2) + "\n")
        return entry


def _parse_line(line: bytes | str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_entries(lines: list[str]) -> list[dict[str, Any]]:
    """The entries as they are, for review; lines that do not parse are skipped
    (``verify`` is what judges the log)."""
    return [entry for entry in map(_parse_line, lines) if entry is not None]


def read_entries(path: Path) -> list[dict[str, Any]]:
    return parse_entries(read_lines(path))


def read_lines(path: Path) -> list[str]:
    """The log's lines, split at newlines only (never at U+2028 and the like)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            lines = handle.read().split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    except UnicodeDecodeError:
        raise AuditError(f"{path} is not a text log") from None


def read_head(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # JSON and Unicode errors are ValueErrors
        return {}
    return value if isinstance(value, dict) else {}


def read_log(path: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The log's lines and its signed head. The head is read first: a log only grows, so
    an append in between cannot look like a cut tail."""
    head = read_head(head_path(path))
    return read_lines(path), head


def verify_log(
    path: Path,
    key: Ed25519PublicKey | None = None,
    head: dict[str, Any] | None = None,
) -> Verification:
    """Verify the log at ``path`` against ``head`` (default: the head file beside it)."""
    lines, own_head = read_log(path)
    return verify_lines(lines, key, head if head is not None else own_head)
