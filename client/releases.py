"""The releases a site pins: what it runs, what it changed, what it refused.

A site pins the SHA-256 of each app bundle (release) it reviewed in its config
(``policy.client_releases``). Editing that list is the operator's explicit step; the
site's signed audit log records every change of it (``client-releases-pinned``, with
what was added and removed) the first time the daemon or the launcher sees it, and
every refused bundle (``code-refused``, with its hash). The pure part (the change
between two lists, the review of a log) is kept apart from the log itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.audit import SiteAudit
from common.release import build_fab, fab_sha256

PINNED_EVENT = "client-releases-pinned"
REFUSED_EVENT = "code-refused"
APP_ROOT = Path(__file__).resolve().parents[1]
"""Where this installed copy of fedlora lives (a source checkout holds the Flower app)."""


@dataclass(frozen=True)
class PinChange:
    pinned: list[str]
    added: list[str]
    removed: list[str]


def pin_change(previous: Sequence[str] | None, current: Sequence[str]) -> PinChange | None:
    """What changed from the last recorded pins to the configured ones; None when
    nothing did. ``previous`` None: never recorded (the first list is a change)."""
    if previous is not None and sorted(previous) == sorted(current):
        return None
    before = set(previous or ())
    return PinChange(
        pinned=sorted(current),
        added=sorted(set(current) - before),
        removed=sorted(before - set(current)),
    )


def last_pins(events: Iterable[dict[str, Any]]) -> list[str] | None:
    """The pins the log last recorded, or None if it never did."""
    found: list[str] | None = None
    for event in events:
        if event.get("event") == PINNED_EVENT and isinstance(event.get("pinned"), list):
            found = [str(entry) for entry in event["pinned"]]
    return found


def refused_bundles(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each refused bundle, latest first: its hash, the run, and how often."""
    seen: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("event") == REFUSED_EVENT and isinstance(event.get("fab_sha256"), str):
            entry = seen.pop(event["fab_sha256"], {"fab_sha256": event["fab_sha256"], "times": 0})
            entry.update(run=event.get("run", ""), times=entry["times"] + 1)
            seen[event["fab_sha256"]] = entry
    return list(reversed(seen.values()))


def record_pins(audit: SiteAudit, current: Sequence[str]) -> PinChange | None:
    """Enter a change of the pinned releases in the site's audit log, once."""
    change = pin_change(last_pins(audit.events()), current)
    if change is not None:
        audit.record(PINNED_EVENT, pinned=change.pinned, added=change.added, removed=change.removed)
    return change


def installed_release() -> str | None:
    """The SHA-256 of the app bundle this installed copy of fedlora would be as a
    release (a source checkout, as `pip install -e .` leaves it), or None when this is
    no source checkout (a wheel install has no Flower app to build)."""
    if not (APP_ROOT / "pyproject.toml").is_file():
        return None
    return fab_sha256(build_fab(APP_ROOT))
