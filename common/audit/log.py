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
    opening_data,
    seal,
    sign_head,
    verify_lines,
)
from common.errors import AuditError
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


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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
                last = self._write(
                    0, LOG_OPENED, {"party": self.actor, **opening_data(self._key)}, GENESIS_PREV
                )
            return self._write(int(last["seq"]) + 1, event, data, str(last["hash"]))

    def _tail(self) -> dict[str, Any] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        try:
            first = json.loads(_first_line(self.path))
        except json.JSONDecodeError:
            first = None
        if not isinstance(first, dict) or not isinstance(first.get("data"), dict):
            raise AuditError(f"the first entry of audit log {self.path.name} is damaged")
        expected = fingerprint(self._key.public_key())
        if first.get("data", {}).get("key") != expected or first.get("actor") != self.actor:
            raise AuditError(
                f"audit log {self.path.name} belongs to {first.get('actor')!r} with key "
                f"{first.get('data', {}).get('key')}, not to {self.actor!r} with {expected}"
            )
        try:
            entry: dict[str, Any] = json.loads(_last_line(self.path))
        except json.JSONDecodeError:
            raise AuditError(f"the last entry of audit log {self.path.name} is damaged") from None
        return entry

    def _write(self, seq: int, event: str, data: dict[str, Any], prev: str) -> dict[str, Any]:
        time = utc_now()
        entry = seal(
            self._key, seq=seq, time=time, actor=self.actor, event=event, data=data, prev=prev
        )
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode("utf-8"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        log_id = entry["hash"] if seq == 0 else json.loads(_first_line(self.path))["hash"]
        head = sign_head(self._key, log=log_id, seq=seq, digest=entry["hash"], time=time)
        _write_atomically(self.head_path, json.dumps(head, indent=2) + "\n")
        return entry


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The log's entries as they are, for review; lines that do not parse are skipped
    (``verify`` is what judges the log)."""
    entries = []
    for line in read_lines(path):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            entries.append(value)
    return entries


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    except UnicodeDecodeError:
        raise AuditError(f"{path} is not a text log") from None


def read_head(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def verify_log(
    path: Path,
    key: Ed25519PublicKey | None = None,
    head: dict[str, Any] | None = None,
) -> Verification:
    """Verify the log at ``path`` against ``head`` (default: the head file beside it)."""
    return verify_lines(
        read_lines(path), key, head if head is not None else read_head(head_path(path))
    )
