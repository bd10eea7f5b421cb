"""The site's own signed audit log: what it decided, on which data, at what privacy cost.

One log per site across runs (``<state_dir>/audit.jsonl``), signed with the site's key.
Only counts, hashes, privacy figures, public names and reasons go in; never a path, a
file name or anything about a person.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.audit.chain import LOG_OPENED
from common.audit.log import AuditLog, read_entries
from common.config import SiteConfig
from common.signing import fingerprint, load_or_create_private_key

SITE_AUDIT_LOG = "audit.jsonl"


class SiteAudit:
    def __init__(self, config: SiteConfig) -> None:
        self._config = config

    def _log(self) -> AuditLog:
        # The key is read when there is something to record, not when a Site is built:
        # `fedlora site check` must work before the site has ever signed anything.
        identity = self._config.site
        key = load_or_create_private_key(identity.audit_key_path)
        return AuditLog(self.path, identity.id, key)

    @property
    def key_fingerprint(self) -> str:
        key = load_or_create_private_key(self._config.site.audit_key_path)
        return fingerprint(key.public_key())

    @property
    def path(self) -> Path:
        return self._config.site.state_dir / SITE_AUDIT_LOG

    def record(self, event: str, **data: Any) -> None:
        self._log().append(event, **data)

    def events(self) -> list[dict[str, Any]]:
        """The recorded events as ``{"event": ..., **data}``, oldest first, for review
        and tests (``fedlora audit verify`` is what checks them)."""
        if not self.path.exists():
            return []
        return [
            {"event": entry["event"], **entry["data"]}
            for entry in read_entries(self.path)
            if entry.get("event") != LOG_OPENED
        ]
