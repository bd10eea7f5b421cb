"""One federated run of one task, from the initial adapter to the saved result."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp import Grid
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from common.adapters import AdapterArrays, AdapterLayout, adapter_sha256
from common.audit.review import COORDINATOR_PRIVATE_KEY, COORDINATOR_PUBLIC_KEY
from common.config import FederationConfig
from common.errors import ConfigError
from common.protocol import RoundRequest
from common.signing import (
    fingerprint,
    load_or_create_private_key,
    load_private_key,
    load_public_key,
    write_public_key,
)
from common.tasks import TASKS, TaskSpec, model_fingerprint
from server.aggregation import AGGREGATORS, AggregatorSpec
from server.audit import CoordinatorAudit, config_sha256, coordinator_log_path
from server.checkpoint import CheckpointStore, RunState
from server.distribution import release_artifact
from server.identity import load_site_registry
from server.introductions import FIRST_WAIT
from server.reporting import RunRecorder
from server.rounds import run_rounds
from server.strategy import FedLoraStrategy

logger = logging.getLogger(__name__)

RESULT_DIR = "tasks"


def coordinator_key(run_dir: Path, signing_key: Path | None) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 key: the configured one, which must exist, or one the
    run makes in its directory (a simulation)."""
    if signing_key is not None:
        return load_private_key(signing_key)
    return load_or_create_private_key(run_dir / COORDINATOR_PRIVATE_KEY)


def publish_public_key(run_dir: Path, key: Ed25519PrivateKey) -> None:
    """Write ``RUN_DIR/keys/coordinator.pub`` for reviewers; one run directory, one key
    (replacing it would make the earlier logs there look re-signed)."""
    path = run_dir / COORDINATOR_PUBLIC_KEY
    if not path.exists():
        write_public_key(path, key.public_key())
    elif fingerprint(load_public_key(path)) != fingerprint(key.public_key()):
        raise ConfigError(
            f"{run_dir} holds logs signed with another coordinator key "
            f"({COORDINATOR_PUBLIC_KEY}); choose a new run directory"
        )


def full_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter (base, LoRA and head): what full-model FL would send."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def adapter_arrays(model: PeftModel) -> AdapterArrays:
    """The model's adapter (LoRA and head) as arrays of its own, as the coordinator holds it."""
    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def initial_model(federation: FederationConfig) -> PeftModel:
    """The base model with the run's round-0 LoRA, initialised from the run's seed."""
    spec = TASKS.get(federation.task)
    torch.manual_seed(federation.seed)
    return spec.wrap_with_lora(spec.load_base_model(federation.base_model), federation.lora)


def run_federation(
    grid: Grid,
    federation: FederationConfig,
    run_dir: Path,
    signing_key: Path | None = None,
    resume: bool = False,
    site_registry: Path | None = None,
) -> dict[str, Any]:
    """Train ``federation.task`` for ``federation.rounds`` rounds and save what came out;
    every step is recorded in the run's signed audit log. With ``resume``, carry on the
    run in ``run_dir`` from its last checkpointed round. ``site_registry`` (the JSON file
    of server/deployment.py's ``write_site_registry``) names the audit key each site
    must announce; without it (a simulation), none is checked."""
    key = coordinator_key(run_dir, signing_key)
    with CheckpointStore(run_dir / "checkpoints" / federation.task).exclusive():
        if resume and (run_dir / RESULT_DIR / f"{federation.task}.json").exists():
            raise ConfigError(f"the {federation.task} run in {run_dir} finished; nothing to resume")
        # A run that failed before its first checkpoint resumes from its start, in its log.
        log_exists = coordinator_log_path(run_dir, federation.task).exists()
        opener = CoordinatorAudit.reopen if resume and log_exists else CoordinatorAudit.open
        audit = opener(run_dir, federation.task, key)
        publish_public_key(run_dir, key)
        try:
            return _run_federation(grid, federation, run_dir, audit, key, resume, site_registry)
        except BaseException as exc:
            audit.run_failed(exc)
            raise


def _run_federation(
    grid: Grid,
    federation: FederationConfig,
    run_dir: Path,
    audit: CoordinatorAudit,
    key: Ed25519PrivateKey,
    resume: bool,
    site_registry: Path | None = None,
) -> dict[str, Any]:
    spec = TASKS.get(federation.task)
    audit_keys = load_site_registry(site_registry) if site_registry is not None else {}
    checkpoints = CheckpointStore(run_dir / "checkpoints" / federation.task)
    settings_sha256 = config_sha256(federation)
    state = _resume_state(federation, run_dir, checkpoints, resume, settings_sha256)
    run_id = state.run_id if state is not None else str(grid.run.run_id)
    aggregation = AGGREGATORS.get(federation.aggregator)
    base_sha256 = model_fingerprint(federation.base_model)
    model = initial_model(federation)
    initial, frozen = _initial_adapter(model, federation, aggregation)
    recorder = RunRecorder(federation.task, run_dir / "metrics.csv")
    strategy = _build_strategy(
        federation,
        spec=spec,
        model=model,
        aggregation=aggregation,
        initial=initial,
        frozen=frozen,
        recorder=recorder,
        checkpoints=checkpoints,
        audit=audit,
        run_id=run_id,
        base_sha256=base_sha256,
        settings_sha256=settings_sha256,
        audit_keys=audit_keys,
    )
    _start_or_resume(grid, federation, strategy, audit, state, run_id, base_sha256)
    logger.info(
        "%s: %d rounds, aggregator %s, %d bytes per update",
        federation.task,
        federation.rounds,
        federation.aggregator,
        strategy.schema.with_dtype(federation.update_precision).payload_bytes,
    )
    run_rounds(
        strategy,
        grid,
        num_rounds=federation.rounds - strategy.rounds_before,
        timeout=federation.round_timeout,
    )
    final = strategy.global_adapter
    adapter_dir = run_dir / "adapters" / federation.task
    _save_adapter(model, final, adapter_dir)
    result = _result(federation, base_sha256, strategy, recorder, model)
    result["artifact"] = _release(
        grid,
        spec=spec,
        model=model,
        federation=federation,
        run_dir=run_dir,
        result=result,
        adapter_dir=adapter_dir,
        strategy=strategy,
        audit=audit,
        key=key,
    )
    _write_result(run_dir, federation.task, result)
    audit.run_finished(result, final)
    return result


def _resume_state(
    federation: FederationConfig,
    run_dir: Path,
    checkpoints: CheckpointStore,
    resume: bool,
    settings_sha256: str,
) -> RunState | None:
    """The checkpointed state to resume from: None for a fresh run, or a resumed run that
    failed before its first checkpoint (it starts over, in its log)."""
    state = checkpoints.load_state() if resume and checkpoints.state_path.exists() else None
    if state is not None and state.config_sha256 != settings_sha256:
        raise ConfigError(
            f"the federation config differs from the one the {federation.task} run in "
            f"{run_dir} started with; a run resumes with its own settings"
        )
    return state


def _initial_adapter(
    model: PeftModel, federation: FederationConfig, aggregation: AggregatorSpec
) -> tuple[AdapterArrays, AdapterArrays]:
    """The round-0 adapter and the part of it the sites keep frozen: with FFA-LoRA, LoRA's
    A seeded from the run's seed (so every site derives the same one), else nothing."""
    initial = adapter_arrays(model)
    layout = AdapterLayout(freeze_lora_a=aggregation.freezes_lora_a, seed=federation.seed)
    frozen = layout.frozen(initial)
    initial.update(frozen)
    return initial, frozen


def _build_strategy(
    federation: FederationConfig,
    *,
    spec: TaskSpec,
    model: PeftModel,
    aggregation: AggregatorSpec,
    initial: AdapterArrays,
    frozen: AdapterArrays,
    recorder: RunRecorder,
    checkpoints: CheckpointStore,
    audit: CoordinatorAudit,
    run_id: str,
    base_sha256: str,
    settings_sha256: str,
    audit_keys: dict[str, str],
) -> FedLoraStrategy:
    """The run's strategy, asking each round for ``federation``'s training settings."""
    return FedLoraStrategy(
        request_for_round=lambda r: RoundRequest.for_round(
            federation,
            base_sha256,
            r,
            spec.lora_targets(model.config),
            freeze_lora_a=aggregation.freezes_lora_a,
            run_id=run_id,
        ),
        initial=initial,
        frozen=frozen,
        aggregator=aggregation.build(federation.trim_fraction),
        validation=federation.validation,
        min_sites=federation.min_sites,
        rollback=federation.rollback,
        round_timeout=federation.round_timeout,
        recorder=recorder,
        checkpoints=checkpoints,
        audit=audit,
        run_id=run_id,
        config_sha256=settings_sha256,
        audit_keys=audit_keys,
    )


def _start_or_resume(
    grid: Grid,
    federation: FederationConfig,
    strategy: FedLoraStrategy,
    audit: CoordinatorAudit,
    state: RunState | None,
    run_id: str,
    base_sha256: str,
) -> None:
    """Introduce the connected sites, then audit the run's start (and checkpoint round 0)
    or its resumption from ``state``, then each site that joined."""
    introduced = strategy.introduce(
        grid, sorted(grid.get_node_ids()), wait=min(FIRST_WAIT, strategy.introduction_timeout)
    )
    joined = [
        site
        for site, details in introduced.items()
        if details.get("task", federation.task) == federation.task
    ]
    if state is None:
        audit.run_started(
            run=str(grid.run.run_id),
            federation=federation,
            base_model_sha256=base_sha256,
            initial=strategy.global_adapter,
            sites=joined,
        )
        strategy.save_state(0)
    else:
        _resume(grid, federation, strategy, audit, state, run_id, joined)
    for site, details in introduced.items():
        audit.site_joined(site, details)


def _resume(
    grid: Grid,
    federation: FederationConfig,
    strategy: FedLoraStrategy,
    audit: CoordinatorAudit,
    state: RunState,
    run_id: str,
    joined: list[str],
) -> None:
    """Restore ``strategy`` from ``state``, check its adapter is the checkpointed one,
    and audit the resumption."""
    strategy.resume(state)
    if adapter_sha256(strategy.global_adapter) != state.adapter_sha256:
        raise ConfigError("the resumed adapter differs from the checkpointed one")
    audit.run_resumed(
        run=str(grid.run.run_id),
        run_id=run_id,
        from_round=state.completed_round,
        adapter=strategy.global_adapter,
        sites=joined,
    )
    logger.info(
        "%s: resuming run %s after round %d of %d",
        federation.task,
        run_id,
        state.completed_round,
        federation.rounds,
    )


def _save_adapter(model: PeftModel, final: AdapterArrays, adapter_dir: Path) -> None:
    """Load the final adapter into ``model`` and save it (PEFT's format) in ``adapter_dir``."""
    set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in final.items()})
    model.save_pretrained(str(adapter_dir))


def _result(
    federation: FederationConfig,
    base_sha256: str,
    strategy: FedLoraStrategy,
    recorder: RunRecorder,
    model: PeftModel,
) -> dict[str, Any]:
    """The run's result (``tasks/TASK.json``), less its artifact."""
    return {
        "task": federation.task,
        "base_model_sha256": base_sha256,
        "aggregator": federation.aggregator,
        "rounds_planned": federation.rounds,
        "rounds_completed": strategy.rounds_aggregated,
        # The final adapter's own latest evaluation (the best's, after a final rollback).
        "final": strategy.adapter_evaluation or {"accuracy": 0.0, "loss": 0.0},
        "final_adapter_round": strategy.adapter_round,
        "final_accuracy": (strategy.adapter_evaluation or {}).get("accuracy"),
        "per_round": {str(k): v for k, v in sorted(recorder.federated.items())},
        "sites": sorted(recorder.sites),
        # The sites of this task that joined, also those that refused every round.
        "site_kinds": {
            site: details.get("kind", "")
            for site, details in sorted(strategy.site_details.items())
            if details.get("task") == federation.task
        },
        "site_privacy": {site: asdict(record) for site, record in sorted(recorder.sites.items())},
        "exclusions": recorder.exclusions,
        "lora_product_error": recorder.lora_errors,
        "rollbacks": recorder.rollbacks,
        "failed_rounds": recorder.failed_rounds,
        "best_round": strategy.best.server_round if strategy.best else None,
        "adapter_bytes": strategy.schema.with_dtype(federation.update_precision).payload_bytes,
        "model_parameters_bytes": full_model_bytes(model),
    }


def _release(
    grid: Grid,
    *,
    spec: TaskSpec,
    model: PeftModel,
    federation: FederationConfig,
    run_dir: Path,
    result: dict[str, Any],
    adapter_dir: Path,
    strategy: FedLoraStrategy,
    audit: CoordinatorAudit,
    key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """Release the trained adapter as a signed artifact to this task's sites; its record,
    or ``{"status": "failed", ...}``. The trained adapter is saved either way: a failed
    export or distribution is recorded (``artifact-failed``), not allowed to lose the run."""
    try:
        return release_artifact(
            grid,
            spec=spec,
            model=model,
            federation=federation,
            run_dir=run_dir,
            result=result,
            adapter_dir=adapter_dir,
            known_sites=strategy.sites_of_this_task(),
            audit=audit,
            key=key,
        )
    except Exception as exc:
        logger.exception("%s: the artifact could not be released", federation.task)
        audit.record("artifact-failed", error=type(exc).__name__)
        return {"status": "failed", "error": type(exc).__name__}


def _write_result(run_dir: Path, task: str, result: dict[str, Any]) -> None:
    """Write ``RUN_DIR/tasks/TASK.json``, which also marks the run finished (not resumable)."""
    results = run_dir / RESULT_DIR
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{task}.json").write_text(json.dumps(result, indent=2))
