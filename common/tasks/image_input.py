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

The geometry follows the processor's too, as transformers applies it:

- no center crop (ViT, Swin): the image is stretched to ``size`` x ``size``;
- ``do_center_crop`` with ``crop_size`` (DeiT, DINOv2/BiT, CLIP): resized first to
  ``size`` (``{"height", "width"}``: stretched to that square; ``{"shortest_edge"}``: the
  short side to it, the aspect kept), then the center ``crop_size`` square is taken;
- ``crop_pct`` with a ``shortest_edge`` below 384 (ConvNeXt): the short side resized to
  ``shortest_edge / crop_pct``, then the center ``shortest_edge`` square; at 384 and
  above, stretched to the square.

Only square model inputs are supported. The interpolation is fedlora's own (box average
when shrinking, antialiased bilinear otherwise) whatever ``resample`` says: a scan is
resampled once, the same way at every site, in training and in ``predict``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError

PREPROCESSOR_FILE = "preprocessor_config.json"
CONFIG_FILE = "config.json"
DEMO_MEAN = 0.5
DEMO_STD = 0.5
MAX_SIDE = 1024
CONVNEXT_CROP_BELOW = 384
"""ConvNeXt's processor center-crops (by ``crop_pct``) only below this shortest edge."""


@dataclass(frozen=True)
class ImageInput:
    """The input one image model takes: ``channels`` x ``size`` x ``size`` floats,
    normalised per channel as ``(x - mean) / std`` from values in [0, 1].

    ``resize``: when set, the image is first resized to it (the short side, the aspect
    kept, with ``keep_aspect``; else stretched to that square) and the center ``size``
    square is cropped; when None, it is stretched to ``size`` x ``size``.
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    keep_aspect: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_SIDE:
            raise ConfigError(f"image input side {self.size} is outside 1..{MAX_SIDE}")
        if self.resize is not None and not self.size <= self.resize <= 2 * MAX_SIDE:
            raise ConfigError(
                f"the image processor resizes to {self.resize} before cropping "
                f"{self.size}: the resize must lie in {self.size}..{2 * MAX_SIDE}"
            )
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

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of ``height`` x ``width`` is resized to before the
        center crop (transformers' rule for a short side: the long one scaled, floored)."""
        if self.resize is None:
            return self.size, self.size
        if not self.keep_aspect:
            return self.resize, self.resize
        if height <= width:
            return self.resize, max(self.resize, int(self.resize * width / height))
        return max(self.resize, int(self.resize * height / width)), self.resize

    def crop_region(self, height: int, width: int) -> tuple[slice, slice]:
        """The rows and columns of a ``height`` x ``width`` image that the center crop
        keeps (after ``resized_shape``), rounded outward to whole pixels: resampling only
        them, an image of extreme aspect (one row of 4000) never becomes a huge
        intermediate. Without a crop: the whole image."""
        scaled_height, scaled_width = self.resized_shape(height, width)
        top, left = (scaled_height - self.size) // 2, (scaled_width - self.size) // 2

        def kept(start: int, scaled: int, original: int) -> slice:
            first = math.floor(start * original / scaled)
            last = math.ceil((start + self.size) * original / scaled)
            return slice(first, max(last, first + 1))

        return kept(top, scaled_height, height), kept(left, scaled_width, width)

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "image_size": self.size,
            "channels": self.channels,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        if self.resize is not None:  # older readers ignore it; older records lack it
            values.update(resize=self.resize, keep_aspect=self.keep_aspect)
        return values

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
            resize=None if values.get("resize") is None else int(values["resize"]),
            keep_aspect=bool(values.get("keep_aspect", False)),
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


def _processor_geometry(processor: dict[str, Any]) -> tuple[int, int | None, bool] | None:
    """(side, resize, keep_aspect) from an image processor's settings (module doc), or
    None when it names no size."""
    size = processor.get("size")
    by_short_side = isinstance(size, dict) and "height" not in size
    shortest = size.get("shortest_edge") if isinstance(size, dict) and by_short_side else None
    if processor.get("crop_pct") is not None and isinstance(shortest, int):
        crop_pct = processor["crop_pct"]
        if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ConfigError(f"{PREPROCESSOR_FILE} crop_pct must lie in (0, 1], got {crop_pct!r}")
        if shortest < CONVNEXT_CROP_BELOW:
            return shortest, int(shortest / crop_pct), True
        return shortest, None, False
    if processor.get("do_center_crop") and processor.get("crop_size") is not None:
        side = _side(processor["crop_size"], f"{PREPROCESSOR_FILE} crop_size")
        if size is None:
            return side, None, False
        resize = _side(size, f"{PREPROCESSOR_FILE} size")
        return side, resize, isinstance(shortest, int)
    if size is not None:
        return _side(size, f"{PREPROCESSOR_FILE} size"), None, False
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
    geometry = _processor_geometry(processor) if processor else None
    side, resize, keep_aspect = geometry or (None, None, False)
    if side is None:
        if config.get("image_size") is None:
            raise ConfigError(
                f"the base model in {directory} says neither its input size "
                f"({PREPROCESSOR_FILE} size or crop_size) nor config.json image_size"
            )
        side = _side(config["image_size"], f"{CONFIG_FILE} image_size")
    if processor.get("do_normalize", True) is False:  # the model takes values in [0, 1]
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        mean = _per_channel(processor.get("image_mean", DEMO_MEAN), channels, "image_mean")
        std = _per_channel(processor.get("image_std", DEMO_STD), channels, "image_std")
    if resize == side and not keep_aspect:
        resize = None  # resized to the crop: nothing is cropped
    return ImageInput(side, channels, mean, std, resize, keep_aspect)
