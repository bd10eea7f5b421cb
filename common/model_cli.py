"""``fedlora model …``: the coordinator makes the federation's base model (``init``) and
anyone checks what a base model directory holds (``inspect``).

The builders are in :mod:`common.model_init`; this module parses options, shows
progress and prints what a deployment needs next: the base model's SHA-256 and the
federation-config lines that name it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import tomli_w
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import model_init as builders
from common.config import LoraSettings
from common.data_config import TabularDataConfig, data_kind
from common.errors import ConfigError
from common.tasks import TASKS, model_fingerprint
from common.tasks.image_input import image_input
from common.tasks.imaging import IMAGING_TASK
from common.tasks.imaging_pretext import Progress as ProgressCallback
from common.tasks.tabular import TABULAR_TASK
from common.tasks.text import TEXT_TASK, load_tokenizer

DIRECTORY = click.Path(file_okay=False, path_type=Path)
EXISTING_DIRECTORY = click.Path(exists=True, file_okay=False, path_type=Path)
SHAPE_DEFAULTS: dict[str, dict[str, int]] = {
    TABULAR_TASK.name: {"hidden_size": 32, "layers": 2},
    IMAGING_TASK.name: {
        "hidden_size": 256,
        "layers": 4,
        "image_size": 32,
        "patch_size": 8,
        "pretext_images": 3000,
    },
}
"""What fedlora builds when not told otherwise: the simulation's demo shapes."""
OPTION_NAMES = {
    "hidden_size": "--hidden-size",
    "layers": "--layers",
    "image_size": "--image-size",
    "patch_size": "--patch-size",
    "pretext_images": "--pretext-images",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def model() -> None:
    """Base models: make the federation's (init), see what one holds (inspect).

    \b
    A federation's base model is a directory that the coordinator and every site of
    the task hold unchanged; its SHA-256 is part of every run.
      fedlora model init tabular-classification --site bank.toml --out models/tabular
      fedlora model init dicom-classification --classes normal,lesion --out models/dicom
      fedlora model init dicom-classification --from checkpoints/vit-base \\
          --classes normal,lesion --out models/dicom
      fedlora model init text-classification --from checkpoints/qwen2-1.5b \\
          --classes routine,urgent --out models/text
      fedlora model inspect models/dicom
    """


def _shape_options(function: Any) -> Any:
    """The options that size the models fedlora builds itself (not ``--from``)."""
    options = [
        click.option(
            "--hidden-size",
            type=click.IntRange(4),
            help="Width (a multiple of 4). Default: tabular 32, dicom 256.",
        ),
        click.option(
            "--layers",
            type=click.IntRange(1, 48),
            help="Encoder layers. Default: tabular 2, dicom 4.",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(8, 1024),
            help="dicom default backbone: side of the square 1-channel input, a multiple of "
            "--patch-size. Default: 32.",
        ),
        click.option(
            "--patch-size",
            type=click.IntRange(1),
            help="dicom default backbone: side of a ViT patch, in pixels. Default: 8.",
        ),
        click.option(
            "--pretext-images",
            type=click.IntRange(0),
            help="dicom default backbone: public synthetic images it is pretrained on before "
            "its head is replaced (0: not pretrained). Default: 3000, as in the simulation.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@model.command()
@click.argument("task", type=click.Choice(TASKS.names()))
@click.option("--out", type=DIRECTORY, required=True, help="Directory to write the base model to.")
@click.option(
    "--from",
    "source",
    type=EXISTING_DIRECTORY,
    help="A local checkpoint to import (dicom: a ViT, DeiT, DINOv2, Swin or ConvNeXt image "
    "classifier or backbone, 1 or 3 channels; text: a qwen2, llama or deepseek_v3 decoder "
    "with its tokenizer). It gets a new head for the classes; image checkpoints keep their "
    "input size and normalisation (preprocessor_config.json).",
)
@click.option(
    "--classes",
    metavar="A,B,…",
    help="Class names in label order, comma-separated: the sites' data.classes.",
)
@click.option(
    "--site",
    "site_config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A site config whose [data] the model must fit: the schema of a tabular model "
    "(numeric features, categorical values, classes), the classes of the others. Only "
    "its [data] table is read, and no data file.",
)
@click.option("--seed", type=int, help="Seed of the weights fedlora initialises. Default: 0.")
@_shape_options
@click.option(
    "--force", is_flag=True, help="Replace a non-empty --out (once the new model is whole)."
)
def init(
    task: str,
    out: Path,
    source: Path | None,
    classes: str | None,
    site_config: Path | None,
    seed: int | None,
    force: bool,
    **shape: int | None,
) -> None:
    """Make the base model of TASK in --out, and print its SHA-256.

    \b
    tabular-classification  an FT-Transformer for --site's [data] schema
    dicom-classification    the default backbone (the demo ViT, pretrained on public
                            synthetic images), or --from a local image checkpoint
    text-classification     --from a local decoder LLM with its tokenizer

    The model is written beside --out first and renamed when complete, so a failed
    init leaves nothing behind. Copy --out unchanged to every site of the task.
    """
    given = {name: value for name, value in shape.items() if value is not None}
    _check_options(task, source, site_config, seed, given)
    data = builders.site_data(site_config) if site_config is not None else None
    if data is not None and data_kind(data) != TASKS.get(task).data_kind:
        raise ConfigError(
            f"{site_config} describes {data_kind(data)} data; {task} trains on "
            f"{TASKS.get(task).data_kind} data"
        )
    names = _classes(classes, data.classes if data is not None else None)
    if source is not None:
        builders.refuse_overlap(source, out)
    sizes = {**SHAPE_DEFAULTS.get(task, {}), **given}
    with builders.staged_directory(out, force) as staging:
        if task == TABULAR_TASK.name:
            assert isinstance(data, TabularDataConfig)  # _check_options and the kind check
            builders.build_tabular_base(
                staging,
                data,
                hidden_size=sizes["hidden_size"],
                layers=sizes["layers"],
                seed=seed or 0,
            )
        elif source is None:
            with _pretraining_bar(sizes["pretext_images"]) as progress:
                builders.build_default_imaging_base(
                    staging,
                    names,
                    image_size=sizes["image_size"],
                    hidden_size=sizes["hidden_size"],
                    layers=sizes["layers"],
                    patch_size=sizes["patch_size"],
                    seed=seed or 0,
                    pretext_images=sizes["pretext_images"],
                    progress=progress,
                )
        else:
            importer = (
                builders.import_image_checkpoint
                if task == IMAGING_TASK.name
                else builders.import_text_checkpoint
            )
            with Console(stderr=True).status(f"importing {source} …"):
                importer(source, staging, names)
    _print_next_steps(task, out.absolute())


def _check_options(
    task: str, source: Path | None, site: Path | None, seed: int | None, shape: dict[str, int]
) -> None:
    """Refuse options that do not apply, rather than ignore them."""
    if task == TEXT_TASK.name and source is None:
        raise click.UsageError(
            "text-classification imports a checkpoint: give --from DIR (a decoder LLM "
            "saved with its tokenizer)"
        )
    if task == TABULAR_TASK.name:
        if source is not None:
            raise click.UsageError("tabular-classification builds its model: --from does not apply")
        if site is None:
            raise click.UsageError(
                "tabular-classification needs --site SITE.toml: the model is built for its "
                "[data] schema (features, categorical values, classes)"
            )
    allowed = set(SHAPE_DEFAULTS.get(task, {})) if source is None else set()
    refused = [OPTION_NAMES[name] for name in shape if name not in allowed]
    if seed is not None and source is not None:
        refused.append("--seed")
    if refused:
        what = "an imported checkpoint keeps its own shape" if source else f"not for {task}"
        raise click.UsageError(f"{', '.join(refused)}: {what}")


def _classes(option: str | None, from_site: list[str] | None) -> list[str]:
    """The classes from --classes, or from the site config's data.classes; both given,
    they must agree (the sites refuse a model with another number of outputs)."""
    if option is None and from_site is None:
        raise click.UsageError("name the classes: --classes A,B,… or --site SITE.toml")
    if option is None:
        assert from_site is not None
        return builders.check_classes(from_site)
    named = builders.check_classes(option.split(","))
    if from_site is not None and named != from_site:
        raise ConfigError(f"--classes {named} differ from the site's data.classes {from_site}")
    return named


@contextmanager
def _pretraining_bar(images: int) -> Iterator[ProgressCallback | None]:
    """A progress bar for the backbone's public pretraining (minutes at default size)."""
    if not images:
        yield None
        return
    columns = (
        TextColumn("pretraining on public synthetic images"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        step = bar.add_task("pretraining", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(step, completed=done, total=total)

        yield advance


def _print_next_steps(task: str, out: Path) -> None:
    click.echo(f"Wrote the {task} base model to {out}")
    click.echo(f"SHA-256: {model_fingerprint(out)}")
    click.echo("")
    click.echo("In the federation (run) config of this task (see sites/federation/):")
    for line in tomli_w.dumps({"task": task, "base_model": str(out)}).splitlines():
        click.echo(f"  {line}")
    click.echo("Copy the directory unchanged to every site of the task and point its")
    click.echo("[site] base_model at it: a site whose copy has another SHA-256 refuses the run.")
    click.echo(f"See what it holds: fedlora model inspect {out}")


# ------------------------------------------------------------------- inspect ---


def _model_input(task: str, directory: Path, config: Any) -> dict[str, Any]:
    if task == IMAGING_TASK.name:
        return image_input(directory).to_dict()
    if task == TABULAR_TASK.name:
        return {
            "numeric_features": int(config.num_numeric_features),
            "categorical_cardinalities": list(config.categorical_cardinalities),
        }
    tokenizer = load_tokenizer(directory)
    return {
        "tokenizer": type(tokenizer).__name__,
        "vocabulary": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_positions": getattr(config, "max_position_embeddings", None),
    }


def _class_names(config: Any) -> list[str]:
    """The outputs' names in label order (``LABEL_0``, … when config.json names none)."""
    labels: dict[Any, Any] = dict(config.id2label or {})
    return [str(labels[key]) for key in sorted(labels, key=int)]


def describe(directory: Path) -> dict[str, Any]:
    """What a base model directory holds, loaded and wrapped as a site would (so a
    directory a site would refuse is refused here, with the same reason)."""
    task = builders.task_of(directory)
    spec = TASKS.get(task)
    base = spec.load_base_model(directory)
    config = base.config
    lora = LoraSettings()
    targets = spec.lora_targets(config)
    description: dict[str, Any] = {
        "directory": str(directory.absolute()),
        "task": task,
        "architecture": config.model_type,
        "model_class": type(base).__name__,
        "parameters": base.num_parameters(),
        "input": _model_input(task, directory, config),
        "classes": _class_names(config),
        "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(targets)},
        "head_modules": list(spec.head_modules),
    }
    wrapped = spec.wrap_with_lora(base, lora)
    description["trainable_parameters"] = sum(
        parameter.numel() for parameter in wrapped.parameters() if parameter.requires_grad
    )
    description["sha256"] = model_fingerprint(directory)
    return description


def _text_lines(description: dict[str, Any]) -> list[str]:
    share = description["trainable_parameters"] / max(description["parameters"], 1)
    lora = description["lora"]
    lines = [
        f"task: {description['task']}",
        f"architecture: {description['architecture']} ({description['model_class']})",
        f"parameters: {description['parameters']:,}",
        "input: " + ", ".join(f"{k} {v}" for k, v in description["input"].items()),
        f"classes: {', '.join(description['classes'])}",
        f"LoRA targets (default): {', '.join(lora['target_modules'])}",
        f"head (trained in full): {', '.join(description['head_modules'])}",
        f"trainable under LoRA r={lora['r']}: {description['trainable_parameters']:,} "
        f"({share:.2%})",
        f"SHA-256: {description['sha256']}",
    ]
    return lines


@model.command()
@click.argument("directory", type=EXISTING_DIRECTORY)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object, for scripts.",
)
def inspect(directory: Path, output_format: str) -> None:
    """What the base model in DIRECTORY is: task, architecture, size, input, classes,
    where LoRA goes, what trains, and its SHA-256 (the one a run names)."""
    description = describe(directory)
    if output_format == "json":
        click.echo(json.dumps(description, indent=2))
        return
    for line in _text_lines(description):
        click.echo(line)
