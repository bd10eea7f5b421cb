"""The base of every config table: unknown keys are errors and values are frozen.

Its own module because the site's, the data's and the run's tables all derive from it
(:mod:`common.config`, :mod:`common.data_config`, :mod:`common.federation_config`),
and none of those may import another only to get it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a site file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
