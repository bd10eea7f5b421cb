"""The site's own rules. The coordinator can ask; only these checks decide."""

from __future__ import annotations

from common.config import SiteConfig
from common.errors import PolicyError
from common.protocol import RoundRequest
from common.tasks import model_fingerprint


def check_request(config: SiteConfig, request: RoundRequest) -> None:
    """Refuse a round for another task, a task the site does not allow, or a foreign base."""
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
    local = model_fingerprint(site.base_model)
    if local != request.base_model_sha256:
        raise PolicyError(
            f"site {site.id}: the run's base model (sha256 {request.base_model_sha256[:12]}…) "
            f"differs from the site's own ({local[:12]}…)"
        )


def check_cohort(config: SiteConfig, persons: int, *, purpose: str) -> None:
    """Minimum cohort k: too few people make aggregates identifying."""
    k = config.policy.min_cohort
    if persons < k:
        raise PolicyError(
            f"site {config.site.id} refuses to {purpose}: {persons} people, "
            f"fewer than its minimum cohort of {k}"
        )
