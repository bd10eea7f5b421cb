"""The input an image model takes, read from its files (common/tasks/image_input.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from common.tasks.image_input import ImageInput, image_input


def _model_dir(
    tmp_path: Path, config: dict[str, Any], processor: dict[str, Any] | None = None
) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if processor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    return tmp_path


def test_a_demo_base_without_a_processor_takes_its_config_size_at_half_mean_and_std(
    tmp_path: Path,
) -> None:
    found = image_input(_model_dir(tmp_path, {"image_size": 32, "num_channels": 1}))
    assert found == ImageInput(size=32, channels=1, mean=(0.5,), std=(0.5,))


def test_a_pretrained_checkpoint_takes_its_processors_crop_and_normalisation(
    tmp_path: Path,
) -> None:
    processor = {
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "size": {"shortest_edge": 256},
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    found = image_input(_model_dir(tmp_path, {"image_size": 518, "num_channels": 3}, processor))
    assert found.size == 224 and found.channels == 3
    assert found.mean == (0.485, 0.456, 0.406) and found.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    ("size", "expected"),
    [({"height": 384, "width": 384}, 384), ({"shortest_edge": 288}, 288), (160, 160)],
)
def test_the_processors_size_is_read_in_each_of_its_forms(
    tmp_path: Path, size: Any, expected: int
) -> None:
    found = image_input(_model_dir(tmp_path, {"num_channels": 3}, {"size": size}))
    assert found.size == expected


def test_a_single_mean_is_used_for_every_channel_and_no_normalisation_means_unit_range(
    tmp_path: Path,
) -> None:
    processor = {"size": 64, "image_mean": [0.5], "image_std": 0.25}
    found = image_input(_model_dir(tmp_path, {"num_channels": 3}, processor))
    assert found.mean == (0.5, 0.5, 0.5) and found.std == (0.25, 0.25, 0.25)
    plain = image_input(
        _model_dir(tmp_path, {"num_channels": 1}, {"size": 64, "do_normalize": False})
    )
    assert plain.mean == (0.0,) and plain.std == (1.0,)


@pytest.mark.parametrize(
    ("config", "processor", "message"),
    [
        ({"num_channels": 3}, {"size": {"height": 224, "width": 320}}, "only square"),
        ({"num_channels": 4, "image_size": 32}, None, "4 input channels"),
        ({"num_channels": 3}, None, "neither its input size"),
        ({"num_channels": 3}, {"size": 64, "image_mean": [0.1, 0.2]}, "2 value\\(s\\)"),
        ({"num_channels": 1}, {"size": 64, "image_std": [0.0]}, "must be positive"),
        ({"num_channels": 1}, {"size": 64, "image_mean": "imagenet"}, "image_mean must be"),
    ],
)
def test_an_input_that_cannot_be_told_is_refused_naming_the_field(
    tmp_path: Path, config: dict[str, Any], processor: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        image_input(_model_dir(tmp_path, config, processor))


def test_a_directory_without_a_config_or_with_a_broken_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        image_input(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        image_input(tmp_path)


def test_the_record_kept_with_an_artifact_round_trips_and_old_records_are_demo_inputs() -> None:
    colour = ImageInput(size=224, channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.3))
    assert ImageInput.from_dict(colour.to_dict()) == colour
    assert ImageInput.from_dict({"image_size": 32}) == ImageInput(32, 1, (0.5,), (0.5,))


# ------------------------------------------------ geometry of real image processors ---


def _saved(tmp_path: Path, processor: Any) -> Path:
    """A checkpoint directory with ``processor``'s own preprocessor_config.json."""
    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_channels": 3}))
    return tmp_path


def test_the_geometry_of_each_pretrained_family_is_its_processors(tmp_path: Path) -> None:
    from transformers import (
        BitImageProcessor,
        ConvNextImageProcessor,
        DeiTImageProcessor,
        ViTImageProcessor,
    )

    cases = {
        "vit": (ViTImageProcessor(), (224, None, False)),  # stretched, no crop
        "deit": (DeiTImageProcessor(), (224, 256, False)),  # 256 x 256, center 224
        "dinov2": (  # DINOv2's processor: short side 256, center 224
            BitImageProcessor(size={"shortest_edge": 256}, crop_size=224, do_center_crop=True),
            (224, 256, True),
        ),
        "convnext": (  # convnext-*-224's processor: short side 224 / 0.875, center 224
            ConvNextImageProcessor(size={"shortest_edge": 224}),
            (224, 256, True),
        ),
        "convnext-384": (ConvNextImageProcessor(), (384, None, False)),  # stretched
    }
    for name, (processor, expected) in cases.items():
        found = image_input(_saved(tmp_path / name, processor))
        assert (found.size, found.resize, found.keep_aspect) == expected, name


def test_resized_shape_keeps_the_aspect_only_when_asked() -> None:
    stretched = ImageInput(224, 3, (0.5,) * 3, (0.5,) * 3, resize=256)
    assert stretched.resized_shape(300, 500) == (256, 256)
    short_side = ImageInput(224, 3, (0.5,) * 3, (0.5,) * 3, resize=256, keep_aspect=True)
    assert short_side.resized_shape(300, 500) == (256, 426)
    assert short_side.resized_shape(500, 300) == (426, 256)
    assert ImageInput(224, 1, (0.5,), (0.5,)).resized_shape(300, 500) == (224, 224)


def test_a_resize_below_the_crop_is_refused() -> None:
    with pytest.raises(ConfigError, match="resizes to 200 before cropping 224"):
        ImageInput(224, 3, (0.5,) * 3, (0.5,) * 3, resize=200)


def test_the_record_keeps_the_crop() -> None:
    cropped = ImageInput(224, 3, (0.5,) * 3, (0.5,) * 3, resize=256, keep_aspect=True)
    assert ImageInput.from_dict(cropped.to_dict()) == cropped
    assert "resize" not in ImageInput(224, 1, (0.5,), (0.5,)).to_dict()
