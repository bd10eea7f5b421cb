"""Base models for a deployment, made the way the sites will load them.

A federation's base model is a directory saved with ``save_pretrained`` that the
coordinator and every site of the task hold byte for byte (its SHA-256 is part of every
run). These builders make one:

- :func:`build_tabular_base`: the FT-Transformer for a site config's ``[data]`` schema;
- :func:`build_default_imaging_base`: the default imaging backbone (the demo ViT,
  pretrained on public synthetic images, with a fresh zero-initialised head);
- :func:`import_image_checkpoint`: a local image-classification checkpoint (ViT, DeiT,
  DINOv2, Swin, ConvNeXt, 1 or 3 channels) with a new head, at its own input size and
  normalisation;
- :func:`import_text_checkpoint`: a local decoder LLM with its tokenizer and a new
  classification head.

Each one writes into a directory it is given and checks the result loads exactly as a
site loads it; :func:`staged_directory` makes that directory appear whole or not at all.
``fedlora model init`` (common/model_cli.py) is their command line.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as transformers_logging

from common.config import read_toml, validate_model
from common.data_config import (
    DicomDataConfig,
    TabularDataConfig,
    TextDataConfig,
    data_kind,
)
from common.errors import ConfigError
from common.tasks import TASKS
from common.tasks.base import name_classes, saved_config
from common.tasks.image_input import PREPROCESSOR_FILE, ImageInput, image_input
from common.tasks.imaging import (
    HEAD,
    IMAGE_ARCHITECTURES,
    IMAGING_TASK,
    fit_input_side,
    image_model_class,
    new_head,
)
from common.tasks.imaging_pretext import PRETEXT_CLASSES, Progress, pretrain_imaging_backbone
from common.tasks.tabular import TABULAR_TASK, FTTransformerConfig
from common.tasks.text import ARCHITECTURES as TEXT_ARCHITECTURES
from common.tasks.text import TEXT_TASK, load_tokenizer

logger = logging.getLogger(__name__)

SiteData = DicomDataConfig | TabularDataConfig | TextDataConfig
DIRECTORY_MODE = 0o755
"""A base model is no secret: the staging folder (created 0700) is opened up like a
``save_pretrained`` folder before it takes its final name."""


# --------------------------------------------------------------------- inputs ---


def check_classes(classes: Sequence[str]) -> list[str]:
    """Class names in label order: at least two, none empty, no repeats."""
    names = [name.strip() for name in classes]
    if len(names) < 2:
        raise ConfigError(f"give at least two classes, got {names}")
    if any(not name for name in names):
        raise ConfigError(f"class names must not be empty: {list(classes)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"class names must be distinct; repeated: {', '.join(repeated)}")
    return names


def site_data(path: Path) -> SiteData:
    """The ``[data]`` table of a site config: the schema a base model must fit.

    Only that table is read (and validated): the coordinator may hold a site's schema
    without its private settings, and no data file is opened."""
    document = read_toml(path)
    data = document.get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: no [data] table (the site's data schema)")
    models: dict[str, type[SiteData]] = {
        "dicom": DicomDataConfig,
        "table": TabularDataConfig,
        "text": TextDataConfig,
    }
    kind = data_kind(data)
    if kind is None:
        raise ConfigError(f"{path}: data.format {data.get('format')!r} is not a known format")
    return validate_model(models[kind], data, f"{path} [data]")


# --------------------------------------------------------------------- output ---


@contextmanager
def staged_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """A fresh folder beside ``out`` to build in, renamed to ``out`` when the block
    succeeds and deleted when it fails, so a failed init leaves nothing half-written.

    An existing non-empty ``out`` is refused unless ``force``; it is then replaced only
    once the new model is complete."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty; choose another --out, or --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        staging.chmod(DIRECTORY_MODE)
        _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a rename


def _put_in_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` to ``out``; an old ``out`` is set aside first and
    deleted only once the new one is in place (put back if the rename fails)."""
    if not out.exists():
        staging.rename(out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.rename(retired / out.name)
    try:
        staging.rename(out)
    except OSError:
        (retired / out.name).rename(out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(retired, ignore_errors=True)


def _ensure_config_keys(directory: Path, values: dict[str, Any]) -> None:
    """Write ``values`` into config.json where it lacks them, as transformers writes
    the file (sorted keys, 2-space indent), so the sites' loader and the export read
    the input shape from the config without guessing."""
    path = directory / "config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    missing = {key: value for key, value in values.items() if key not in settings}
    if missing:
        settings.update(missing)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _same_place(first: Path, second: Path) -> bool:
    a, b = first.resolve(), second.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def refuse_overlap(source: Path, out: Path) -> None:
    """``--out`` must not be (or contain, or lie in) the checkpoint it is made from:
    ``--force`` would delete the source."""
    if _same_place(source, out):
        raise ConfigError(f"--out {out} overlaps the checkpoint {source}; write elsewhere")


# ------------------------------------------------------------------- builders ---


def build_tabular_base(
    out: Path,
    data: TabularDataConfig,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    label_names: bool = True,
) -> Path:
    """The FT-Transformer for ``data``'s schema (one token per declared feature, in the
    declared order; a categorical feature's table has one row per value plus "other"),
    randomly initialised from ``seed``, saved into ``out``.

    ``label_names`` writes the classes into config.json; without it the files are those
    the simulation's demo base has always had (for the same seed and shape)."""
    if hidden_size < 4 or hidden_size % 4:
        raise ConfigError(f"hidden size {hidden_size} must be a positive multiple of 4 (heads)")
    if layers < 1:
        raise ConfigError(f"layers must be at least 1, got {layers}")
    classes = check_classes(data.classes)
    config = TABULAR_TASK.demo_config(
        num_numeric_features=len(data.numeric_features),
        categorical_cardinalities=[len(values) for values in data.categorical_features.values()],
        num_labels=len(classes),
        hidden_size=hidden_size,
        layers=layers,
        numeric_bounds=data.bounds_in_order(),
    )
    if label_names:
        name_classes(config, classes)
    torch.manual_seed(seed)
    TABULAR_TASK.new_model(config).save_pretrained(out)
    TABULAR_TASK.load_base_model(out)  # loads as a site loads it
    return out


def build_default_imaging_base(
    out: Path,
    classes: Sequence[str],
    *,
    image_size: int = 32,
    hidden_size: int = 256,
    layers: int = 4,
    patch_size: int = 8,
    seed: int = 0,
    pretext_images: int = 3000,
    label_names: bool = True,
    progress: Progress | None = None,
) -> Path:
    """The default imaging backbone, saved into ``out``: the demo ViT (1 channel,
    ``image_size`` pixels) pretrained without privacy on ``pretext_images`` public
    synthetic images (0: not pretrained), then given a zero-initialised head for
    ``classes``, so that before federated training it prefers no class.

    The simulation's demo base is this builder's output with ``label_names=False``
    (config.json then names no classes, as it always has)."""
    names = check_classes(classes)
    if hidden_size < 4 or hidden_size % 4:
        raise ConfigError(f"hidden size {hidden_size} must be a positive multiple of 4 (heads)")
    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise ConfigError(f"image size {image_size} must be a multiple of patch size {patch_size}")
    if layers < 1 or pretext_images < 0:
        raise ConfigError("layers must be at least 1 and pretext images at least 0")
    torch.manual_seed(seed)
    config = IMAGING_TASK.demo_config(
        image_size=image_size,
        num_labels=PRETEXT_CLASSES,
        hidden_size=hidden_size,
        layers=layers,
        patch_size=patch_size,
    )
    model = IMAGING_TASK.model_class(config)
    if pretext_images:
        pretrain_imaging_backbone(
            model, image_size, seed=seed, images=pretext_images, progress=progress
        )
    head = nn.Linear(config.hidden_size, len(names))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.classifier = head
    model.config.num_labels = len(names)
    if label_names:
        name_classes(model.config, names)
    model.save_pretrained(out)
    IMAGING_TASK.load_base_model(out)
    return out


def _load_checkpoint(
    model_class: type[PreTrainedModel], source: Path, head: str, **options: Any
) -> PreTrainedModel:
    """A checkpoint in its own dtype; every weight but the head's must be in it (a
    partly random backbone would train and "work")."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its table of the head's keys: ours below
    try:
        loaded: tuple[PreTrainedModel, dict[str, Any]] = model_class.from_pretrained(  # type: ignore[assignment]
            source, local_files_only=True, output_loading_info=True, dtype="auto", **options
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"the checkpoint in {source} cannot be loaded: {exc}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    model, info = loaded
    for kind, problem in (("missing_keys", "lacks"), ("mismatched_keys", "has other shapes of")):
        keys = sorted(_key(entry) for entry in info.get(kind, []))
        backbone = [key for key in keys if not key.startswith(f"{head}.")]
        if backbone:
            raise ConfigError(
                f"the checkpoint in {source} {problem} weights of the {model_class.__name__} "
                f"backbone: {backbone[:3]}{' …' if len(backbone) > 3 else ''}"
            )
    model.eval()
    return model


def _key(entry: Any) -> str:
    """A weight name from a loading report (mismatched keys come with their shapes)."""
    return str(entry[0] if isinstance(entry, tuple | list) else entry)


def _image_architecture_problem(model_type: str, source: Path) -> ConfigError:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    supported = ", ".join(sorted(IMAGE_ARCHITECTURES))
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return ConfigError(
            f"the checkpoint in {source} is a {model_type!r} image model, which the imaging "
            f"task does not support (supported: {supported})"
        )
    return ConfigError(
        f"the checkpoint in {source} is a {model_type!r} model, not an image classifier "
        f"or backbone the imaging task supports ({supported})"
    )


def _dry_run(model: PreTrainedModel, wanted: ImageInput, source: Path) -> None:
    """One forward pass on the input the sites will feed: a checkpoint whose processor
    and weights disagree is refused here, not at the first site."""
    side, channels = wanted.size, wanted.channels
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            model(pixel_values=torch.zeros(1, channels, side, side, dtype=dtype))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"the checkpoint in {source} does not run on its own input ({channels} x {side} x "
            f"{side}, from {PREPROCESSOR_FILE} or config.json): {exc}"
        ) from None


def import_image_checkpoint(source: Path, out: Path, classes: Sequence[str]) -> Path:
    """``source`` (an image classifier, or a backbone alone) with a new zero-initialised
    ``classifier`` head for ``classes``, saved into ``out`` with the checkpoint's own
    preprocessor_config.json: the sites resize and normalise their scans to its input.

    config.json gets ``image_size`` and ``num_channels`` where it lacks them, and
    ``image_size`` becomes the processor's side when the two disagree (see
    :func:`common.tasks.imaging.fit_input_side`)."""
    names = check_classes(classes)
    config = saved_config(source)
    if config.model_type not in IMAGE_ARCHITECTURES:
        raise _image_architecture_problem(config.model_type, source)
    wanted = image_input(source)  # square, 1 or 3 channels, a usable mean and std
    model = _load_checkpoint(image_model_class(config), source, HEAD)
    new_head(model, names)
    model = fit_input_side(model, wanted.size)
    _dry_run(model, wanted, source)
    model.save_pretrained(out)
    if (source / PREPROCESSOR_FILE).is_file():
        shutil.copyfile(source / PREPROCESSOR_FILE, out / PREPROCESSOR_FILE)
    else:
        logger.warning(
            "%s has no %s: the sites will scale pixels to mean %s, std %s",
            source,
            PREPROCESSOR_FILE,
            list(wanted.mean),
            list(wanted.std),
        )
    _ensure_config_keys(out, {"image_size": wanted.size, "num_channels": wanted.channels})
    IMAGING_TASK.load_base_model(out)
    return out


def import_text_checkpoint(source: Path, out: Path, classes: Sequence[str]) -> Path:
    """``source`` (a qwen2, llama or deepseek_v3 decoder, causal LM or classifier) with
    a new zero-initialised ``score`` head for ``classes`` and its tokenizer, saved into
    ``out``. The tokenizer is saved as the sites will use it: padding on the right, with
    a pad token (the eos token when it has none), whose id config.json names."""
    names = check_classes(classes)
    config = saved_config(source)
    if config.model_type not in TEXT_ARCHITECTURES:
        raise ConfigError(
            f"the checkpoint in {source} is a {config.model_type!r} model; the text task "
            f"supports {', '.join(TEXT_ARCHITECTURES)}"
        )
    tokenizer = load_tokenizer(source)  # refuses a directory without one
    model = _load_checkpoint(
        AutoModelForSequenceClassification,  # type: ignore[arg-type]
        source,
        "score",
        num_labels=len(names),
        ignore_mismatched_sizes=True,  # a classifier checkpoint with other classes
    )
    head = model.get_submodule("score")
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"the {config.model_type} classifier has no linear score head")
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    name_classes(model.config, names)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    TEXT_TASK.load_base_model(out)
    return out


def task_of(directory: Path) -> str:
    """The task a saved base model serves, told by its config.json's ``model_type``."""
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"{directory} has no config.json (not a model saved with save_pretrained)"
        )
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"config.json in {directory} cannot be read: {exc}") from None
    if model_type == FTTransformerConfig.model_type:
        return TABULAR_TASK.name
    if model_type in IMAGE_ARCHITECTURES:
        return IMAGING_TASK.name
    if model_type in TEXT_ARCHITECTURES:
        return TEXT_TASK.name
    raise ConfigError(
        f"{directory} holds a {model_type!r} model, which no fedlora task trains "
        f"({', '.join(TASKS.names())})"
    )
