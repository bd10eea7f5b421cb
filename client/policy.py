"""The site's own rules for a round request. The coordinator can ask; only these
checks decide (client/preflight.py runs them with the rest)."""

from __future__ import annotations

from collections.abc import Callable

from common.config import SiteConfig
from common.errors import PolicyError
from common.protocol import RoundRequest


def check_request(
    config: SiteConfig, request: RoundRequest, local_fingerprint: Callable[[], str]
) -> None:
    """Refuse a round for another task, a task the site does not allow, or a foreign
    base. ``local_fingerprint`` hashes the site's base model (cached per process)."""
    site = config.site
    if request.task != site.task:
        raise PolicyError(
            f"site {site.id} serves task {site.task!r}, but the round asks for {request.task!r}"
        )
    allowed = config.policy.allowed_tasks
    if allowed is not None and request.task not in allowed:
        raise PolicyError(f"site {site.id} policy does not allow task {request.task!r}")
    if not (site.base_model / "config.json").is_file():
        raise PolicyError(f"site {site.id} has no base model at its configured base_model")
    local = local_fingerprint()
    if local != request.base_model_sha256:
        raise PolicyError(
            f"site {site.id}: the run's base model (sha256 {request.base_model_sha256[:12]}…) "
            f"differs from the site's own ({local[:12]}…)"
        )
