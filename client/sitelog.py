"""The site's own record of what it decided: one JSON object per line, appended.

Only counts, numbers, public names and reasons go in; never a path, file name or
person identifier. (The signed, hash-chained audit trail builds on this.)
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SITE_LOG = "site-log.jsonl"


class SiteLog:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SITE_LOG

    def record(self, event: str, **data: Any) -> None:
        entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "event": event, **data}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
