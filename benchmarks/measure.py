"""How the benchmarks measure: peak memory of a section, isolated runs, and verdicts.

Peak memory is the process's resident set high-water mark (``VmHWM``) over the
measured section only: the mark is reset just before it (``/proc/self/clear_refs``),
so it counts the model, data and interpreter already resident plus whatever the section
adds, which is what a site's machine must hold. Each configuration that is compared on
memory runs in its own fresh process, so allocator caches from one do not flatter the
next.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1024 * 1024


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{STATUS} has no {key} (peak memory needs Linux)")
    return int(match.group(1))


def resident_bytes() -> int:
    return _status_kib("VmRSS") * 1024


@dataclass
class Section:
    """What a measured section cost: wall seconds and peak resident bytes."""

    seconds: float = 0.0
    peak_bytes: int = 0
    start_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def added_bytes(self) -> int:
        """Peak above what was resident when the section began."""
        return max(self.peak_bytes - self.start_bytes, 0)


@contextmanager
def measured() -> Iterator[Section]:
    """Time a block and take its peak RSS (the high-water mark reset at its start)."""
    section = Section()
    CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    section.start_bytes = resident_bytes()
    started = time.perf_counter()
    try:
        yield section
    finally:
        section.seconds = time.perf_counter() - started
        section.peak_bytes = _status_kib("VmHWM") * 1024


def _child(
    queue: multiprocessing.Queue[Any], function: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    try:
        queue.put(("ok", function(*args)))
    except BaseException as exc:  # reported in the parent, with its type
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def isolated(function: Callable[..., Any], *args: Any, timeout: float = 1800) -> Any:
    """``function(*args)`` in a fresh spawned process; its (picklable) result.

    A child that dies without answering (killed for memory, say) is reported at once,
    not after ``timeout``.
    """
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[Any] = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status, value = queue.get(timeout=1.0)
                break
            except Empty:
                if not process.is_alive():
                    status, value = "error", f"the process died (exit {process.exitcode})"
                    break
                if time.monotonic() > deadline:
                    status, value = "error", f"no answer within {timeout:.0f} s"
                    break
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(f"{getattr(function, '__name__', function)} failed: {value}")
    return value


def verdict(value: float | None, target: float, *, at_least: bool = False) -> bool | None:
    """Whether ``value`` meets ``target`` (≤, or ≥ with ``at_least``); None: not measured."""
    if value is None:
        return None
    return value >= target if at_least else value <= target


def mib(value: float) -> float:
    return round(value / MIB, 1)
