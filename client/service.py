"""One :class:`~client.site.Site` per site per process, reused across messages.

Flower calls the ClientApp once per message. Building the site anew each time would
re-read its config, its data and its base model for every message; this keeps each
site's object (and with it the cached data and model) for as long as the process
lives, in a simulation's workers and in a site's long-lived ClientApp service alike.
A site's config file that changed on disk gives a new Site (and fresh caches).

The cache is the process's (``process_site_cache``): Flower's simulation engine sends
the ClientApp to its worker processes pickled with every message, so an app-held cache
would be a fresh copy each time; a pickled SiteCache stands for the receiving
process's own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from client.site import Site
from common.config import SiteConfig, load_site_config
from common.files import FileStamp, listing_signature

logger = logging.getLogger(__name__)

MAX_SITES = 8
"""Sites one process keeps (a simulation's worker may serve several)."""
_PROCESS_CACHES: dict[int, SiteCache] = {}
"""pid -> that process's cache (a forked child gets its own, not its parent's)."""


class SiteCache:
    """Config path -> the process's Site for it."""

    def __init__(
        self,
        max_sites: int = MAX_SITES,
        build: Callable[[SiteConfig], Site] = Site,
    ) -> None:
        self.max_sites = max_sites
        self._build = build
        self._lock = threading.Lock()
        self._sites: OrderedDict[Path, tuple[tuple[FileStamp, ...], Site]] = OrderedDict()
        self.builds = 0
        """How many Sites were built (for tests and benchmarks)."""

    def clear(self) -> None:
        """Forget every site (the next message builds its site anew)."""
        with self._lock:
            self._sites.clear()

    def __reduce__(self) -> tuple[object, tuple[()]]:
        """Pickled, a cache stands for the receiving process's own."""
        return process_site_cache, ()

    def get(self, path: Path) -> Site:
        """The Site of the config at ``path``; a new one when the file changed."""
        key = path.resolve()
        with self._lock:
            stamp = listing_signature(key)
            cached = self._sites.get(key)
            if cached is not None and cached[0] == stamp:
                self._sites.move_to_end(key)
                return cached[1]
            site = self._build(load_site_config(key))
            self.builds += 1
            if cached is not None:
                logger.info("site %s: its config changed; loaded again", site.site_id)
            self._sites[key] = (stamp, site)
            self._sites.move_to_end(key)
            while len(self._sites) > self.max_sites:
                self._sites.popitem(last=False)
            return site


def process_site_cache() -> SiteCache:
    """This process's SiteCache (made on first use)."""
    pid = os.getpid()
    cache = _PROCESS_CACHES.get(pid)
    if cache is None:
        cache = _PROCESS_CACHES[pid] = SiteCache()
    return cache
