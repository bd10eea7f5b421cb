"""Local multi-site simulation: synthetic sites (or a researcher's own, see
:mod:`simulations.own_data`), demo base models, one Flower Simulation Engine
federation per task, and a run directory at the end.

The simulation drives the same ServerApp and ClientApp code as a deployment; only the
way each virtual SuperNode finds its site config differs (by partition id here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from client.app import build_client_app
from client.audit import SITE_AUDIT_LOG
from common.audit.log import head_path
from common.audit.review import AUDIT_DIR, COORDINATOR_PUBLIC_KEY, SITE_LOGS_DIR
from common.config import FederationConfig, load_site_config
from common.model_init import build_default_imaging_base
from common.tasks import TASKS
from common.tasks.text import build_word_tokenizer
from server.app import build_server_app
from server.run import coordinator_key, publish_public_key
from simulations.faults import fault_mods
from simulations.generators.tabular import bank_schema
from simulations.generators.text import (
    TEXT_CLASSES,
    customer_narrative,
    public_vocabulary,
    radiology_report,
)
from simulations.own_data import own_base_model, prepare_own_sites, write_run_copy
from simulations.partition import SplitReport
from simulations.scenario import (
    ExistingSiteSpec,
    GeneratedSite,
    Scenario,
    SiteBehaviour,
    SplitSite,
)
from simulations.site_kinds import IMAGING_CLASSES, SITE_KINDS

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
BASE_MODEL_VERSION = 3  # bump when the demo base models change


@dataclass(frozen=True)
class PartitionSites:
    """Maps a simulated SuperNode (partition id) to its site config file."""

    site_configs: tuple[str, ...]

    def __call__(self, context: Context) -> Path:
        return Path(self.site_configs[int(context.node_config["partition-id"])])


def _generation_marker(spec: GeneratedSite, scenario: Scenario) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION,
        "seed": scenario.seed,
        "image_size": scenario.image_size,
        **spec.model_dump(exclude={"epsilon", "delta", "behaviour"}),
    }


def _site_seed(scenario: Scenario, spec: GeneratedSite) -> int:
    return scenario.seed * 1000 + [s.id for s in scenario.sites].index(spec.id)


def generate_site_data(spec: GeneratedSite, scenario: Scenario, site_dir: Path) -> bool:
    """Write the site's synthetic data unless identical data is already there.

    Returns True when data was (re)generated. The site's ``state/`` folder is kept.
    """
    marker_path = site_dir / "generated.json"
    marker = _generation_marker(spec, scenario)
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return False
    data_dir = site_dir / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    seed = _site_seed(scenario, spec)
    SITE_KINDS.get(spec.data_kind).generate(spec, scenario, data_dir, seed)
    marker_path.write_text(json.dumps(marker, indent=2))
    return True


def build_base_model(task: str, scenario: Scenario, models_dir: Path) -> Path:
    """The frozen base model every site of ``task`` shares, saved for from_pretrained.

    The imaging backbone is pretrained on public synthetic images first (see
    :func:`common.model_init.build_default_imaging_base`), as a real site's base would
    be a pretrained model; its classification head is then replaced by a fresh one.
    """
    directory = models_dir / task
    spec = TASKS.get(task)
    marker: dict[str, Any] = {"builder": BASE_MODEL_VERSION, "seed": scenario.seed}
    if spec.data_kind == "text":  # its own settings and the vocabulary of its tokenizer
        marker["text_backbone"] = scenario.text_backbone.model_dump()
        marker["vocabulary"] = hashlib.sha256("\n".join(public_vocabulary()).encode()).hexdigest()
    else:
        marker["image_size"] = scenario.image_size
        marker["imaging_backbone"] = scenario.imaging_backbone.model_dump()
    marker_path = directory / "fedlora-demo-base.json"
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return directory
    shutil.rmtree(directory, ignore_errors=True)  # built by another version or setting
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    torch.manual_seed(scenario.seed)
    if spec.data_kind == "dicom":
        # `fedlora model init dicom-classification` builds the same base (the demo ViT
        # pretrained on public synthetic images, then a zero head); config.json names
        # no classes here, so the demo fingerprint stays what it has been.
        build_default_imaging_base(
            temporary,
            IMAGING_CLASSES,
            image_size=scenario.image_size,
            seed=scenario.seed,
            label_names=False,
            **scenario.imaging_backbone.model_dump(),
        )
    elif spec.data_kind == "text":
        backbone = scenario.text_backbone
        # The tokenizer is saved with the model, as in any downloaded checkpoint.
        tokenizer = build_word_tokenizer(public_vocabulary(), backbone.max_tokens)
        tokenizer.save_pretrained(temporary)
        model = spec.new_model(
            spec.demo_config(
                architecture=backbone.architecture,
                vocab_size=len(tokenizer),
                num_labels=len(TEXT_CLASSES),
                hidden_size=backbone.hidden_size,
                layers=backbone.layers,
                max_tokens=backbone.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        pretrain_text_backbone(model, tokenizer, backbone.max_tokens, seed=scenario.seed)
        head = model.get_submodule("score")
        assert isinstance(head, torch.nn.Linear)
        torch.nn.init.zeros_(head.weight)  # as for imaging: no class preferred at first
        model.save_pretrained(temporary)
    else:
        schema = bank_schema()
        spec.build_demo_base_model(
            temporary,
            seed=scenario.seed,
            num_numeric_features=len(schema["numeric_features"]),
            categorical_cardinalities=[len(v) for v in schema["categorical_features"].values()],
            num_labels=len(schema["classes"]),
        )
    (temporary / marker_path.name).write_text(json.dumps(marker))
    temporary.replace(directory)
    return directory


def pretrain_text_backbone(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    seed: int,
    texts: int = 4000,
    epochs: int = 3,
) -> float:
    """Next-token pretraining of the decoder on public synthetic reports and narratives
    (no labels, no site data), as a real base model is a pretrained LLM; returns the
    last batch's language-model loss."""
    rng = np.random.default_rng(seed + 1)
    corpus = [
        (radiology_report if index % 2 else customer_narrative)(rng, bool(rng.random() < 0.5))
        for index in range(texts)
    ]
    encoded = tokenizer(
        corpus, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    targets = ids.masked_fill(mask == 0, -100)
    language_model = AutoModelForCausalLM.from_config(model.config)
    language_model.model.load_state_dict(model.model.state_dict())  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=3e-3)
    language_model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(texts, generator=generator)
        for start in range(0, texts, 64):
            batch = order[start : start + 64]
            loss = language_model(
                input_ids=ids[batch], attention_mask=mask[batch], labels=targets[batch]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.model.load_state_dict(language_model.model.state_dict())  # type: ignore[union-attr]
    final = float(loss.detach())
    logger.info("text base model: public next-token loss %.3f", final)
    return final


def site_config_document(
    spec: GeneratedSite,
    task: str,
    site_dir: Path,
    base_model: Path,
    scenario: Scenario,
    coordinator_key: Path | None = None,
) -> dict[str, Any]:
    """The TOML a real site operator would write for this site."""
    document: dict[str, Any] = {
        "site": {
            "id": spec.id,
            "kind": spec.kind,
            "task": task,
            "base_model": str(base_model),
            "state_dir": str(site_dir / "state"),
        },
        "privacy": {"epsilon": spec.epsilon, "delta": spec.delta},
        "policy": {"min_cohort": 20},
    }
    if coordinator_key is not None:
        document["site"]["coordinator_key"] = str(coordinator_key)
    document["data"] = SITE_KINDS.get(spec.data_kind).data_document(spec, site_dir, scenario)
    return document


@dataclass(frozen=True)
class PreparedRun:
    federations: dict[str, FederationConfig]
    site_configs: dict[str, list[Path]]
    """Task -> the site TOML files of its federation (partition order)."""
    behaviours: dict[str, list[SiteBehaviour | None]]
    """Task -> each site's injected fault (None: honest), in the same order."""


def prepare(
    scenario: Scenario,
    run_dir: Path,
    data_dir: Path,
    rounds: int | None = None,
    on_site: Callable[[str, bool], None] | None = None,
    aggregator: str | None = None,
    on_split: Callable[[SplitReport], None] | None = None,
) -> PreparedRun:
    """Generate or reuse data and models; write site and federation configs into run_dir.

    Sites of a researcher's own data (existing site configs, splits of one dataset) are
    used as their configs say, with the base model those name (see
    :mod:`simulations.own_data`); only generated sites get the demo base models.
    """
    (run_dir / "sites").mkdir(parents=True, exist_ok=True)
    (run_dir / "federation").mkdir(parents=True, exist_ok=True)
    # The run's coordinator key exists before the sites are configured, so each site
    # can pin its public half and accept only artifacts it signed.
    publish_public_key(run_dir, coordinator_key(run_dir, None))
    pinned_key = run_dir / COORDINATOR_PUBLIC_KEY
    own_configs = prepare_own_sites(scenario, data_dir, on_site=on_site, on_split=on_split)
    federations: dict[str, FederationConfig] = {}
    site_configs: dict[str, list[Path]] = {}
    behaviours: dict[str, list[SiteBehaviour | None]] = {}
    for task, settings in scenario.tasks.items():
        if scenario.has_own_data(task):
            base_model = own_base_model(task, scenario.own_sites_of(task))
        else:
            base_model = build_base_model(task, scenario, data_dir / "models")
        values = settings.model_dump()
        if rounds is not None:
            values["rounds"] = rounds
        if aggregator is not None:
            values["aggregator"] = aggregator
        federation = FederationConfig.model_validate(
            {**values, "task": task, "base_model": base_model, "seed": scenario.seed}
        )
        federations[task] = federation
        document = federation.model_dump(mode="json", exclude_none=True)
        (run_dir / "federation" / f"{task}.toml").write_text(tomli_w.dumps(document))
        behaviours[task] = [spec.behaviour for spec in scenario.sites_of(task)]
        site_configs[task] = []
        for spec in scenario.sites_of(task):
            path = run_dir / "sites" / f"{spec.id}.toml"
            if isinstance(spec, ExistingSiteSpec | SplitSite):
                write_run_copy(own_configs[spec.id], path, pinned_key)
            else:
                site_dir = data_dir / "sites" / spec.id
                generated = generate_site_data(spec, scenario, site_dir)
                if on_site is not None:
                    on_site(spec.id, generated)
                document = site_config_document(
                    spec, task, site_dir, base_model, scenario, pinned_key
                )
                path.write_text(tomli_w.dumps(document))
                load_site_config(path)  # what we wrote must validate like an operator's file
            site_configs[task].append(path)
    return PreparedRun(federations, site_configs, behaviours)


class _DropDeprecationNotice(logging.Filter):
    """Flower (1.41, 1.42) warns that ``run_simulation`` is deprecated; the README says why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def run_task(
    federation: FederationConfig,
    site_configs: list[Path],
    run_dir: Path,
    verbose: bool = False,
    behaviours: Sequence[SiteBehaviour | None] = (),
) -> None:
    """One federation on Flower's Simulation Engine: one virtual SuperNode per site.

    ``behaviours`` (one per site, in order) injects faults; empty: every site is honest.
    """
    server_app = build_server_app(lambda _context: (federation, run_dir))
    sites = PartitionSites(tuple(str(p) for p in site_configs))
    client_app = build_client_app(
        sites, mods=fault_mods(behaviours or [None] * len(site_configs), sites)
    )
    notice_filter = _DropDeprecationNotice()
    flower_logger = logging.getLogger("flwr")
    flower_logger.addFilter(notice_filter)
    try:
        _run_on_simulation_engine(server_app, client_app, len(site_configs), verbose)
    finally:
        flower_logger.removeFilter(notice_filter)
        collect_site_logs(site_configs, run_dir)


def collect_site_logs(site_configs: Sequence[Path], run_dir: Path) -> None:
    """Copy each site's audit log (and its signed head) into ``RUN_DIR/audit/sites``.

    In a deployment each log stays at its site; a simulation's sites all live here, so
    the run directory can hold a copy for review (``fedlora audit verify RUN_DIR``).
    """
    target = run_dir / AUDIT_DIR / SITE_LOGS_DIR
    for path in site_configs:
        config = load_site_config(path)
        log = config.site.state_dir / SITE_AUDIT_LOG
        if not log.exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        copy = target / f"{config.site.id}.jsonl"
        # The head first: a log only grows, so a copy taken while the site appends is
        # at worst longer than its head, never cut short of it.
        if head_path(log).exists():
            shutil.copyfile(head_path(log), head_path(copy))
        shutil.copyfile(log, copy)


def _run_on_simulation_engine(
    server_app: ServerApp, client_app: ClientApp, supernodes: int, verbose: bool
) -> None:
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=supernodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "logging_level": "INFO" if verbose else "ERROR",
                "log_to_driver": verbose,
                "include_dashboard": False,
            },
        },
        verbose_logging=verbose,
    )
