"""Site and federation TOML files: what loads, and how every mistake is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from common.config import (
    DicomDataConfig,
    FederationConfig,
    SiteConfig,
    TabularDataConfig,
    TextDataConfig,
    load_federation_config,
    load_site_config,
)
from common.errors import ConfigError, FedloraError

HOSPITAL = """\
[site]
id = "hospital-a"
kind = "hospital"
task = "dicom-classification"
base_model = "../models/vit"

[data]
format = "dicom"
path = "data/dicom"
classes = ["normal", "pneumonia"]
labels = "folders"
window_center = 40.0
window_width = 400.0

[privacy]
epsilon = 8.0
delta = 1e-6

[policy]
min_cohort = 25
allowed_tasks = ["dicom-classification"]
"""

BANK = """\
[site]
id = "bank-a"
kind = "bank"
task = "tabular-classification"
base_model = "models/ft"
state_dir = "private/state"

[data]
format = "parquet"
path = "tables/customers.parquet"
classes = ["no", "yes"]
label_column = "defaulted"
person_column = "customer_id"
numeric_features = ["age", "income"]

[data.categorical_features]
region = ["north", "south"]

[privacy]
epsilon = 3
"""

FEDERATION = """\
task = "tabular-classification"
base_model = "models/ft"
rounds = 7
min_sites = 3

[lora]
r = 8
alpha = 16
target_modules = ["q_proj"]

[dp]
noise_multiplier = 1.1
epsilon_per_run = 2.5
"""


def _write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(loader, path: Path) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert isinstance(info.value, FedloraError)
    message = str(info.value)
    assert str(path) in message, message
    return message


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"fixture text lacks {old!r}"
    return text.replace(old, new, 1)


# ------------------------------------------------------------------- valid files ---


def test_valid_hospital_file_loads_with_paths_resolved_against_its_folder(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "sites" / "hospital-a"
    folder.mkdir(parents=True)
    config = load_site_config(_write(folder, HOSPITAL))

    assert isinstance(config, SiteConfig)
    assert config.site.id == "hospital-a"
    assert config.site.kind == "hospital"
    assert isinstance(config.data, DicomDataConfig)
    assert config.data.path == (folder / "data" / "dicom").resolve()
    assert config.site.base_model == (tmp_path / "sites" / "models" / "vit").resolve()
    # state_dir was not given: its default is resolved against the file's folder too.
    assert config.site.state_dir == (folder / "state").resolve()
    assert config.data.classes == ["normal", "pneumonia"]
    assert config.data.labels == "folders"
    assert (config.data.window_center, config.data.window_width) == (40.0, 400.0)
    assert config.data.image_size is None  # the loader follows the base model
    assert config.privacy.epsilon == 8.0
    assert config.privacy.delta == 1e-6
    assert config.policy.min_cohort == 25
    assert config.policy.allowed_tasks == ["dicom-classification"]


def test_valid_bank_file_loads_with_defaults(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, BANK, "bank.toml"))

    assert config.site.kind == "bank"
    assert isinstance(config.data, TabularDataConfig)
    assert config.data.format == "parquet"
    assert config.data.path == (tmp_path / "tables" / "customers.parquet").resolve()
    assert config.site.base_model == (tmp_path / "models" / "ft").resolve()
    assert config.site.state_dir == (tmp_path / "private" / "state").resolve()
    assert config.data.categorical_features == {"region": ["north", "south"]}
    assert config.data.numeric_features == ["age", "income"]
    assert config.data.holdout_fraction == 0.2
    assert config.privacy.epsilon == 3.0
    assert config.privacy.delta == 1e-5
    assert config.policy.min_cohort == 20
    assert config.policy.allowed_tasks is None


def test_relative_path_is_resolved_from_the_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = _write(folder, BANK)
    monkeypatch.chdir(elsewhere)

    config = load_site_config(Path("..") / "conf" / "site.toml")

    assert config.data.path == (path.parent / "tables" / "customers.parquet").resolve()
    assert config.site.base_model.is_absolute()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "model"
    text = _replace(BANK, 'base_model = "models/ft"', f'base_model = "{absolute.as_posix()}"')
    config = load_site_config(_write(tmp_path, text))
    assert config.site.base_model == absolute


def test_valid_federation_file(tmp_path: Path) -> None:
    config = load_federation_config(_write(tmp_path, FEDERATION, "run.toml"))

    assert isinstance(config, FederationConfig)
    assert config.task == "tabular-classification"
    assert config.base_model == (tmp_path / "models" / "ft").resolve()
    assert config.rounds == 7
    assert config.min_sites == 3
    assert config.local_epochs == 1
    assert config.aggregator == "fedavg"
    assert config.lora.r == 8
    assert config.lora.alpha == 16.0
    assert config.lora.dropout == 0.0
    assert config.lora.target_modules == ["q_proj"]
    assert config.dp.noise_multiplier == 1.1
    assert config.dp.epsilon_per_run == 2.5
    assert config.dp.max_grad_norm == 1.0


def test_federation_defaults() -> None:
    config = FederationConfig(task="t", base_model=Path("/m"))
    assert config.rounds == 5
    assert config.batch_size == 32
    assert config.optimizer == "sgd"
    assert config.lora.r == 16
    assert config.lora.alpha == 32.0
    assert config.lora.target_modules is None
    assert config.dp.noise_multiplier is None
    assert config.dp.epsilon_per_run is None


def test_models_are_frozen() -> None:
    config = FederationConfig(task="t", base_model=Path("/m"))
    with pytest.raises(ValidationError, match="frozen"):
        config.rounds = 9  # type: ignore[misc]


# ----------------------------------------------------------------- site mistakes ---


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "epsilon = 8.0\n", "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "privacy.epsilon: required" in message


def test_missing_whole_section_is_named(tmp_path: Path) -> None:
    text = _replace(BANK, "[privacy]\nepsilon = 3\n", "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "  - privacy: required, but missing" in message


def test_wrong_type_names_field_and_expected_type(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "epsilon = 8.0", 'epsilon = "lots"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "privacy.epsilon:" in message
    assert "valid number" in message


def test_unknown_key_is_reported_as_a_typo(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "allowed_tasks", "alowed_tasks")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "policy.alowed_tasks: unknown key" in message
    assert "spelling" in message


def test_unknown_top_level_section_is_reported(tmp_path: Path) -> None:
    message = _error(load_site_config, _write(tmp_path, BANK + "\n[extras]\nx = 1\n"))
    assert "extras: unknown key" in message


def test_every_problem_is_reported_once_per_line(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "epsilon = 8.0", "epsilon = -1.0")
    text = _replace(text, "min_cohort = 25", "min_cohort = 5")
    message = _error(load_site_config, _write(tmp_path, text))
    lines = message.splitlines()
    assert lines[0] == f"{tmp_path / 'site.toml'} is invalid:"
    assert len(lines) == 3
    assert any(line.startswith("  - privacy.epsilon:") for line in lines)
    assert any(line.startswith("  - policy.min_cohort:") for line in lines)


def test_hospital_with_table_data_is_rejected(tmp_path: Path) -> None:
    text = _replace(BANK, 'kind = "bank"', 'kind = "hospital"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "site.kind = 'hospital' expects DICOM or texts" in message
    assert "data.format = 'parquet'" in message


def test_bank_with_dicom_data_is_rejected(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, 'kind = "hospital"', 'kind = "bank"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "site.kind = 'bank' expects CSV/Parquet tables or texts" in message
    assert "data.format = 'dicom'" in message


def test_window_center_without_width(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "window_width = 400.0\n", "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "window_center and window_width must be given together" in message
    assert "  - data" in message


def test_window_width_must_be_positive(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "window_width = 400.0", "window_width = 0.0")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "window_width: Input should be greater than 0" in message


@pytest.mark.parametrize("value", [19, 0, -5])
def test_min_cohort_below_20_is_rejected(tmp_path: Path, value: int) -> None:
    text = _replace(HOSPITAL, "min_cohort = 25", f"min_cohort = {value}")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "policy.min_cohort: Input should be greater than or equal to 20" in message


def test_min_cohort_of_exactly_20_is_accepted(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "min_cohort = 25", "min_cohort = 20")
    assert load_site_config(_write(tmp_path, text)).policy.min_cohort == 20


@pytest.mark.parametrize("value", ["0", "0.0", "-1.5"])
def test_epsilon_must_be_positive(tmp_path: Path, value: str) -> None:
    text = _replace(HOSPITAL, "epsilon = 8.0", f"epsilon = {value}")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "privacy.epsilon: Input should be greater than 0" in message


def test_epsilon_above_100_is_rejected(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "epsilon = 8.0", "epsilon = 101.0")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "privacy.epsilon: Input should be less than or equal to 100" in message


def test_delta_must_be_small(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "delta = 1e-6", "delta = 0.05")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "privacy.delta: Input should be less than 0.01" in message


@pytest.mark.parametrize(
    "site_id", ["Hospital-A", "hospital_a", "-hospital", "h", "spital a", "x" * 64]
)
def test_bad_site_id_is_rejected(tmp_path: Path, site_id: str) -> None:
    text = _replace(HOSPITAL, 'id = "hospital-a"', f'id = "{site_id}"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "site.id: String should match pattern" in message


@pytest.mark.parametrize("site_id", ["h1", "0-site", "a" * 63])
def test_good_site_ids_are_accepted(tmp_path: Path, site_id: str) -> None:
    text = _replace(HOSPITAL, 'id = "hospital-a"', f'id = "{site_id}"')
    assert load_site_config(_write(tmp_path, text)).site.id == site_id


def test_unknown_site_kind(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, 'kind = "hospital"', 'kind = "clinic"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "site.kind: Input should be 'hospital' or 'bank'" in message


def test_unknown_data_format_lists_the_known_ones(tmp_path: Path) -> None:
    text = _replace(BANK, 'format = "parquet"', 'format = "xlsx"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "  - data: " in message
    assert "'xlsx'" in message
    for tag in ("'dicom'", "'csv'", "'parquet'"):
        assert tag in message


def test_missing_data_format(tmp_path: Path) -> None:
    text = _replace(BANK, 'format = "parquet"\n', "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "  - data: " in message
    assert "'format'" in message


def test_only_one_class_is_rejected(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, 'classes = ["normal", "pneumonia"]', 'classes = ["normal"]')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "classes: List should have at least 2 items" in message


def test_table_without_features_is_rejected(tmp_path: Path) -> None:
    text = _replace(BANK, 'numeric_features = ["age", "income"]\n', "")
    text = _replace(text, '[data.categorical_features]\nregion = ["north", "south"]\n', "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "declare at least one numeric or categorical feature" in message


def test_field_path_in_data_section_matches_the_toml_key(tmp_path: Path) -> None:
    text = _replace(BANK, 'label_column = "defaulted"\n', "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "  - data.label_column: required, but missing" in message


def test_field_path_in_data_section_names_the_field(tmp_path: Path) -> None:
    text = _replace(BANK, 'label_column = "defaulted"\n', "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "label_column: required, but missing" in message


# ----------------------------------------------------------- federation mistakes ---


@pytest.mark.parametrize("dropout", ["0.1", "0.5"])
def test_lora_dropout_is_rejected_under_dp(tmp_path: Path, dropout: str) -> None:
    text = FEDERATION.replace("[lora]\n", f"[lora]\ndropout = {dropout}\n")
    message = _error(load_federation_config, _write(tmp_path, text, "run.toml"))
    assert "  - lora: " in message
    assert "LoRA dropout must be 0 under DP-SGD" in message


def test_lora_dropout_zero_is_accepted(tmp_path: Path) -> None:
    text = FEDERATION.replace("[lora]\n", "[lora]\ndropout = 0.0\n")
    assert load_federation_config(_write(tmp_path, text)).lora.dropout == 0.0


def test_federation_missing_task_and_unknown_key(tmp_path: Path) -> None:
    text = _replace(FEDERATION, 'task = "tabular-classification"\n', "")
    text = _replace(text, "rounds = 7", "round = 7")
    message = _error(load_federation_config, _write(tmp_path, text))
    assert "  - task: required, but missing" in message
    assert "  - round: unknown key" in message


def test_federation_bad_values(tmp_path: Path) -> None:
    text = _replace(FEDERATION, "rounds = 7", "rounds = 0")
    text = _replace(text, "noise_multiplier = 1.1", "noise_multiplier = -0.5")
    text = _replace(text, "epsilon_per_run = 2.5", "epsilon_per_run = 0")
    message = _error(load_federation_config, _write(tmp_path, text))
    assert "  - rounds: Input should be greater than or equal to 1" in message
    assert "  - dp.noise_multiplier: Input should be greater than or equal to 0" in message
    assert "  - dp.epsilon_per_run: Input should be greater than 0" in message


def test_federation_wrong_type(tmp_path: Path) -> None:
    text = _replace(FEDERATION, "min_sites = 3", 'min_sites = "three"')
    message = _error(load_federation_config, _write(tmp_path, text))
    assert "  - min_sites: Input should be a valid integer" in message


# -------------------------------------------------------------- unreadable files ---


@pytest.mark.parametrize("loader", [load_site_config, load_federation_config])
def test_invalid_toml_syntax(tmp_path: Path, loader) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, '[site]\nid = "unterminated\n')
    message = _error(loader, path)
    assert "not valid TOML" in message


@pytest.mark.parametrize("loader", [load_site_config, load_federation_config])
def test_missing_file(tmp_path: Path, loader) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "nowhere" / "site.toml"
    message = _error(loader, path)
    assert message == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = _error(load_site_config, tmp_path)
    assert "cannot be read" in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('task = "Zürich"\n'.encode("latin-1"))
    _error(load_federation_config, path)


def test_state_dir_inside_the_data_is_refused(tmp_path: Path) -> None:
    """The data's content hash names its privacy ledger; state inside it would change it."""
    text = _replace(
        HOSPITAL,
        'base_model = "../models/vit"',
        'base_model = "../models/vit"\nstate_dir = "data/dicom/state"',
    )
    message = _error(load_site_config, _write(tmp_path, text))
    assert "state_dir must not lie inside data.path" in message


# ---------------------------------------------------- update validation, rollback ---


def _federation_with(tmp_path: Path, extra: str, top: str = "") -> Path:
    """The FEDERATION file with ``top`` keys added at the top level and ``extra`` sections
    appended."""
    text = _replace(FEDERATION, "min_sites = 3\n", f"min_sites = 3\n{top}")
    return _write(tmp_path, text + extra, "run.toml")


def test_validation_and_rollback_defaults() -> None:
    config = FederationConfig(task="t", base_model=Path("/m"))
    assert config.validation.max_update_norm == "derived"
    assert config.validation.max_payload_bytes is None
    assert config.validation.min_examples == 20
    assert config.validation.max_examples == 10_000_000
    assert config.rollback.enabled is True
    assert config.rollback.max_accuracy_drop == 0.03
    assert config.trim_fraction == 0.2
    assert config.round_timeout == 3600
    assert config.aggregator == "fedavg"


def test_a_file_without_the_new_sections_gets_the_defaults(tmp_path: Path) -> None:
    config = load_federation_config(_write(tmp_path, FEDERATION, "run.toml"))
    assert config.validation == FederationConfig(task="t", base_model=Path("/m")).validation
    assert config.rollback.enabled is True
    assert config.rollback.max_accuracy_drop == 0.03


def test_federation_file_with_validation_and_rollback_sections(tmp_path: Path) -> None:
    path = _federation_with(
        tmp_path,
        """
[validation]
max_update_norm = 2.5
max_payload_bytes = 100000
min_examples = 50
max_examples = 5000

[rollback]
enabled = false
max_accuracy_drop = 0.1
""",
        top='aggregator = "trimmed-mean"\ntrim_fraction = 0.25\nround_timeout = 90.5\n',
    )
    config = load_federation_config(path)
    assert config.aggregator == "trimmed-mean"
    assert config.trim_fraction == 0.25
    assert config.round_timeout == 90.5
    assert config.validation.max_update_norm == 2.5
    assert isinstance(config.validation.max_update_norm, float)
    assert config.validation.max_payload_bytes == 100_000
    assert (config.validation.min_examples, config.validation.max_examples) == (50, 5000)
    assert config.rollback.enabled is False
    assert config.rollback.max_accuracy_drop == 0.1
    # What the file did not touch is unchanged.
    assert config.rounds == 7
    assert config.dp.noise_multiplier == 1.1


@pytest.mark.parametrize("value", ['"derived"', '"off"'])
def test_max_update_norm_keywords(tmp_path: Path, value: str) -> None:
    path = _federation_with(tmp_path, f"\n[validation]\nmax_update_norm = {value}\n")
    assert load_federation_config(path).validation.max_update_norm == value.strip('"')


def test_max_update_norm_given_as_an_integer_is_a_number(tmp_path: Path) -> None:
    path = _federation_with(tmp_path, "\n[validation]\nmax_update_norm = 3\n")
    norm = load_federation_config(path).validation.max_update_norm
    assert norm == 3.0
    assert not isinstance(norm, str)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", "max_update_norm must be a finite positive number, 'derived' or 'off'"),
        ("0", "max_update_norm must be a finite positive number, 'derived' or 'off'"),
        ("0.0", "max_update_norm must be a finite positive number, 'derived' or 'off'"),
        # NaN would switch the check off silently: no norm is ever greater than NaN.
        ("nan", "max_update_norm must be a finite positive number, 'derived' or 'off'"),
        ("inf", "max_update_norm must be a finite positive number, 'derived' or 'off'"),
        ("true", "max_update_norm must be a number, 'derived' or 'off', not true/false"),
    ],
)
def test_max_update_norm_must_be_a_finite_positive_number(
    tmp_path: Path, value: str, expected: str
) -> None:
    path = _federation_with(tmp_path, f"\n[validation]\nmax_update_norm = {value}\n")
    message = _error(load_federation_config, path)
    assert "validation" in message
    assert expected in message


def test_round_timeout_must_be_finite(tmp_path: Path) -> None:
    path = _federation_with(tmp_path, "", top="round_timeout = inf\n")
    message = _error(load_federation_config, path)
    assert "round_timeout: Input should be a finite number" in message


@pytest.mark.parametrize("value", ['"sometimes"', '"Derived"', '""'])
def test_max_update_norm_unknown_word(tmp_path: Path, value: str) -> None:
    path = _federation_with(tmp_path, f"\n[validation]\nmax_update_norm = {value}\n")
    message = _error(load_federation_config, path)
    assert "validation.max_update_norm" in message
    assert "'derived'" in message and "'off'" in message


def test_min_examples_above_max_examples(tmp_path: Path) -> None:
    path = _federation_with(tmp_path, "\n[validation]\nmin_examples = 500\nmax_examples = 100\n")
    message = _error(load_federation_config, path)
    assert "  - validation: " in message
    assert "min_examples must not exceed max_examples" in message


def test_min_examples_equal_to_max_examples_is_accepted(tmp_path: Path) -> None:
    path = _federation_with(tmp_path, "\n[validation]\nmin_examples = 100\nmax_examples = 100\n")
    config = load_federation_config(path)
    assert config.validation.min_examples == config.validation.max_examples == 100


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("min_examples = 0", "validation.min_examples: Input should be greater than or equal to 1"),
        ("max_examples = 0", "validation.max_examples: Input should be greater than or equal to 1"),
        ("max_payload_bytes = 0", "validation.max_payload_bytes: Input should be greater than 0"),
        (
            "max_payload_bytes = 1.5",
            "validation.max_payload_bytes: Input should be a valid integer",
        ),
    ],
)
def test_validation_bounds(tmp_path: Path, line: str, expected: str) -> None:
    message = _error(
        load_federation_config, _federation_with(tmp_path, f"\n[validation]\n{line}\n")
    )
    assert f"  - {expected}" in message


@pytest.mark.parametrize("value", ["0.5", "0.7", "-0.1"])
def test_trim_fraction_must_leave_sites(tmp_path: Path, value: str) -> None:
    path = _federation_with(tmp_path, "", top=f"trim_fraction = {value}\n")
    message = _error(load_federation_config, path)
    assert "  - trim_fraction: Input should be" in message


def test_trim_fraction_zero_and_just_below_half_are_accepted(tmp_path: Path) -> None:
    for value in (0.0, 0.49):
        path = _federation_with(tmp_path, "", top=f"trim_fraction = {value}\n")
        assert load_federation_config(path).trim_fraction == value


@pytest.mark.parametrize("value", ["0", "-5"])
def test_round_timeout_must_be_positive(tmp_path: Path, value: str) -> None:
    path = _federation_with(tmp_path, "", top=f"round_timeout = {value}\n")
    message = _error(load_federation_config, path)
    assert "  - round_timeout: Input should be greater than 0" in message


def test_unknown_key_under_validation_is_reported(tmp_path: Path) -> None:
    path = _federation_with(tmp_path, "\n[validation]\nmax_update_nrom = 2.0\n")
    message = _error(load_federation_config, path)
    assert "  - validation.max_update_nrom: unknown key (check the spelling)" in message


def test_unknown_key_under_rollback_is_reported(tmp_path: Path) -> None:
    path = _federation_with(tmp_path, "\n[rollback]\nenable = true\n")
    message = _error(load_federation_config, path)
    assert "  - rollback.enable: unknown key (check the spelling)" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_accuracy_drop = 1.5", "rollback.max_accuracy_drop: Input should be less than"),
        ("max_accuracy_drop = -0.01", "rollback.max_accuracy_drop: Input should be greater"),
        ('enabled = "sometimes"', "rollback.enabled: Input should be a valid boolean"),
    ],
)
def test_rollback_bad_values(tmp_path: Path, line: str, expected: str) -> None:
    message = _error(load_federation_config, _federation_with(tmp_path, f"\n[rollback]\n{line}\n"))
    assert f"  - {expected}" in message


def test_several_problems_in_the_new_sections_are_each_reported(tmp_path: Path) -> None:
    path = _federation_with(
        tmp_path,
        '\n[validation]\nmax_update_norm = "sometimes"\nmin_examples = 0\n'
        "\n[rollback]\nmax_accuracy_drop = 2\n",
        top="trim_fraction = 0.5\n",
    )
    message = _error(load_federation_config, path)
    for field in (
        "trim_fraction",
        "validation.max_update_norm",
        "validation.min_examples",
        "rollback.max_accuracy_drop",
    ):
        assert f"  - {field}" in message, field


def test_the_settings_are_shared_with_the_simulation_task_spec() -> None:
    from common.config import FederationSettings
    from simulations.scenario import TaskRunSpec

    assert issubclass(TaskRunSpec, FederationSettings)
    assert issubclass(FederationConfig, FederationSettings)
    spec = TaskRunSpec.model_validate(
        {"validation": {"max_update_norm": "off"}, "rollback": {"enabled": False}}
    )
    assert spec.validation.max_update_norm == "off"
    assert spec.rollback.enabled is False
    with pytest.raises(ValidationError, match="min_examples must not exceed max_examples"):
        TaskRunSpec.model_validate({"validation": {"min_examples": 9, "max_examples": 3}})


def test_artifact_paths_are_resolved_against_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "sites" / "hospital-a"
    folder.mkdir(parents=True)
    text = _replace(
        HOSPITAL,
        'base_model = "../models/vit"',
        'base_model = "../models/vit"\ncoordinator_key = "keys/coordinator.pub"\n'
        'artifact_dir = "installed"',
    )
    config = load_site_config(_write(folder, text))
    assert config.site.coordinator_key == (folder / "keys" / "coordinator.pub").resolve()
    assert config.site.installed_artifacts == (folder / "installed").resolve()
    # Without artifact_dir, artifacts go into the (resolved) state folder.
    default = load_site_config(_write(folder, HOSPITAL))
    assert default.site.coordinator_key is None
    assert default.site.installed_artifacts == (folder / "state" / "artifacts").resolve()


def test_artifact_dir_inside_the_data_is_refused(tmp_path: Path) -> None:
    # Installing there would change the data's content hash, hence its privacy ledger.
    text = _replace(
        HOSPITAL,
        'base_model = "../models/vit"',
        'base_model = "../models/vit"\nartifact_dir = "data/dicom/models"',
    )
    message = _error(load_site_config, _write(tmp_path, text))
    assert "site.artifact_dir must not lie inside data.path" in message


TEXTS = """\
[site]
id = "hospital-t"
kind = "hospital"
task = "text-classification"
base_model = "models/llm"

[data]
format = "jsonl"
path = "reports/reports.jsonl"
classes = ["routine", "urgent"]
text_column = "report"
label_column = "triage"
person_column = "patient_id"
max_tokens = 96

[privacy]
epsilon = 4
"""


@pytest.mark.parametrize("kind", ["hospital", "bank"])
def test_texts_load_for_hospitals_and_banks(tmp_path: Path, kind: str) -> None:
    config = load_site_config(
        _write(tmp_path, _replace(TEXTS, 'kind = "hospital"', f'kind = "{kind}"'))
    )
    assert isinstance(config.data, TextDataConfig)
    assert config.data.max_tokens == 96 and config.data.overlong == "truncate"
    assert config.data.path == (tmp_path / "reports" / "reports.jsonl").resolve()


def test_a_csv_with_a_text_column_is_text_data(tmp_path: Path) -> None:
    text = _replace(TEXTS, 'format = "jsonl"', 'format = "csv"')
    assert isinstance(load_site_config(_write(tmp_path, text)).data, TextDataConfig)


def test_jsonl_without_a_text_column_names_the_key(tmp_path: Path) -> None:
    text = _replace(TEXTS, 'text_column = "report"\n', "")
    message = _error(load_site_config, _write(tmp_path, text))
    assert "data.text_column: required, but missing" in message


def test_one_column_in_two_text_roles_is_refused(tmp_path: Path) -> None:
    text = _replace(TEXTS, 'label_column = "triage"', 'label_column = "report"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "column 'report' is given for more than one role" in message


def test_overlong_takes_truncate_or_reject(tmp_path: Path) -> None:
    text = _replace(TEXTS, "max_tokens = 96", 'max_tokens = 96\noverlong = "drop"')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "data.overlong: Input should be 'truncate' or 'reject'" in message


# ------------------------------------------------------------------- connection ---

CONNECTION = """
[connection]
superlink = "fl.example.org:9092"
ca_certificate = "bundle/ca.pem"
node_key = "keys/node.key"
"""


def test_connection_paths_are_resolved_against_the_file(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, HOSPITAL + CONNECTION))
    assert config.connection is not None
    assert config.connection.superlink == "fl.example.org:9092"
    assert config.connection.ca_certificate == (tmp_path / "bundle" / "ca.pem").resolve()
    assert config.connection.node_key == (tmp_path / "keys" / "node.key").resolve()
    assert config.site.coordinator_key is None


def test_coordinator_key_in_connection_is_the_sites_coordinator_key(tmp_path: Path) -> None:
    """The bundle's connection.toml sets it in [connection]: it is read as site.coordinator_key."""
    text = HOSPITAL + CONNECTION + 'coordinator_key = "bundle/coordinator.pub"\n'
    config = load_site_config(_write(tmp_path, text))
    assert config.site.coordinator_key == (tmp_path / "bundle" / "coordinator.pub").resolve()
    assert config.connection is not None
    assert "coordinator_key" not in config.connection.model_dump()


def test_coordinator_key_in_both_tables_is_refused(tmp_path: Path) -> None:
    text = _replace(
        HOSPITAL,
        'base_model = "../models/vit"',
        'base_model = "../models/vit"\ncoordinator_key = "keys/coordinator.pub"',
    )
    text += CONNECTION + 'coordinator_key = "bundle/coordinator.pub"\n'
    message = _error(load_site_config, _write(tmp_path, text))
    assert "coordinator_key is set in both [site] and [connection]; keep one" in message


def test_coordinator_key_in_connection_must_be_a_path(tmp_path: Path) -> None:
    message = _error(
        load_site_config, _write(tmp_path, HOSPITAL + CONNECTION + "coordinator_key = 7\n")
    )
    assert "connection.coordinator_key must be a file path" in message


def test_coordinator_key_in_connection_without_a_site_table(tmp_path: Path) -> None:
    text = HOSPITAL.split("[data]", 1)[1]
    message = _error(
        load_site_config,
        _write(tmp_path, "[data]" + text + CONNECTION + 'coordinator_key = "c.pub"\n'),
    )
    assert "  - site: required, but missing" in message


@pytest.mark.parametrize(
    ("table", "key", "home"),
    [
        ("policy", 'signing_key = "keys/audit-key.pem"', "site"),
        ("policy", 'coordinator_key = "bundle/coordinator.pub"', "site"),
        ("connection", 'signing_key = "keys/audit-key.pem"', "site"),
        ("site", 'node_key = "keys/node.key"', "connection"),
        ("policy", "epsilon = 3.0", "privacy"),
    ],
)
def test_a_key_in_the_wrong_table_names_its_table(
    tmp_path: Path, table: str, key: str, home: str
) -> None:
    text = HOSPITAL + CONNECTION
    header = f"[{table}]\n"
    text = _replace(text, header, header + key + "\n")
    message = _error(load_site_config, _write(tmp_path, text))
    name = key.split(" =")[0]
    assert (
        f"{table}.{name}: unknown key (check the spelling; {name} belongs in the [{home}] table)"
        in message
    )


def test_a_misspelt_key_gets_no_table_hint(tmp_path: Path) -> None:
    text = _replace(HOSPITAL, "[policy]\n", '[policy]\nsigning_kee = "k.pem"\n')
    message = _error(load_site_config, _write(tmp_path, text))
    assert "policy.signing_kee: unknown key (check the spelling)\n" in message + "\n"


def test_federation_unknown_keys_get_no_site_table_hint(tmp_path: Path) -> None:
    message = _error(
        load_federation_config,
        _write(tmp_path, FEDERATION + 'signing_key = "k.pem"\n', "federation.toml"),
    )
    assert "  - dp.signing_key: unknown key (check the spelling)\n" in message + "\n"
