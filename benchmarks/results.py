"""The shared results file: one entry per benchmark, replaced when it runs again."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.json")


def record(name: str, figures: dict[str, Any], path: Path = RESULTS) -> None:
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = {
        "measured": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        **figures,
    }
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def report(name: str, figures: dict[str, Any], *, keep: bool = True) -> None:
    """Print a standalone benchmark's figures as a two-column table, then record them
    (unless ``keep`` is False)."""
    width = max(len(key) for key in figures)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in figures.items()))  # its table
    if keep:
        record(name, figures)
