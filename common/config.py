"""Validated configuration: the site config and the federation (run) config.

Both are TOML files turned into pydantic v2 models when loaded. Relative paths in a
file are resolved against the file's own directory, so a site folder can be moved as a
whole. Any problem is raised as :class:`~common.errors.ConfigError` with one line per
field, naming the field and what was expected.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from common.errors import ConfigError

SiteKind = Literal["hospital", "bank"]
DataKind = Literal["dicom", "table", "text"]
AccountantName = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "functorch", "ghost"]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a site file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data ---


class DicomDataConfig(StrictModel):
    """A directory of DICOM files, labelled by a CSV or by one sub-folder per class."""

    format: Literal["dicom"]
    path: Path = Field(description="Directory holding the DICOM files.")
    classes: list[str] = Field(min_length=2, description="Class names, in label order.")
    labels: Literal["csv", "folders"] = Field(
        default="csv",
        description="'csv': a labels file with columns path,label; "
        "'folders': one sub-folder per class.",
    )
    labels_file: str = Field(default="labels.csv", description="Used when labels = 'csv'.")
    image_size: int = Field(default=32, ge=8, le=1024, description="Side after resizing.")
    window_center: float | None = Field(
        default=None, description="Overrides the file's Window Center (after rescale)."
    )
    window_width: float | None = Field(
        default=None, gt=0, description="Overrides the file's Window Width (after rescale)."
    )
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _window_pair(self) -> DicomDataConfig:
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("window_center and window_width must be given together")
        return self


class TabularDataConfig(StrictModel):
    """A CSV or Parquet table with a declared schema."""

    format: Literal["csv", "parquet"]
    path: Path = Field(description="The CSV or Parquet file.")
    classes: list[str] = Field(min_length=2, description="Label values (as text), in label order.")
    label_column: str
    person_column: str | None = Field(
        default=None, description="Column identifying the customer; stays at the site."
    )
    numeric_features: list[str] = Field(default_factory=list)
    categorical_features: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Column -> allowed values. Unlisted or missing values map to 'other'.",
    )
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _has_features(self) -> TabularDataConfig:
        if not self.numeric_features and not self.categorical_features:
            raise ValueError(
                "declare at least one numeric or categorical feature "
                "(or a text_column, for a table of texts)"
            )
        return self


class TextDataConfig(StrictModel):
    """A CSV, Parquet or JSON-lines file of texts (reports, narratives) with labels.

    Texts are tokenised at the site with the base model's own tokenizer. Empty texts are
    rejected; texts over ``max_tokens`` tokens are cut (or rejected, by ``overlong``) and
    texts over ``max_characters`` are rejected before tokenising, so one huge cell cannot
    exhaust the site's memory. Every such record is counted in the site's report.
    """

    format: Literal["csv", "parquet", "jsonl"]
    path: Path = Field(description="The CSV, Parquet or JSONL (one JSON object per line) file.")
    classes: list[str] = Field(min_length=2, description="Label values (as text), in label order.")
    text_column: str = Field(description="Column (JSONL: key) holding the text.")
    label_column: str
    person_column: str | None = Field(
        default=None, description="Column identifying the patient or customer; stays at the site."
    )
    max_tokens: int = Field(
        default=128, ge=8, le=8192, description="Tokens kept per text (the model's input length)."
    )
    overlong: Literal["truncate", "reject"] = Field(
        default="truncate",
        description="Texts longer than max_tokens: 'truncate' keeps their first max_tokens "
        "tokens, 'reject' leaves them out. Either way they are counted and reported.",
    )
    max_characters: int = Field(
        default=100_000, ge=1, description="Texts longer than this are rejected untokenised."
    )
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _distinct_columns(self) -> TextDataConfig:
        roles = {"text_column": self.text_column, "label_column": self.label_column}
        if self.person_column is not None:
            roles["person_column"] = self.person_column
        names = list(roles.values())
        for role, name in roles.items():
            if names.count(name) > 1:
                raise ValueError(f"column {name!r} is given for more than one role ({role}, …)")
        return self


def data_kind(data: object) -> DataKind | None:
    """Which kind of data a ``[data]`` table describes: ``format = "dicom"`` is DICOM,
    a table with a ``text_column`` (or in JSONL) is text, any other CSV/Parquet is a
    feature table. None when it is none of them."""
    if isinstance(data, dict):
        fmt, has_text = data.get("format"), "text_column" in data
    else:
        fmt, has_text = getattr(data, "format", None), isinstance(data, TextDataConfig)
    if fmt == "dicom":
        return "dicom"
    if has_text or fmt == "jsonl":
        return "text"
    if fmt in ("csv", "parquet"):
        return "table"
    return None


DataConfig = Annotated[
    Annotated[DicomDataConfig, Tag("dicom")]
    | Annotated[TabularDataConfig, Tag("table")]
    | Annotated[TextDataConfig, Tag("text")],
    Discriminator(
        data_kind,
        custom_error_type="data_format",
        custom_error_message="data.format must be 'dicom', 'csv', 'parquet' or 'jsonl' "
        "(a CSV/Parquet file with a text_column is text data)",
    ),
]


# --------------------------------------------------------------------------- site ---


class PrivacyBudget(StrictModel):
    epsilon: float = Field(gt=0, le=100, description="Total ε this dataset may ever spend.")
    delta: float = Field(default=1e-5, gt=0, lt=1e-2, description="δ of the guarantee.")
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
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$", description="Public site name.")
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


# --------------------------------------------------------------------- federation ---


class LoraSettings(StrictModel):
    r: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; the task's default when omitted."
    )


class DPSettings(StrictModel):
    max_grad_norm: float = Field(default=1.0, gt=0, description="Per-sample clipping bound C.")
    noise_multiplier: float | None = Field(
        default=None,
        ge=0,
        description="σ; when omitted each site calibrates σ so the run's planned rounds "
        "spend epsilon_per_run (or what is left of its budget).",
    )
    epsilon_per_run: float | None = Field(
        default=None,
        gt=0,
        description="ε this run asks each site to spend; a site whose remaining budget is "
        "smaller refuses. Omitted: each site may spend what is left of its budget.",
    )


class UpdateValidation(StrictModel):
    """What the coordinator checks in every update before it may be aggregated."""

    max_update_norm: float | Literal["derived", "off"] = Field(
        default="derived",
        description="L2 bound on a site's update (its adapter minus the global one). "
        "'derived': per reply, from the DP clipping bound, learning rate, steps and noise "
        "(the most honest DP-SGD can move); a number: a fixed bound; 'off': no bound "
        "(for robustness studies of the aggregators alone).",
    )
    max_payload_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Largest adapter payload accepted; omitted: twice the run's adapter size.",
    )
    min_examples: int = Field(
        default=20, ge=1, description="Smallest num-examples accepted (sites refuse below 20)."
    )
    max_examples: int = Field(
        default=10_000_000, ge=1, description="Largest num-examples accepted."
    )

    @field_validator("max_update_norm", mode="before")
    @classmethod
    def _not_a_flag(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("max_update_norm must be a number, 'derived' or 'off', not true/false")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> UpdateValidation:
        if self.min_examples > self.max_examples:
            raise ValueError("min_examples must not exceed max_examples")
        bound = self.max_update_norm
        if isinstance(bound, float) and not (math.isfinite(bound) and bound > 0):
            raise ValueError("max_update_norm must be a finite positive number, 'derived' or 'off'")
        return self


class RollbackGuard(StrictModel):
    """Keep the best global adapter when federated accuracy falls too far below it."""

    enabled: bool = True
    max_accuracy_drop: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="Largest drop below the best accuracy (0.03 = 3 points).",
    )


class FederationSettings(StrictModel):
    """How a task's federation runs: everything but which model and which task."""

    rounds: int = Field(default=5, ge=1, le=1000)
    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, description="Expected (Poisson) batch size.")
    learning_rate: float = Field(default=0.1, gt=0)
    optimizer: Literal["sgd", "adam"] = Field(
        default="sgd", description="'sgd' (momentum 0.9) is the robust choice under DP noise."
    )
    min_sites: int = Field(default=2, ge=1)
    aggregator: str = Field(
        default="fedavg",
        description="fedavg, fedavg-ffa, trimmed-mean, trimmed-mean-symmetric or median.",
    )
    trim_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=0.5,
        description="trimmed-mean: fraction of sites dropped at each end, per coordinate.",
    )
    round_timeout: float = Field(
        default=3600,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to wait for replies; late sites are skipped.",
    )
    update_precision: Literal["float16", "float32"] = Field(
        default="float16",
        description="Precision sites send their adapter updates in. 'float16' halves the "
        "traffic; its rounding is far below the DP noise, and the coordinator aggregates "
        "in float32/float64 either way.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dp: DPSettings = Field(default_factory=DPSettings)
    validation: UpdateValidation = Field(default_factory=UpdateValidation)
    rollback: RollbackGuard = Field(default_factory=RollbackGuard)

    @field_validator("lora")
    @classmethod
    def _no_dropout_under_dp(cls, value: LoraSettings) -> LoraSettings:
        if value.dropout != 0.0:
            raise ValueError("LoRA dropout must be 0 under DP-SGD (per-sample gradients)")
        return value


class FederationConfig(FederationSettings):
    """One run of one task: what to train, for how long, how privately and how defended."""

    task: str
    base_model: Path = Field(description="Directory of the frozen base model.")
    seed: int = 0


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
