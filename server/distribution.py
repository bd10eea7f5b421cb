"""The end of a run: build the signed artifact, have the sites check it, sign the checked
manifest, and send it to every site to install.

The server holds no data, so the artifact's fp32 and int8 metrics come from the sites:
each verifies the first signed manifest, scores both models on its held-out data and
replies; the example-weighted means go into the final manifest, which is signed only
then. Sites install only a manifest that carries those results.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from peft import LoraConfig, PeftModel

from common.artifact import (
    MODEL_INT8,
    AuditHead,
    CheckedMetrics,
    Manifest,
    Metrics,
    SitePrivacy,
    artifact_payload,
    file_entries,
    manifest_sha256,
    sign_manifest,
    verify_artifact,
)
from common.audit.review import coordinator_log_name
from common.config import AccountantName, FederationConfig
from common.errors import ArtifactError, UpdateError
from common.protocol import (
    ARTIFACT_CHECK,
    ARTIFACT_INSTALL,
    ARTIFACT_RECORD,
)
from common.replies import ArtifactCheckMetrics, InstallMetrics, ReplyMetrics
from common.signing import fingerprint
from common.tasks import TaskSpec
from server.audit import CoordinatorAudit
from server.export import MODEL_FP32, copy_adapter, export_model
from server.strategy_utils import (
    FailedReply,
    SiteReply,
    missing_replies,
    parse_replies,
    weighted_mean,
)

logger = logging.getLogger(__name__)

ARTIFACTS_DIR = "artifacts"
EXPORTS_DIR = "exports"


def code_version() -> str:
    try:
        return f"fedlora {version('fedlora')}"
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "fedlora (not installed)"


# ------------------------------------------------------------- pure functions ---


def check_plausible(metrics: Mapping[str, float]) -> None:
    """Reject numbers no honest site reports (they would skew the manifest)."""
    for key, value in metrics.items():
        if key.endswith(("-accuracy", "-auc")) and not 0.0 <= value <= 1.0:
            raise UpdateError(f"{key} = {value} is outside [0, 1]")
        if key.endswith("-loss") and value < 0:
            raise UpdateError(f"{key} = {value} is negative")


def aggregate_checks(replies: Sequence[SiteReply]) -> CheckedMetrics:
    """Example-weighted means of the sites' scores (AUC over the sites that have one)."""
    if not replies:
        raise ValueError("no site checked the artifact")
    weights = [reply.metrics["num-examples"] for reply in replies]

    def scores(model: str) -> Metrics:
        with_auc = [reply for reply in replies if f"{model}-auc" in reply.metrics]
        return Metrics(
            accuracy=weighted_mean([r.metrics[f"{model}-accuracy"] for r in replies], weights),
            loss=weighted_mean([r.metrics[f"{model}-loss"] for r in replies], weights),
            auc=weighted_mean(
                [r.metrics[f"{model}-auc"] for r in with_auc],
                [r.metrics["num-examples"] for r in with_auc],
            )
            if with_auc
            else None,
            examples=int(sum(weights)),
        )

    return CheckedMetrics(
        fp32=scores("fp32"), int8=scores("int8"), sites=sorted(r.site for r in replies)
    )


def site_privacy(
    site_records: Mapping[str, Mapping[str, Any]], accountants: Mapping[str, str]
) -> list[SitePrivacy]:
    """ε, δ and rounds per site that trained in the run, as the sites reported them."""
    return [
        SitePrivacy(
            site=site,
            epsilon=float(record["epsilon"]),
            delta=float(record["delta"]),
            rounds_trained=int(record["rounds_trained"]),
            accountant=accountants.get(site),
        )
        for site, record in sorted(site_records.items())
    ]


# ------------------------------------------------------------------- the flow ---


def _send(
    grid: Grid, nodes: Sequence[int], message_type: str, payload: dict[str, bytes], timeout: float
) -> list[Message]:
    messages = [
        Message(
            RecordDict({ARTIFACT_RECORD: ConfigRecord(dict(payload))}),
            dst_node_id=node,
            message_type=message_type,
        )
        for node in nodes
    ]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _collect(
    replies: list[Message],
    nodes: Sequence[int],
    known_sites: dict[int, str],
    timeout: float,
    schema: type[ReplyMetrics],
) -> tuple[list[SiteReply], list[FailedReply]]:
    good, bad = parse_replies(
        replies, known_sites, None, schema=schema, check_metrics=check_plausible
    )
    return good, bad + missing_replies(nodes, replies, known_sites, timeout)


def build_artifact(
    spec: TaskSpec,
    model: PeftModel,
    adapter_dir: Path,
    draft: Path,
    fp32_path: Path,
    *,
    run: str,
    provenance: Mapping[str, Any],
    key: Ed25519PrivateKey,
) -> tuple[Manifest, bytes]:
    """Export ``model`` and write a signed, not yet checked artifact into ``draft``.

    ``provenance`` is the run's result (base model hash, rounds, ε per site).
    """
    shutil.rmtree(draft, ignore_errors=True)
    exported = export_model(
        model,
        spec.example_inputs(model.config),
        fp32_path,
        draft / MODEL_INT8,
        spec.head_modules,
        sequence_inputs=spec.sequence_inputs,
        prepare=spec.prepare_export,
    )
    copy_adapter(adapter_dir, draft)
    lora = model.peft_config["default"]
    if not isinstance(lora, LoraConfig):
        raise ArtifactError("export-failed", "the final model carries no LoRA adapter")
    manifest = Manifest(
        task=spec.name,
        run=run,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        code_version=code_version(),
        base_model_sha256=provenance["base_model_sha256"],
        num_labels=int(model.config.num_labels),
        inputs=exported.inputs,
        outputs=["logits"],
        lora={
            "r": int(lora.r),
            "alpha": float(lora.lora_alpha),
            "target_modules": sorted(_names(lora.target_modules)),
            "modules_to_save": sorted(lora.modules_to_save or []),
        },
        training={
            "aggregator": provenance["aggregator"],
            "rounds_planned": provenance["rounds_planned"],
            "rounds_completed": provenance["rounds_completed"],
            "final_adapter_round": provenance["final_adapter_round"],
            # None when the final adapter was never evaluated: nothing made up is signed.
            "final_accuracy": provenance["final_accuracy"],
        },
        sites=site_privacy(provenance["site_privacy"], {}),
        quantization=exported.quantization,
        files=file_entries(draft),
        signer=fingerprint(key.public_key()),
    )
    return manifest, sign_manifest(draft, manifest, key)


def release_artifact(
    grid: Grid,
    *,
    spec: TaskSpec,
    model: PeftModel,
    federation: FederationConfig,
    run_dir: Path,
    result: Mapping[str, Any],
    adapter_dir: Path,
    known_sites: dict[int, str],
    audit: CoordinatorAudit,
    key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """Export, check, sign and install; returns the summary for the run's result."""
    task = federation.task
    timeout = federation.round_timeout
    directory = run_dir / ARTIFACTS_DIR / task
    draft = directory.with_name(f".{task}.draft")
    fp32_path = run_dir / EXPORTS_DIR / task / MODEL_FP32
    manifest = _export(grid, spec, model, adapter_dir, draft, fp32_path, result, audit, key)
    nodes = sorted(known_sites)
    checked, failed, accountants = _check(grid, draft, nodes, known_sites, timeout, audit, key)
    summary: dict[str, Any] = {
        "directory": str(directory),
        "int8_bytes": manifest.files[MODEL_INT8].bytes,
        "fp32_bytes": manifest.quantization.fp32_onnx_bytes,
        "check_failures": {f.site: f.reason for f in failed},
    }
    if not checked:
        _withhold(draft, task, audit)
        return {**summary, "status": "unchecked", "installed": [], "install_failures": {}}

    metrics = aggregate_checks(checked)
    privacy = result["site_privacy"]
    released = _sign_checked(
        task, manifest, metrics, privacy, accountants, draft, directory, audit, key
    )
    installed, not_installed = _install(grid, directory, nodes, known_sites, timeout, audit)
    logger.info(
        "%s artifact: accuracy fp32 %.3f, int8 %.3f; installed at %d of %d sites",
        task,
        metrics.fp32.accuracy,
        metrics.int8.accuracy,
        len(installed),
        len(nodes),
    )
    return {
        **summary,
        "status": "released",
        "manifest_sha256": released,
        "metrics": metrics.model_dump(),
        "installed": sorted(r.site for r in installed),
        "install_failures": {f.site: f.reason for f in not_installed},
    }


def _export(
    grid: Grid,
    spec: TaskSpec,
    model: PeftModel,
    adapter_dir: Path,
    draft: Path,
    fp32_path: Path,
    result: Mapping[str, Any],
    audit: CoordinatorAudit,
    key: Ed25519PrivateKey,
) -> Manifest:
    """Build the signed, unchecked artifact in ``draft`` and audit its export."""
    manifest, unchecked = build_artifact(
        spec,
        model,
        adapter_dir,
        draft,
        fp32_path,
        run=str(grid.run.run_id),
        provenance=result,
        key=key,
    )
    audit.record(
        "artifact-exported",
        manifest_sha256=manifest_sha256(unchecked),
        files={name: entry.model_dump() for name, entry in manifest.files.items()},
        fp32_onnx_bytes=manifest.quantization.fp32_onnx_bytes,
    )
    return manifest


def _check(
    grid: Grid,
    draft: Path,
    nodes: Sequence[int],
    known_sites: dict[int, str],
    timeout: float,
    audit: CoordinatorAudit,
    key: Ed25519PrivateKey,
) -> tuple[list[SiteReply], list[FailedReply], dict[str, str]]:
    """The federated check: each site verifies the draft and scores both models. Returns
    the sites' scores, the failures (each audited) and the accountant each site named."""
    verify_artifact(draft, key.public_key())  # what the sites receive is what was signed
    replies = _send(grid, nodes, ARTIFACT_CHECK, artifact_payload(draft), timeout)
    checked, failed = _collect(replies, nodes, known_sites, timeout, ArtifactCheckMetrics)
    accountants = _accountants(replies, {reply.node_id for reply in checked}, known_sites)
    for reply in checked:
        audit.record("artifact-checked", site=reply.site, status="checked", metrics=reply.metrics)
    _audit_failures(audit, "artifact-checked", failed)
    return checked, failed, accountants


def _withhold(draft: Path, task: str, audit: CoordinatorAudit) -> None:
    """No site checked the artifact: audit that it is withheld and delete the draft."""
    audit.record("artifact-withheld", reason="no site could check the artifact")
    shutil.rmtree(draft, ignore_errors=True)  # a signed but unchecked model ships nowhere
    logger.warning("%s: no site checked the artifact; it is not released", task)


def _sign_checked(
    task: str,
    manifest: Manifest,
    metrics: CheckedMetrics,
    privacy: Mapping[str, Mapping[str, Any]],
    accountants: Mapping[str, str],
    draft: Path,
    directory: Path,
    audit: CoordinatorAudit,
    key: Ed25519PrivateKey,
) -> str:
    """Audit the check's results, then sign the final manifest (carrying them, each site's
    privacy with its ``accountants``, and that audit entry's head) and move the draft into
    ``directory``; returns the final manifest's hash."""
    done = audit.record(
        "artifact-check-done",
        fp32=metrics.fp32.model_dump(),
        int8=metrics.int8.model_dump(),
        sites=metrics.sites,
    )
    final = manifest.model_copy(
        update={
            "metrics": metrics,
            "sites": site_privacy(privacy, accountants),
            "audit": AuditHead(log=coordinator_log_name(task), seq=done["seq"], hash=done["hash"]),
        }
    )
    released = manifest_sha256(
        sign_manifest(draft, Manifest.model_validate(final.model_dump()), key)
    )
    shutil.rmtree(directory, ignore_errors=True)
    draft.replace(directory)
    audit.record("artifact-signed", manifest_sha256=released, audit_seq=done["seq"])
    return released


def _install(
    grid: Grid,
    directory: Path,
    nodes: Sequence[int],
    known_sites: dict[int, str],
    timeout: float,
    audit: CoordinatorAudit,
) -> tuple[list[SiteReply], list[FailedReply]]:
    """Send the released artifact to every site to install; each outcome is audited."""
    replies = _send(grid, nodes, ARTIFACT_INSTALL, artifact_payload(directory), timeout)
    installed, not_installed = _collect(replies, nodes, known_sites, timeout, InstallMetrics)
    for reply in installed:
        audit.record("artifact-installed", site=reply.site, status="installed")
    _audit_failures(audit, "artifact-installed", not_installed)
    return installed, not_installed


def _audit_failures(audit: CoordinatorAudit, event: str, failures: list[FailedReply]) -> None:
    """Audit each site that failed a step (``event``), with its status and reason."""
    for failure in failures:
        audit.record(event, site=failure.site, status=failure.status, reason=failure.reason)


def _accountants(
    replies: Sequence[Message], accepted: set[int], known_sites: dict[int, str]
) -> dict[str, str]:
    """The accountant each site that passed the check named (only known names)."""
    found: dict[str, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in accepted or node not in known_sites:
            continue
        details = reply.content.config_records.get("site") or ConfigRecord()
        accountant = details.get("accountant")
        if isinstance(accountant, str) and accountant in get_args(AccountantName):
            found[known_sites[node]] = accountant
    return found


def _names(value: str | list[str] | set[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
