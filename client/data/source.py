"""A site's data, read once per process and read again only when its files change.

Reading a site's data (decoding every DICOM file, fitting a table's cleaning,
tokenising texts) and hashing it is the slowest thing a site does outside training.
A long-lived site process keeps the result and checks, per message, only the files'
names, sizes and modification times; any change reads and hashes everything again.
The content hash, not the listing, names the privacy ledger (client/ledger.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from client.data import SiteData, dataset_fingerprint, split_holdout
from client.data.kinds import kind_of
from common.config import SiteConfig
from common.files import listing_signature

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedData:
    train: SiteData
    holdout: SiteData
    all: SiteData
    class_weights: list[float] | None
    dataset: str
    """Content hash of the dataset: the name of its privacy ledger."""
    preprocessing: dict[str, Any]
    """How records become model inputs here (see client.predict): kept with an
    installed artifact so prediction cleans records exactly as training did."""


def load_site_data(config: SiteConfig, salt: bytes) -> LoadedData:
    """Read, clean, split and hash the site's data (no cache)."""
    data_config = config.data
    loaded = kind_of(data_config).load(data_config, salt, config.site.base_model)
    train, holdout = split_holdout(loaded.data, data_config.holdout_fraction, seed=0)
    dataset = dataset_fingerprint(data_config.path, exclude=config.site.state_dir)
    return LoadedData(
        train, holdout, loaded.data, loaded.class_weights, dataset, loaded.preprocessing
    )


class SiteDataSource:
    """The site's data, cached against a signature of the files it is read from."""

    def __init__(
        self,
        config: SiteConfig,
        salt: Callable[[], bytes],
        loader: Callable[[SiteConfig, bytes], LoadedData] = load_site_data,
    ) -> None:
        self.config = config
        self._salt = salt
        self._loader = loader
        self._lock = threading.Lock()
        self._cached: tuple[tuple[object, ...], LoadedData] | None = None
        self.loads = 0
        """How many times the data was actually read (for tests and benchmarks)."""

    def signature(self) -> tuple[object, ...]:
        """Names, sizes and modification times of every file loading reads."""
        config = self.config
        parts: list[object] = [listing_signature(config.data.path, config.site.state_dir)]
        if kind_of(config.data).reads_base_model:
            parts.append(listing_signature(config.site.base_model))
        return tuple(parts)

    def load(self) -> LoadedData:
        """The site's data; read again only if a file changed since the last read."""
        with self._lock:
            signature = self.signature()
            if self._cached is not None and self._cached[0] == signature:
                return self._cached[1]
            if self._cached is not None:
                logger.info("site %s: its data files changed; reading them again", self.site)
            loaded = self._loader(self.config, self._salt())
            self.loads += 1
            # Files changed while they were read: keep the result, but look again next time.
            after = self.signature()
            self._cached = (signature if after == signature else (), loaded)
            return loaded

    @property
    def site(self) -> str:
        return self.config.site.id

    def preprocessing(self) -> dict[str, Any]:
        """How records become model inputs here, read from the data only when the kind's
        cleaning is fitted on it (a table)."""
        described = kind_of(self.config.data).preprocessing(
            self.config.data, self.config.site.base_model
        )
        return described if described is not None else self.load().preprocessing
