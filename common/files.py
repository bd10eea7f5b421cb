"""Durable writes shared by the site's ledger and every audit log: a file replaced whole
or not at all, and a folder whose new entries survive a power cut."""

from __future__ import annotations

import os
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
