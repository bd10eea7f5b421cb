"""Validated configuration: the site config and the federation (run) config.

Both are TOML files turned into pydantic v2 models when loaded. Relative paths in a
file are resolved against the file's own directory, so a site folder can be moved as a
whole. Any problem is raised as :class:`~common.errors.ConfigError` with one line per
field, naming the field and what was expected.

The data table (:mod:`common.data_config`) and the run's settings
(:mod:`common.federation_config`) have modules of their own; every name other modules
use is re-exported here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.data_config import (
    DataConfig,
    DataKind,
    DicomDataConfig,
    TabularDataConfig,
    TextDataConfig,
    data_kind,
)
from common.errors import ConfigError
from common.federation_config import (
    DPSettings,
    FederationConfig,
    FederationSettings,
    LoraSettings,
    RollbackGuard,
    UpdateValidation,
)
from common.identifiers import SiteId
from common.strict_model import StrictModel

__all__ = [
    "SMALLEST_COHORT",
    "AccountantName",
    "DPSettings",
    "DataConfig",
    "DataKind",
    "DicomDataConfig",
    "FederationConfig",
    "FederationSettings",
    "GradSampleMode",
    "LoraSettings",
    "PrivacyBudget",
    "RollbackGuard",
    "SiteConfig",
    "SiteConnection",
    "SiteIdentity",
    "SiteKind",
    "SitePolicy",
    "StrictModel",
    "TabularDataConfig",
    "TextDataConfig",
    "UpdateValidation",
    "data_kind",
    "format_validation_error",
    "load_federation_config",
    "load_site_config",
    "read_toml",
    "validate_model",
]

SiteKind = Literal["hospital", "bank"]
AccountantName = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "functorch", "ghost"]


# --------------------------------------------------------------------------- site ---


MAX_EPSILON_BUDGET = 100.0
MAX_DELTA = 1e-2
"""The largest ε budget a dataset may have and the bound δ stays below; the coordinator
holds a site's reported figures to them too."""


class PrivacyBudget(StrictModel):
    epsilon: float = Field(
        gt=0, le=MAX_EPSILON_BUDGET, description="Total ε this dataset may ever spend."
    )
    delta: float = Field(default=1e-5, gt=0, lt=MAX_DELTA, description="δ of the guarantee.")
    accountant: AccountantName = Field(
        default="prv", description="How ε is computed: 'prv' (tight, default) or 'rdp'."
    )
    grad_sample_mode: GradSampleMode = Field(
        default="hooks",
        description="How Opacus computes per-sample gradient norms: 'hooks' (default, "
        "fastest in benchmarks/dp_overhead.py), 'functorch', or 'ghost' (ghost clipping: "
        "less memory, a second backward pass). The privacy guarantee is the same.",
    )


SMALLEST_COHORT = 20
"""No site may train or report on fewer people than this (k); a site may ask for more."""


class SitePolicy(StrictModel):
    min_cohort: int = Field(
        default=SMALLEST_COHORT,
        ge=SMALLEST_COHORT,
        description="Refuse to train or report on fewer people (k).",
    )
    allowed_tasks: list[str] | None = Field(
        default=None, description="Tasks this site accepts; all when omitted."
    )
    client_releases: list[str] = Field(
        default_factory=list,
        description="SHA-256 of each app bundle (release) this site reviewed and runs in "
        "a deployment (`fedlora site release` shows them); every other is refused, and "
        "none is run when the list is empty.",
    )

    @field_validator("client_releases")
    @classmethod
    def _release_hashes(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not re.fullmatch(r"[0-9a-f]{64}", entry):
                raise ValueError(
                    f"{entry[:80]!r} is not a release hash (64 lowercase hex digits, as "
                    "`fedlora coordinator release` prints)"
                )
        return value


class SiteIdentity(StrictModel):
    id: SiteId = Field(description="Public site name.")
    kind: SiteKind
    task: str = Field(description="The task this site's data serves.")
    base_model: Path = Field(
        description="Local directory of the frozen base model (saved with save_pretrained)."
    )
    state_dir: Path = Field(
        default=Path("state"), description="Private state: ledger, salt, site logs."
    )
    signing_key: Path | None = Field(
        default=None,
        description="The site's Ed25519 key (PEM, mode 0600) that signs its audit log; "
        "created as <state_dir>/audit-key.pem on first use when omitted.",
    )

    coordinator_key: Path | None = Field(
        default=None,
        description="The coordinator's Ed25519 public key (PEM). The site checks and "
        "installs only artifacts signed by it; without it the site refuses artifacts.",
    )
    artifact_dir: Path | None = Field(
        default=None,
        description="Where verified artifacts are installed, one folder per task "
        "(default <state_dir>/artifacts).",
    )

    @property
    def audit_key_path(self) -> Path:
        return self.signing_key or self.state_dir / "audit-key.pem"

    @property
    def installed_artifacts(self) -> Path:
        return self.artifact_dir or self.state_dir / "artifacts"


class SiteConnection(StrictModel):
    """How the site daemon reaches the federation (``fedlora site run``): the values come
    in the bundle the coordinator hands over (``fedlora pki add-site``).

    The bundle's ``connection.toml`` also sets ``coordinator_key`` in this table, since
    it comes in the same bundle; the loaded config holds it as ``site.coordinator_key``
    (see :meth:`SiteConfig._coordinator_key_from_the_bundle`).
    """

    superlink: str = Field(
        pattern=r"^\S+:\d{1,5}$",
        description="The SuperLink's address as host:port, e.g. 'fl.example.org:8000'.",
    )
    ca_certificate: Path = Field(
        description="The federation's CA certificate (PEM): the SuperLink's TLS "
        "certificate must be signed by it."
    )
    node_key: Path = Field(
        description="This site's node-authentication private key (OpenSSH, EC P-384, "
        "mode 0600); the coordinator registered its public half."
    )


class SiteConfig(StrictModel):
    """Everything a site daemon needs to know about its own data and rules."""

    site: SiteIdentity
    data: DataConfig
    privacy: PrivacyBudget
    policy: SitePolicy = Field(default_factory=SitePolicy)
    connection: SiteConnection | None = Field(
        default=None, description="Needed by the site daemon only, not by simulations."
    )

    @model_validator(mode="before")
    @classmethod
    def _coordinator_key_from_the_bundle(cls, data: Any) -> Any:
        """Accept ``coordinator_key`` in ``[connection]`` too, where the bundle's
        connection.toml puts it, and move it to ``site.coordinator_key``: the one place
        the rest of fedlora reads it. Given in both tables, it is an error."""
        if not isinstance(data, dict):
            return data
        connection, site = data.get("connection"), data.get("site")
        if not isinstance(connection, dict) or "coordinator_key" not in connection:
            return data
        if isinstance(site, dict) and "coordinator_key" in site:
            raise ValueError(
                "coordinator_key is set in both [site] and [connection]; keep one "
                "(the bundle's connection.toml sets it in [connection])"
            )
        connection = dict(connection)
        key = connection.pop("coordinator_key")
        if not isinstance(key, str):
            raise ValueError("connection.coordinator_key must be a file path (a TOML string)")
        moved = {**data, "connection": connection}
        if isinstance(site, dict):
            moved["site"] = {**site, "coordinator_key": key}
        return moved

    @model_validator(mode="after")
    def _kind_matches_data(self) -> SiteConfig:
        # Hospitals hold images or texts (reports), banks tables or texts (narratives).
        allowed: dict[SiteKind, tuple[DataKind, ...]] = {
            "hospital": ("dicom", "text"),
            "bank": ("table", "text"),
        }
        kind = data_kind(self.data)
        if kind not in allowed[self.site.kind]:
            described = {"dicom": "DICOM", "table": "CSV/Parquet tables", "text": "texts"}
            raise ValueError(
                f"site.kind = {self.site.kind!r} expects "
                + " or ".join(described[k] for k in allowed[self.site.kind])
                + f", but data.format = {self.data.format!r}"
            )
        return self


# ------------------------------------------------------------------------ loading ---

ModelT = TypeVar("ModelT", bound=BaseModel)


_DATA_FORMATS = frozenset({"dicom", "table", "text"})
"""The union tags pydantic puts in error locations (see :func:`data_kind`)."""


def _toml_location(location: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Drop pydantic's union tag (``data.csv.path`` -> ``data.path``): it is not a TOML key."""
    if len(location) >= 2 and location[0] == "data" and location[1] in _DATA_FORMATS:
        return (location[0], *location[2:])
    return location


_SITE_TABLES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("site", SiteIdentity),
    ("privacy", PrivacyBudget),
    ("policy", SitePolicy),
    ("connection", SiteConnection),
)
"""The site config's fixed tables, to tell where a key pasted into the wrong one belongs."""


def _unknown_key_message(model: str, location: tuple[int | str, ...]) -> str:
    """``unknown key``, naming the table a site-config key belongs in when it sits in
    another one (a line uncommented under the wrong header, say)."""
    if model == SiteConfig.__name__ and len(location) == 2:
        table, key = location
        for home, fields in _SITE_TABLES:
            if home != table and isinstance(key, str) and key in fields.model_fields:
                return f"unknown key (check the spelling; {key} belongs in the [{home}] table)"
    return "unknown key (check the spelling)"


def format_validation_error(error: ValidationError, source: str) -> str:
    """One readable line per problem: ``field.path: what is wrong``."""
    lines = [f"{source} is invalid:"]
    for item in error.errors():
        toml_location = _toml_location(item["loc"])
        location = ".".join(str(part) for part in toml_location) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = _unknown_key_message(error.title, toml_location)
        elif item["type"] == "missing":
            message = "required, but missing"
        elif item["type"] == "data_format" and isinstance(item["input"], dict):
            found = item["input"].get("format")
            message = (
                f"{message}; found {found!r}"
                if found is not None
                else f"{message}; 'format' is missing"
            )
        lines.append(f"  - {location}: {message}")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax problems into ConfigError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files must be UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from exc


def validate_model(model: type[ModelT], data: dict[str, Any], source: str) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def _resolve(base: Path, value: Path) -> Path:
    """Absolute and free of symlinks, so two paths to one folder compare equal."""
    return (base / value).resolve()


def load_site_config(path: Path | str) -> SiteConfig:
    """Load and validate a site TOML file; relative paths are taken from its folder."""
    path = Path(path)
    config = validate_model(SiteConfig, read_toml(path), str(path))
    base = path.resolve().parent
    state_dir, data_path = _resolve(base, config.site.state_dir), _resolve(base, config.data.path)
    if state_dir == data_path or state_dir.is_relative_to(data_path):
        # The data's content hash names its privacy ledger: state inside it would change it.
        raise ConfigError(f"{path}: site.state_dir must not lie inside data.path")
    optional = {
        name: _resolve(base, value) if value is not None else None
        for name, value in (
            ("signing_key", config.site.signing_key),
            ("coordinator_key", config.site.coordinator_key),
            ("artifact_dir", config.site.artifact_dir),
        )
    }
    artifact_dir = optional["artifact_dir"]
    if artifact_dir is not None and artifact_dir.is_relative_to(data_path):
        raise ConfigError(f"{path}: site.artifact_dir must not lie inside data.path")
    connection = config.connection
    if connection is not None:
        connection = connection.model_copy(
            update={
                "ca_certificate": _resolve(base, connection.ca_certificate),
                "node_key": _resolve(base, connection.node_key),
            }
        )
    return config.model_copy(
        update={
            "connection": connection,
            "site": config.site.model_copy(
                update={
                    "state_dir": state_dir,
                    "base_model": _resolve(base, config.site.base_model),
                    **optional,
                }
            ),
            "data": config.data.model_copy(update={"path": _resolve(base, config.data.path)}),
        }
    )


def load_federation_config(path: Path | str) -> FederationConfig:
    path = Path(path)
    config = validate_model(FederationConfig, read_toml(path), str(path))
    base = path.resolve().parent
    return config.model_copy(update={"base_model": _resolve(base, config.base_model)})
