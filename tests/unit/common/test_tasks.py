"""The two built-in tasks: tiny base models saved, loaded, wrapped with LoRA and run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from common.config import LoraSettings
from common.errors import ConfigError, FedloraError
from common.tasks import TASKS, TaskSpec, model_fingerprint

IMAGING = "dicom-classification"
TABULAR = "tabular-classification"
CARDINALITIES = [2, 3]
SHAPES: dict[str, dict[str, Any]] = {
    IMAGING: {},
    TABULAR: {"num_numeric_features": 3, "categorical_cardinalities": CARDINALITIES},
}
BATCH = 5


def _inputs(task: str, batch: int = BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if task == IMAGING:
        return {"pixel_values": torch.randn(batch, 1, 32, 32, generator=generator)}
    ids = torch.stack(
        [torch.randint(0, c + 1, (batch,), generator=generator) for c in CARDINALITIES], dim=1
    )
    # Both ends of each feature's range: 0 ("other") and the last category.
    ids[0] = 0
    ids[1] = torch.tensor(CARDINALITIES)
    return {
        "numeric_values": torch.randn(batch, 3, generator=generator),
        "categorical_ids": ids.to(torch.int64),
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base-models")
    dirs = {}
    for task, shape in SHAPES.items():
        directory = root / task
        returned = TASKS.get(task).build_demo_base_model(directory, seed=0, **shape)
        assert returned == directory
        dirs[task] = directory
    return dirs


@pytest.fixture(params=[IMAGING, TABULAR])
def task(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _spec(task: str) -> TaskSpec:
    return TASKS.get(task)


def test_task_specs_agree_with_the_design() -> None:
    imaging, tabular = _spec(IMAGING), _spec(TABULAR)
    assert imaging.input_names == ("pixel_values",)
    assert tabular.input_names == ("numeric_values", "categorical_ids")
    for spec in (imaging, tabular):
        assert spec.default_lora_targets == ("q_proj", "v_proj")
    assert imaging.head_modules == ("classifier",)
    # The tabular base's linear path trains in full, beside the encoder's head.
    assert tabular.head_modules == ("classifier", "linear_head")


def test_demo_model_is_saved_with_save_pretrained(task: str, model_dirs: dict[str, Path]) -> None:
    directory = model_dirs[task]
    assert (directory / "config.json").is_file()
    assert (directory / "model.safetensors").is_file()


def test_load_base_model_returns_frozen_eval_model(task: str, model_dirs: dict[str, Path]) -> None:
    model = _spec(task).load_base_model(model_dirs[task])
    assert isinstance(model, _spec(task).model_class)
    assert not model.training
    assert model.config.num_labels == 2


def test_load_is_deterministic_and_matches_the_saved_weights(
    task: str, model_dirs: dict[str, Path]
) -> None:
    spec = _spec(task)
    torch.manual_seed(0)
    original = spec.model_class(spec.demo_config(**SHAPES[task])).state_dict()
    loaded = spec.load_base_model(model_dirs[task]).state_dict()
    assert set(loaded) == set(original)
    for name, value in original.items():
        assert torch.equal(loaded[name], value), name


def test_load_base_model_without_config_is_a_config_error(task: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    with pytest.raises(ConfigError) as info:
        _spec(task).load_base_model(missing)
    assert isinstance(info.value, FedloraError)
    assert str(missing) in str(info.value)
    assert "config.json" in str(info.value)
    assert task in str(info.value)


def test_tabular_config_round_trips(model_dirs: dict[str, Path]) -> None:
    model = _spec(TABULAR).load_base_model(model_dirs[TABULAR])
    assert model.config.num_numeric_features == 3
    assert model.config.categorical_cardinalities == CARDINALITIES
    # One table per feature: a row per category plus one "other" row.
    assert [e.num_embeddings for e in model.categorical_embeddings] == [
        c + 1 for c in CARDINALITIES
    ]


def test_wrap_with_lora_trains_only_lora_and_head(task: str, model_dirs: dict[str, Path]) -> None:
    spec = _spec(task)
    model = spec.wrap_with_lora(spec.load_base_model(model_dirs[task]), LoraSettings(r=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]

    lora = [n for n in trainable if ".lora_A." in n or ".lora_B." in n]
    head = [n for n in trainable if ".classifier.modules_to_save." in n]
    linear = [n for n in trainable if ".linear_head.modules_to_save." in n]
    assert sorted(lora + head + linear) == sorted(trainable)
    layers = 2
    assert len(lora) == layers * len(spec.default_lora_targets) * 2
    for target in spec.default_lora_targets:
        assert any(f".{target}.lora_A." in n for n in lora), target
    assert sorted(n.rsplit(".", 1)[1] for n in head) == ["bias", "weight"]
    if task == "tabular-classification":  # a weight and bias, one table per categorical
        categorical = len(model.config.categorical_cardinalities)
        assert len(linear) == 2 + categorical
    else:
        assert not linear
    assert frozen, "the base model must stay frozen"
    assert not any("lora_" in n for n in frozen)
    lora_a = next(p for n, p in model.named_parameters() if ".lora_A." in n)
    assert lora_a.shape[0] == 4


def test_wrap_with_lora_uses_explicit_targets(task: str, model_dirs: dict[str, Path]) -> None:
    spec = _spec(task)
    model = spec.wrap_with_lora(
        spec.load_base_model(model_dirs[task]), LoraSettings(target_modules=["q_proj"])
    )
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora
    assert all(".q_proj." in n for n in lora)


def test_wrong_lora_target_is_a_config_error(task: str, model_dirs: dict[str, Path]) -> None:
    spec = _spec(task)
    with pytest.raises(ConfigError) as info:
        spec.wrap_with_lora(
            spec.load_base_model(model_dirs[task]), LoraSettings(target_modules=["nope_proj"])
        )
    assert "nope_proj" in str(info.value)
    assert task in str(info.value)


def test_forward_pass(task: str, model_dirs: dict[str, Path]) -> None:
    spec = _spec(task)
    base = spec.load_base_model(model_dirs[task])
    inputs = _inputs(task)
    assert set(inputs) == set(spec.input_names)
    with torch.no_grad():
        before = base(**inputs).logits
    assert before.shape == (BATCH, 2)
    assert torch.isfinite(before).all()

    model = spec.wrap_with_lora(base, LoraSettings())
    labels = torch.tensor([0, 1, 0, 1, 1])
    output = model(**inputs, labels=labels)
    assert output.logits.shape == (BATCH, 2)
    # LoRA's B starts at zero and the head is copied: wrapping does not change the output.
    torch.testing.assert_close(output.logits.detach(), before)
    assert output.loss is not None and output.loss.ndim == 0
    output.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    # B starts at zero, so only B (and the head) get a non-zero first gradient.
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_tabular_rejects_out_of_range_category(model_dirs: dict[str, Path]) -> None:
    model = _spec(TABULAR).load_base_model(model_dirs[TABULAR])
    inputs = _inputs(TABULAR)
    # An id past a feature's own values would silently read the next feature's rows.
    inputs["categorical_ids"][0, 0] = CARDINALITIES[0] + 1
    with pytest.raises(IndexError):
        model(**inputs)


def test_tabular_without_categorical_features(tmp_path: Path) -> None:
    spec = _spec(TABULAR)
    directory = spec.build_demo_base_model(
        tmp_path / "numeric-only", seed=1, num_numeric_features=2, categorical_cardinalities=[]
    )
    model = spec.load_base_model(directory)
    logits = model(
        numeric_values=torch.randn(3, 2), categorical_ids=torch.zeros(3, 0, dtype=torch.int64)
    ).logits
    assert logits.shape == (3, 2)


def test_fingerprint_is_stable(task: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = model_dirs[task]
    first = model_fingerprint(directory)
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert model_fingerprint(directory) == first
    copy = shutil.copytree(directory, tmp_path / "elsewhere")
    assert model_fingerprint(copy) == first


def test_fingerprint_changes_with_one_byte(task: str, model_dirs: dict[str, Path], tmp_path: Path):
    copy = shutil.copytree(model_dirs[task], tmp_path / "copy")
    before = model_fingerprint(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != before


def test_fingerprint_covers_file_names_and_extra_files(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    copy = shutil.copytree(model_dirs[IMAGING], tmp_path / "copy")
    before = model_fingerprint(copy)
    (copy / "extra").mkdir()
    (copy / "extra" / "note.txt").write_text("x")
    with_extra = model_fingerprint(copy)
    assert with_extra != before
    (copy / "extra" / "note.txt").rename(copy / "extra" / "other.txt")
    assert model_fingerprint(copy) not in {before, with_extra}


def test_fingerprints_of_different_models_differ(model_dirs: dict[str, Path]) -> None:
    assert model_fingerprint(model_dirs[IMAGING]) != model_fingerprint(model_dirs[TABULAR])


def test_same_seed_builds_the_same_model_files(tmp_path: Path) -> None:
    spec = _spec(TABULAR)
    first = spec.build_demo_base_model(tmp_path / "a", seed=5, **SHAPES[TABULAR])
    second = spec.build_demo_base_model(tmp_path / "b", seed=5, **SHAPES[TABULAR])
    third = spec.build_demo_base_model(tmp_path / "c", seed=6, **SHAPES[TABULAR])
    assert model_fingerprint(first) == model_fingerprint(second)
    assert model_fingerprint(first) != model_fingerprint(third)


def test_a_base_model_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    """A partly random base model (missing weights) must not load silently."""
    spec = _spec(TABULAR)
    directory = spec.build_demo_base_model(
        tmp_path / "base", seed=1, num_numeric_features=2, categorical_cardinalities=[2]
    )
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["categorical_cardinalities"] = [2, 3]  # one more feature than the weights hold
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="missing keys"):
        spec.load_base_model(directory)
