"""What an image model takes as input, read from its saved directory: one rule for the
site's loader, ``predict``, export and ``fedlora model init``.

A site's images are resized and normalised the way the *base model* expects, so the
input side, the channels and the per-channel mean and standard deviation come from the
model's own files, never from a second setting that could disagree:

- ``preprocessor_config.json`` (a transformers image processor's settings, saved with
  every pretrained checkpoint): ``crop_size`` when it center-crops, else ``size``
  (``{"height", "width"}`` or ``{"shortest_edge"}``), and ``image_mean``/``image_std``;
- ``config.json``: ``num_channels`` and, without a processor file, ``image_size``
  (fedlora's demo bases), with mean 0.5 and std 0.5 (values in [-1, 1]).

Only square inputs are supported: a site's scans are resized to ``size`` x ``size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError

PREPROCESSOR_FILE = "preprocessor_config.json"
CONFIG_FILE = "config.json"
DEMO_MEAN = 0.5
DEMO_STD = 0.5
MAX_SIDE = 1024


@dataclass(frozen=True)
class ImageInput:
    """The input one image model takes: ``channels`` x ``size`` x ``size`` floats,
    normalised per channel as ``(x - mean) / std`` from values in [0, 1]."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_SIDE:
            raise ConfigError(f"image input side {self.size} is outside 1..{MAX_SIDE}")
        if self.channels not in (1, 3):
            raise ConfigError(
                f"image models with {self.channels} input channels are not supported "
                "(1: grayscale, 3: colour; grayscale scans are replicated to 3)"
            )
        for name, values in (("image_mean", self.mean), ("image_std", self.std)):
            if len(values) != self.channels:
                raise ConfigError(
                    f"{name} has {len(values)} value(s) for a {self.channels}-channel model"
                )
        if any(value <= 0 for value in self.std):
            raise ConfigError(f"image_std must be positive, got {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.size,
            "channels": self.channels,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageInput:
        """The inverse of :meth:`to_dict`; an older record without channels or
        normalisation is a 1-channel demo input."""
        channels = int(values.get("channels", 1))
        return cls(
            size=int(values["image_size"]),
            channels=channels,
            mean=_per_channel(values.get("image_mean", DEMO_MEAN), channels, "image_mean"),
            std=_per_channel(values.get("image_std", DEMO_STD), channels, "image_std"),
        )


def _per_channel(value: Any, channels: int, name: str) -> tuple[float, ...]:
    """A processor's mean or std: one number for every channel, or one per channel."""
    if isinstance(value, (int, float)):
        return (float(value),) * channels
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        if len(value) == 1:
            return (float(value[0]),) * channels
        return tuple(float(v) for v in value)
    raise ConfigError(f"{name} must be a number or a list of numbers, got {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path.name} of the base model cannot be read: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path.name} of the base model is not a JSON object")
    return loaded


def _side(value: Any, source: str) -> int:
    """A square side from an ``int``, ``[h, w]`` or a processor's size dict."""
    if isinstance(value, bool):
        raise ConfigError(f"{source} is not an image size: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        height, width = value
    elif isinstance(value, dict):
        if "shortest_edge" in value and "height" not in value:
            return _side(value["shortest_edge"], source)
        height, width = value.get("height"), value.get("width")
    else:
        raise ConfigError(f"{source} is not an image size: {value!r}")
    if not isinstance(height, int) or height != width:
        raise ConfigError(f"{source} is {height} x {width}: only square image inputs are supported")
    return height


def _processor_side(processor: dict[str, Any]) -> int | None:
    if processor.get("do_center_crop") and processor.get("crop_size") is not None:
        return _side(processor["crop_size"], f"{PREPROCESSOR_FILE} crop_size")
    if processor.get("size") is not None:
        return _side(processor["size"], f"{PREPROCESSOR_FILE} size")
    return None


def image_input(directory: Path) -> ImageInput:
    """The input the image model saved in ``directory`` takes (see the module doc).

    Raises :class:`ConfigError` naming the file and field when it cannot be told.
    """
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"base model directory {directory} has no {CONFIG_FILE}")
    config = _read_json(config_path)
    channels = config.get("num_channels", 3)
    if not isinstance(channels, int) or isinstance(channels, bool):
        raise ConfigError(f"{CONFIG_FILE} num_channels is not a number: {channels!r}")
    processor_path = directory / PREPROCESSOR_FILE
    processor = _read_json(processor_path) if processor_path.is_file() else {}
    side = _processor_side(processor) if processor else None
    if side is None:
        if config.get("image_size") is None:
            raise ConfigError(
                f"the base model in {directory} says neither its input size "
                f"({PREPROCESSOR_FILE} size or crop_size) nor config.json image_size"
            )
        side = _side(config["image_size"], f"{CONFIG_FILE} image_size")
    if processor.get("do_normalize", True) is False:  # the model takes values in [0, 1]
        return ImageInput(side, channels, (0.0,) * channels, (1.0,) * channels)
    return ImageInput(
        size=side,
        channels=channels,
        mean=_per_channel(processor.get("image_mean", DEMO_MEAN), channels, "image_mean"),
        std=_per_channel(processor.get("image_std", DEMO_STD), channels, "image_std"),
    )
