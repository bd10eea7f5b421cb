"""The site's own signed audit log: what it decided, on which data, at what privacy cost.

One log per site across runs (``<state_dir>/audit.jsonl``), signed with the site's key.
Only counts, hashes, privacy figures, public names and reasons go in; never a path, a
file name or anything about a person.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import LOG_OPENED
from common.audit.log import AuditLog, head_path, read_entries, read_head
from common.config import SiteConfig
from common.signing import fingerprint, load_or_create_private_key, load_private_key

SITE_AUDIT_LOG = "audit.jsonl"


class SiteAudit:
    def __init__(self, config: SiteConfig) -> None:
        self._config = config

    @cached_property
    def _key(self) -> Ed25519PrivateKey:
        """Read when there is something to record, not when a Site is built (`fedlora
        site check` works before the site ever signed anything). A configured key must
        exist; only the default one is created on first use."""
        identity = self._config.site
        if identity.signing_key is not None:
            return load_private_key(identity.signing_key)
        return load_or_create_private_key(identity.audit_key_path)

    def _log(self) -> AuditLog:
        return AuditLog(self.path, self._config.site.id, self._key)

    @property
    def key_fingerprint(self) -> str:
        return fingerprint(self._key.public_key())

    @property
    def path(self) -> Path:
        return self._config.site.state_dir / SITE_AUDIT_LOG

    def head(self) -> tuple[int, str] | None:
        """(number, hash) of the log's last entry, as its signed head says."""
        head = read_head(head_path(self.path))
        if head and isinstance(head.get("seq"), int) and isinstance(head.get("hash"), str):
            return head["seq"], head["hash"]
        return None

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
