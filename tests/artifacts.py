"""A signed artifact built the way the coordinator builds one (peft model, real ONNX
export, real onnxruntime int8, real Ed25519 signature), with no Flower and no training.

The adapter is the LoRA initialisation with B nudged away from zero, so the merged model
differs from the base. ``checked=True`` adds federated-check metrics and re-signs, as
``release_artifact`` does once the sites have scored the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.artifact import CheckedMetrics, Manifest, Metrics, sign_manifest
from common.config import LoraSettings
from common.signing import write_public_key
from common.tasks import TASKS, model_fingerprint
from server.distribution import build_artifact


@dataclass(frozen=True)
class BuiltArtifact:
    directory: Path
    manifest: Manifest
    key: Ed25519PrivateKey
    public_key: Path
    fp32: Path


def build_test_artifact(
    tmp_path: Path,
    task: str,
    base_model: Path,
    *,
    checked: bool = True,
    key: Ed25519PrivateKey | None = None,
    run: str = "77",
) -> BuiltArtifact:
    spec = TASKS.get(task)
    key = key or Ed25519PrivateKey.generate()
    public_key = tmp_path / "coordinator.pub"
    if not public_key.exists():
        write_public_key(public_key, key.public_key())
    torch.manual_seed(0)
    model = spec.wrap_with_lora(spec.load_base_model(base_model), LoraSettings())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    adapter_dir = tmp_path / "adapter-saved"
    model.save_pretrained(str(adapter_dir))
    provenance = {
        "base_model_sha256": model_fingerprint(base_model),
        "aggregator": "fedavg",
        "rounds_planned": 2,
        "rounds_completed": 2,
        "final_adapter_round": 2,
        "final_accuracy": 0.9,
        "site_privacy": {
            "site-a": {"epsilon": 3.5, "delta": 1e-5, "rounds_trained": 2},
            "site-b": {"epsilon": 4.0, "delta": 1e-5, "rounds_trained": 2},
        },
    }
    directory = tmp_path / "artifact"
    fp32 = tmp_path / "exports" / "model.fp32.onnx"
    manifest, _ = build_artifact(
        spec, model, adapter_dir, directory, fp32, run=run, provenance=provenance, key=key
    )
    if checked:
        scores = Metrics(accuracy=0.9, loss=0.3, auc=0.95, examples=120)
        manifest = manifest.model_copy(
            update={"metrics": CheckedMetrics(fp32=scores, int8=scores, sites=["site-a"])}
        )
        manifest = Manifest.model_validate(manifest.model_dump())
        sign_manifest(directory, manifest, key)
    return BuiltArtifact(directory, manifest, key, public_key, fp32)
