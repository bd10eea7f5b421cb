"""The public name of a site: one rule, used wherever a site id enters.

A site id is what the coordinator, the audit logs and the PKI call an institution. It
is chosen by people and never derived from data, so it names no patient or customer;
the pattern keeps it usable as a file name, a certificate name and a log field.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

SITE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
SITE_ID = re.compile(SITE_ID_PATTERN)
"""2–63 lowercase letters, digits and '-', starting with a letter or digit."""

SiteId = Annotated[str, StringConstraints(pattern=SITE_ID_PATTERN)]
"""A site id as a pydantic field type."""


def is_site_id(value: object) -> bool:
    """True for a string that is a well-formed site id."""
    return isinstance(value, str) and SITE_ID.fullmatch(value) is not None  # "$" admits "\n"
