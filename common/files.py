"""Durable writes shared by the site's ledger, every audit log and the keys: a file
replaced whole or not at all, a private file never readable by others, and a folder
whose new entries survive a power cut."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def hash_file(digest: Digest, path: Path) -> None:
    """Feed ``path``'s bytes to ``digest`` in 1 MiB chunks (models can be large)."""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def fsync_folder(folder: Path) -> None:
    """Make a file created, renamed or replaced in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


PRIVATE_FILE_MODE = 0o600


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Create ``path`` with mode 0600 holding ``data`` (a private key); FileExistsError
    unless ``replace``. The bytes go to a 0600 temporary file first, then are linked (or
    renamed) into place: never readable by others, never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(path.parent)


FileStamp = tuple[str, int, int, int, int]
"""(relative name, size, mtime ns, ctime ns, inode) of one file."""


def listing_signature(path: Path, exclude: Path | None = None) -> tuple[FileStamp, ...]:
    """What a file, or every file under a folder, looks like without reading a byte.

    It changes when a file is added, removed, renamed, replaced or written (the change
    time cannot be set back by the file's owner, unlike the modification time), so a
    cache keyed by it is read again after any change. A path that does not exist has
    the empty signature (its loader then says what is missing)."""
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*") if p.is_file()), path
    else:
        return ()
    stamps: list[FileStamp] = []
    for file in files:
        if exclude is not None and file.is_relative_to(exclude):
            continue
        info = file.stat()
        name = file.relative_to(root).as_posix()
        stamps.append((name, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
    return tuple(stamps)
