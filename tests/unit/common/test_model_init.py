"""``fedlora model init`` and ``fedlora model inspect``: a base model for each task,
made as a site loads it, the lines that name it, and what is refused (leaving nothing
half-written)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import tomli_w
import torch
from click.testing import CliRunner, Result
from transformers import BeitConfig, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from common.cli import cli
from common.config import LoraSettings, load_federation_config
from common.data_config import TabularDataConfig
from common.errors import ConfigError
from common.model_cli import describe
from common.model_init import (
    build_default_imaging_base,
    build_tabular_base,
    import_image_checkpoint,
    import_text_checkpoint,
    site_data,
)
from common.tasks import model_fingerprint
from common.tasks.image_input import PREPROCESSOR_FILE, image_input
from common.tasks.imaging import IMAGING_TASK
from common.tasks.imaging_pretext import anatomy, lesion, public_pretext_images
from common.tasks.tabular import TABULAR_TASK
from common.tasks.text import ARCHITECTURES, TEXT_TASK, load_tokenizer
from simulations.generators import dicom as hospital_images
from tests.image_checkpoints import save_checkpoint
from tests.unit.common.test_text_task import save_tiny

ROOT = Path(__file__).resolve().parents[3]
BANK = ROOT / "sites" / "bank-alpha.toml"
TINY_VIT = ["--hidden-size", "32", "--layers", "1", "--image-size", "16", "--patch-size", "4"]


def _model(*args: str) -> Result:
    """``fedlora model ARGS`` through the root command, as the console script runs it."""
    return CliRunner().invoke(cli, ["model", *args])


def _ok(*args: str) -> Result:
    result = _model(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _refused(*args: str) -> str:
    """The message of a refusal (an operator's error: a ConfigError or a usage error)."""
    result = _model(*args)
    assert result.exit_code != 0
    if isinstance(result.exception, ConfigError):
        return str(result.exception)
    assert result.exit_code == 2, (result.output, result.exception)
    return result.output


def _siblings(out: Path) -> list[str]:
    """What lies beside ``out`` (a failed or finished init leaves no staging folder)."""
    return sorted(p.name for p in out.parent.iterdir())


def _federation_lines(output: str) -> dict[str, Any]:
    lines = [line.strip() for line in output.splitlines() if line.startswith("  ")]
    return tomllib.loads("\n".join(lines))


def _site_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps({"data": data}))
    return path


# ------------------------------------------------------------------- tabular ---


def test_tabular_init_builds_the_model_of_a_shipped_site_schema(tmp_path: Path) -> None:
    out = tmp_path / "models" / "tabular"
    result = _ok("init", "tabular-classification", "--site", str(BANK), "--out", str(out))
    schema = site_data(BANK)
    model = TABULAR_TASK.load_base_model(out)
    assert model.config.num_numeric_features == len(schema.numeric_features) == 7
    assert model.config.categorical_cardinalities == [4, 4, 4]
    assert [model.config.id2label[i] for i in range(2)] == ["repaid", "default"]
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2

    fingerprint = model_fingerprint(out)
    assert f"SHA-256: {fingerprint}" in result.output
    named = _federation_lines(result.output)
    assert named == {"task": "tabular-classification", "base_model": str(out.absolute())}
    federation = tmp_path / "federation.toml"
    federation.write_text(tomli_w.dumps(named))
    assert load_federation_config(federation).base_model == out.resolve()
    assert _siblings(out) == ["tabular"]


def test_tabular_width_layers_and_seed_are_options(tmp_path: Path) -> None:
    out = tmp_path / "wide"
    args = ["--site", str(BANK), "--hidden-size", "48", "--layers", "3", "--seed", "5"]
    _ok("init", "tabular-classification", *args, "--out", str(out))
    config = TABULAR_TASK.load_base_model(out).config
    assert (config.hidden_size, config.num_hidden_layers) == (48, 3)
    again = tmp_path / "again"
    _ok("init", "tabular-classification", *args, "--out", str(again))
    assert model_fingerprint(again) == model_fingerprint(out), "same seed, same bytes"


def test_the_tabular_builder_without_names_is_the_simulations_demo_base(tmp_path: Path) -> None:
    schema = site_data(BANK)
    assert isinstance(schema, TabularDataConfig)
    ours = build_tabular_base(tmp_path / "ours", schema, seed=3, label_names=False)
    demo = TABULAR_TASK.build_demo_base_model(
        tmp_path / "demo",
        seed=3,
        num_numeric_features=7,
        categorical_cardinalities=[4, 4, 4],
        num_labels=2,
    )
    for name in ("config.json", "model.safetensors"):
        assert filecmp.cmp(ours / name, demo / name, shallow=False), name


# ------------------------------------------------------------------- imaging ---


def test_dicom_init_pretrains_the_default_backbone_and_gives_it_a_zero_head(
    tmp_path: Path,
) -> None:
    out = tmp_path / "dicom"
    args = ["--classes", "normal,lesion,cyst", *TINY_VIT, "--seed", "3"]
    result = _ok("init", "dicom-classification", *args, "--pretext-images", "64", "--out", str(out))
    assert f"SHA-256: {model_fingerprint(out)}" in result.output
    model = IMAGING_TASK.load_base_model(out)
    assert [model.config.id2label[i] for i in range(3)] == ["normal", "lesion", "cyst"]
    assert image_input(out).to_dict() == {
        "image_size": 16,
        "channels": 1,
        "image_mean": [0.5],
        "image_std": [0.5],
    }
    assert torch.count_nonzero(model.classifier.weight) == 0
    assert torch.count_nonzero(model.classifier.bias) == 0

    untrained = build_default_imaging_base(
        tmp_path / "untrained",
        ["normal", "lesion", "cyst"],
        image_size=16,
        hidden_size=32,
        layers=1,
        patch_size=4,
        seed=3,
        pretext_images=0,
    )
    pretrained = model.state_dict()
    initial = IMAGING_TASK.load_base_model(untrained).state_dict()
    assert not torch.equal(
        pretrained["vit.embeddings.cls_token"], initial["vit.embeddings.cls_token"]
    )


def test_pretext_images_are_drawn_as_the_synthetic_hospitals_draw() -> None:
    assert hospital_images.draw_anatomy is anatomy and hospital_images.draw_lesion is lesion
    assert hospital_images.public_pretext_images is public_pretext_images


def test_pretext_images_keep_their_64_pixel_source_and_take_any_side() -> None:
    default, _ = public_pretext_images(4, seed=1, image_size=32)
    explicit, _ = public_pretext_images(4, seed=1, image_size=32, source_size=64)
    assert np.array_equal(default, explicit)
    odd, labels = public_pretext_images(3, seed=1, image_size=48)
    assert odd.shape == (3, 1, 48, 48) and set(labels) <= {0, 1, 2}
    assert odd.min() >= -1.0 and odd.max() <= 1.0


def test_dicom_init_from_a_checkpoint_keeps_its_input_and_takes_the_sites_classes(
    tmp_path: Path,
) -> None:
    source = save_checkpoint("vit", tmp_path / "vit")
    site = _site_toml(
        tmp_path / "hospital.toml",
        {"format": "dicom", "path": "scans", "classes": ["normal", "lesion"], "labels": "csv"},
    )
    out = tmp_path / "base"
    _ok(
        "init",
        "dicom-classification",
        "--from",
        str(source),
        "--site",
        str(site),
        "--out",
        str(out),
    )
    assert (out / PREPROCESSOR_FILE).read_bytes() == (source / PREPROCESSOR_FILE).read_bytes()
    settings = json.loads((out / "config.json").read_text())
    assert (settings["image_size"], settings["num_channels"]) == (32, 3)
    assert settings["id2label"] == {"0": "normal", "1": "lesion"}

    inspected = _ok("inspect", str(out)).output
    assert "task: dicom-classification" in inspected
    assert "architecture: vit (ViTForImageClassification)" in inspected
    assert "image_size 32, channels 3, image_mean [0.485, 0.456, 0.406]" in inspected
    assert "classes: normal, lesion" in inspected
    assert "LoRA targets (default): q_proj, v_proj" in inspected
    assert f"SHA-256: {model_fingerprint(out)}" in inspected


def test_a_checkpoint_at_another_size_than_its_processor_is_fitted_to_the_processor(
    tmp_path: Path,
) -> None:
    """A ViT with position embeddings for 32 pixels and a processor that feeds 48: the
    table is resampled once, as the model's own interpolation would at every call."""
    source = save_checkpoint("vit", tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(source)
    out = import_image_checkpoint(source, tmp_path / "base", ["a", "b"])
    fitted = IMAGING_TASK.load_base_model(out)
    assert fitted.config.image_size == 48
    original = ViTForImageClassification.from_pretrained(source).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = original.vit(images, interpolate_pos_encoding=True).last_hidden_state
        got = fitted.vit(images).last_hidden_state
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------- text ---


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_text_init_imports_a_decoder_with_its_tokenizer(tmp_path: Path, architecture: str) -> None:
    source = save_tiny(tmp_path / "llm", architecture, causal=True)
    out = tmp_path / "base"
    _ok(
        "init",
        "text-classification",
        "--from",
        str(source),
        "--classes",
        "routine,urgent",
        "--out",
        str(out),
    )
    model = TEXT_TASK.load_base_model(out)
    assert [model.config.id2label[i] for i in range(2)] == ["routine", "urgent"]
    assert torch.count_nonzero(model.score.weight) == 0
    tokenizer = load_tokenizer(out)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert len(tokenizer) == len(load_tokenizer(source))
    description = describe(out)
    assert description["input"]["vocabulary"] == len(tokenizer)
    assert description["lora"]["target_modules"] == list(TEXT_TASK.lora_targets(model.config))


def test_text_init_replaces_a_classifier_head_with_other_classes(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "classifier", "qwen2")  # a 2-class classifier
    out = import_text_checkpoint(source, tmp_path / "base", ["a", "b", "c"])
    model = TEXT_TASK.load_base_model(out)
    assert model.score.weight.shape[0] == 3
    assert torch.count_nonzero(model.score.weight) == 0


# ------------------------------------------------------------------- inspect ---


def test_inspect_json_reports_what_a_site_would_train(tmp_path: Path) -> None:
    out = tmp_path / "tabular"
    _ok("init", "tabular-classification", "--site", str(BANK), "--out", str(out))
    description = json.loads(_ok("inspect", str(out), "--format", "json").output)
    base = TABULAR_TASK.load_base_model(out)
    parameters = base.num_parameters()
    model = TABULAR_TASK.wrap_with_lora(base, LoraSettings())
    assert description["task"] == "tabular-classification"
    assert description["architecture"] == "fedlora_ft_transformer"
    assert description["input"] == {"numeric_features": 7, "categorical_cardinalities": [4, 4, 4]}
    assert description["classes"] == ["repaid", "default"]
    assert description["head_modules"] == ["classifier", "linear_head"]
    assert description["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert description["parameters"] == parameters
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert description["trainable_parameters"] == trainable > 0
    assert description["sha256"] == model_fingerprint(out)


def test_inspect_refuses_a_model_no_task_trains(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "no fedlora task trains" in _refused("inspect", str(tmp_path))


# ------------------------------------------------------------------ refusals ---


def _vit_with(directory: Path, **settings: Any) -> Path:
    ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            **settings,
        )
    ).save_pretrained(directory)
    return directory


def test_what_is_not_an_image_checkpoint_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    beit = tmp_path / "beit"
    BeitConfig().save_pretrained(beit)
    text = save_tiny(tmp_path / "llm", "qwen2", causal=True)
    expected = {
        empty: "has no config.json",
        beit: "'beit' image model, which the imaging task does not support",
        text: "'qwen2' model, not an image classifier",
    }
    for source, message in expected.items():
        out = tmp_path / f"out-{source.name}"
        refusal = _refused(
            "init",
            "dicom-classification",
            "--from",
            str(source),
            "--classes",
            "a,b",
            "--out",
            str(out),
        )
        assert message in refusal
        assert not out.exists()


def test_image_checkpoints_with_unsupported_inputs_are_refused(tmp_path: Path) -> None:
    wide = _vit_with(tmp_path / "wide")
    ViTImageProcessorPil(size={"height": 32, "width": 48}).save_pretrained(wide)
    four = _vit_with(tmp_path / "four", num_channels=4)
    for source, message in ((wide, "only square image inputs"), (four, "4 input channels")):
        with pytest.raises(ConfigError, match=message):
            import_image_checkpoint(source, tmp_path / "out", ["a", "b"])


def test_a_failed_init_leaves_nothing_and_a_partial_backbone_is_refused(tmp_path: Path) -> None:
    source = _vit_with(tmp_path / "vit")
    weights = safetensors.torch.load_file(source / "model.safetensors")
    del weights["vit.encoder.layer.0.attention.attention.query.weight"]  # as saved on disk
    safetensors.torch.save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "models" / "dicom"
    refusal = _refused(
        "init", "dicom-classification", "--from", str(source), "--classes", "a,b", "--out", str(out)
    )
    assert "lacks weights" in refusal and "layers.0.attention.q_proj.weight" in refusal
    assert _siblings(out) == []


def test_a_text_checkpoint_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "llm", "llama", causal=True)
    for path in source.iterdir():
        if path.name.startswith("tokenizer"):
            path.unlink()
    refusal = _refused(
        "init",
        "text-classification",
        "--from",
        str(source),
        "--classes",
        "a,b",
        "--out",
        str(tmp_path / "o"),
    )
    assert "has no tokenizer" in refusal


def test_a_non_empty_out_is_kept_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["init", "tabular-classification", "--site", str(BANK), "--out", str(out)]
    assert "is not empty" in _refused(*args)
    assert (out / "notes.txt").read_text() == "mine"
    _ok(*args, "--force")
    assert not (out / "notes.txt").exists()
    TABULAR_TASK.load_base_model(out)
    assert _siblings(out) == ["models"]


def test_options_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    source = save_checkpoint("vit", tmp_path / "vit")
    out = str(tmp_path / "out")
    hospital = _site_toml(
        tmp_path / "h.toml",
        {"format": "dicom", "path": "d", "classes": ["a", "b"], "labels": "csv"},
    )
    cases = {
        ("dicom-classification", "--from", str(source), "--classes", "a,b", "--image-size", "64"): (
            "--image-size: an imported checkpoint keeps its own shape"
        ),
        (
            "dicom-classification",
            "--from",
            str(source),
            "--classes",
            "a,b",
            "--seed",
            "1",
        ): "--seed",
        ("tabular-classification", "--classes", "a,b"): "needs --site SITE.toml",
        ("tabular-classification", "--site", str(BANK), "--image-size", "32"): "not for tabular",
        ("text-classification", "--classes", "a,b"): "give --from DIR",
        ("dicom-classification", *TINY_VIT): "name the classes",
        ("dicom-classification", "--site", str(BANK), *TINY_VIT): "describes table data",
        (
            "dicom-classification",
            "--site",
            str(hospital),
            "--classes",
            "b,a",
        ): "differ from the site",
        ("dicom-classification", "--classes", "a,a"): "must be distinct",
        ("dicom-classification", "--from", str(source), "--classes", "a,b", "--out", str(source)): (
            "overlaps the checkpoint"
        ),
    }
    for args, message in cases.items():
        options = list(args) if "--out" in args else [*args, "--out", out]
        assert message in _refused("init", *options), args
    assert not Path(out).exists()


def test_the_console_script_reports_a_refusal_in_one_line(tmp_path: Path) -> None:
    fedlora = Path(sys.executable).with_name("fedlora")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [str(fedlora), "model", "inspect", str(empty)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {empty} has no config.json (not a model saved with save_pretrained)"
    )
