"""A site's side of the artifact: verify it, check it on held-out data, install it.

Nothing from a received artifact is used before its signature (by the coordinator key
the site pinned in its config) and every file hash have been checked, and before its
base model hash matches the site's own base model. Every outcome is audited.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from client.predict import PREPROCESSING_FILE
from client.preflight import cohort_problem
from client.site import Site
from client.training import DPTrainer
from common.artifact import (
    ADAPTER_DIR,
    MODEL_INT8,
    VerifiedArtifact,
    install,
    verify_artifact,
    write_payload,
)
from common.errors import ArtifactError, PolicyError
from common.inference import OnnxClassifier, classification_metrics
from common.signing import load_public_key

logger = logging.getLogger(__name__)

_STAGING = ".incoming"


@dataclass(frozen=True)
class ArtifactCheck:
    fp32: dict[str, float | int | None]
    int8: dict[str, float | int | None]
    manifest_sha256: str

    def metrics(self) -> dict[str, float | int]:
        """The reply's metrics: 'num-examples', then '<model>-<metric>' (AUC left out
        when the held-out data has a single class)."""
        metrics: dict[str, float | int] = {"num-examples": int(self.fp32["examples"] or 0)}
        for model, scores in (("fp32", self.fp32), ("int8", self.int8)):
            for name in ("accuracy", "loss", "auc"):
                value = scores[name]
                if value is not None:
                    metrics[f"{model}-{name}"] = float(value)
        return metrics


@contextmanager
def _staged(
    site: Site, payload: Mapping[str, object] | None, stage: str, run: str
) -> Iterator[VerifiedArtifact]:
    """The received artifact written to a private folder and verified; the folder is
    removed afterwards unless the caller moved it. Every refusal or failure, during
    verification or in the caller's block, is audited (any other failure than a refusal
    only by its type: a configuration or I/O message may name local paths)."""
    root = site.config.site.installed_artifacts
    folder = root / _STAGING / f"{site.task.name}-{secrets.token_hex(4)}"
    try:
        if payload is None:
            raise ArtifactError("bad-payload", "the message carries no artifact")
        (root / _STAGING).mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.mkdir(mode=0o700)
        write_payload(payload, folder)
        yield verify_for_site(site, folder, run)
    except (ArtifactError, PolicyError) as exc:
        check = exc.kind if isinstance(exc, ArtifactError) else "policy"
        site.audit.record("artifact-refused", run=run, stage=stage, check=check, reason=str(exc))
        raise
    except Exception as exc:
        site.audit.record("artifact-failed", run=run, stage=stage, error=type(exc).__name__)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify_for_site(site: Site, folder: Path, run: str) -> VerifiedArtifact:
    """Signature by the pinned coordinator key, file hashes, then the site's own rules:
    its task (and policy), its base model, and the run that sent it (an old artifact
    replayed by another run is refused)."""
    key_path = site.config.site.coordinator_key
    if key_path is None:
        raise ArtifactError(
            "no-trusted-key",
            f"site {site.site_id} has no site.coordinator_key: it cannot tell who signed the "
            "artifact, so it refuses it",
        )
    verified = verify_artifact(folder, load_public_key(key_path))
    manifest = verified.manifest
    allowed = site.config.policy.allowed_tasks
    if manifest.task != site.task.name or (allowed is not None and manifest.task not in allowed):
        raise ArtifactError(
            "wrong-task",
            f"the artifact is for task {manifest.task}, which this site does not serve",
        )
    if manifest.base_model_sha256 != site.models.fingerprint():
        raise ArtifactError(
            "wrong-base-model",
            "the artifact was built on another base model than the one this site holds",
        )
    if manifest.run != run:
        raise ArtifactError(
            "wrong-run", f"the artifact is from run {manifest.run}, not the run that sent it"
        )
    return verified


def check_artifact(site: Site, payload: Mapping[str, object] | None, run: str) -> ArtifactCheck:
    """Verify, then score the fp32 model (base + the artifact's adapter) and the int8
    model on the site's held-out data. Nothing is installed."""
    with _staged(site, payload, "check", run) as verified:
        data = site.load_data()
        problem = cohort_problem(site.config, data.holdout.persons, purpose="report metrics")
        if problem is not None:
            raise problem
        holdout = data.holdout
        base = site.task.load_base_model(site.config.site.base_model)
        model = PeftModel.from_pretrained(base, str(verified.directory / ADAPTER_DIR))
        fp32_logits = torch.cat(DPTrainer(model, site.task.input_names).logits(holdout)).numpy()
        int8_logits = OnnxClassifier(verified.directory / MODEL_INT8).logits(
            {n: holdout.features[n] for n in site.task.input_names}
        )
        fp32 = classification_metrics(fp32_logits, holdout.labels)
        int8 = classification_metrics(int8_logits, holdout.labels)
        agreement = float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1)))
    site.audit.record(
        "artifact-checked",
        run=run,
        manifest_sha256=verified.manifest_sha256,
        signer=verified.manifest.signer,
        fp32=fp32,
        int8=int8,
        agreement=agreement,
    )
    logger.info(
        "site %s checked the %s artifact: accuracy fp32 %.3f, int8 %.3f on %d records",
        site.site_id,
        site.task.name,
        fp32["accuracy"],
        int8["accuracy"],
        fp32["examples"],
    )
    return ArtifactCheck(fp32=fp32, int8=int8, manifest_sha256=verified.manifest_sha256)


def install_artifact(site: Site, payload: Mapping[str, object] | None, run: str) -> Path:
    """Verify the checked artifact and make it the site's model for its task, with the
    site's own cleaning beside it (for ``fedlora artifact predict``)."""
    with _staged(site, payload, "install", run) as verified:
        if verified.manifest.metrics is None:
            raise ArtifactError(
                "unchecked", "the artifact carries no federated check results; not installing it"
            )
        preprocessing = json.dumps(site.preprocessing(), indent=2)
        (verified.directory / PREPROCESSING_FILE).write_text(preprocessing)
        target = site.config.site.installed_artifacts / site.task.name
        install(verified.directory, target)
    site.audit.record(
        "artifact-installed",
        run=run,
        manifest_sha256=verified.manifest_sha256,
        signer=verified.manifest.signer,
        model_sha256=verified.manifest.files[MODEL_INT8].sha256,
        preprocessing_sha256=hashlib.sha256(preprocessing.encode()).hexdigest(),
    )
    logger.info("site %s installed the %s artifact", site.site_id, site.task.name)
    return target
