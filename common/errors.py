"""fedlora's exception tree.

Every error fedlora raises on purpose derives from :class:`FedloraError`, so a CLI or a
daemon can catch one type, print the message (written for a site operator, never with a
traceback) and exit non-zero::

    FedloraError
    ├── ConfigError            a TOML file is missing, unreadable or invalid
    ├── DataError              site data cannot be used (schema, empty, too few records)
    ├── PolicyError            the site refuses to take part (budget, cohort, task)
    │   └── BudgetError        … because the round would cross its privacy budget
    ├── UpdateError            an adapter update does not match the run's schema
    ├── RegistryError          an unknown or duplicate task / aggregator name
    ├── SigningError           a key is missing, unreadable or of the wrong kind
    ├── AuditError             an audit log cannot be written or read as a log
    └── ArtifactError          an artifact fails verification (``kind`` says which check)
"""

from __future__ import annotations


class FedloraError(Exception):
    """Base of every error fedlora raises deliberately."""


class ConfigError(FedloraError):
    """A configuration file is missing or does not validate."""


class DataError(FedloraError):
    """Site data is unusable as a whole (single bad records are rejected, not raised)."""


class PolicyError(FedloraError):
    """The site's policy forbids this request: the site refuses rather than train."""


class UpdateError(FedloraError):
    """An adapter payload does not match the schema the run expects."""


class RegistryError(FedloraError):
    """A registry lookup or registration failed."""


class BudgetError(PolicyError):
    """The round would cross the site's privacy budget (or the run's planned share)."""


class SigningError(FedloraError):
    """A signing or verification key cannot be used."""


class AuditError(FedloraError):
    """An audit log cannot be appended to or parsed (tampering is a verification
    finding, not an exception)."""


class ArtifactError(FedloraError):
    """An artifact cannot be trusted or used. ``kind`` names the check that failed:
    ``missing-file``, ``bad-signature``, ``bad-manifest``, ``size-mismatch``,
    ``hash-mismatch``, ``bad-payload``, ``bad-model``, ``bad-input``, ``wrong-task``,
    ``wrong-base-model``, ``unchecked``, ``export-failed``, ``untrusted-signer`` or
    ``no-trusted-key``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
