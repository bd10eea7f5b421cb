"""What a site sends each round: the adapter update's bytes against the full model's.

For each task's base model of the default scenario, and for a ViT-B/16-sized model
(``ViTConfig()``: 224 px, 16 px patches, width 768, 12 layers; built, not trained), the
update is produced the way a site produces it (``client.site.outgoing_adapter``) and
serialised into the Flower ``ArrayRecord`` that carries it; its bytes are summed from
the serialised arrays. The full model is every parameter and buffer in float32, what a
system that ships whole models would send.

Each row is measured for the run's default update precision (float16) and for float32,
and for FFA-LoRA (A frozen: only B travels). Target: ViT-B/16 at r=16 on q and v,
default settings, ≤ 0.5%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, ViTForImageClassification

from benchmarks.fixtures import Template, vit_b16_config
from benchmarks.measure import verdict
from client.site import outgoing_adapter
from common.adapters import arrays_to_record
from common.config import FederationConfig, LoraSettings
from common.protocol import RoundRequest
from common.tasks import TASKS
from server.run import full_model_bytes
from server.validation import record_payload_bytes

TARGET = 0.005
VIT_B16 = "vit-b16"
PRECISIONS = ("float16", "float32")


def update_bytes(model: torch.nn.Module, request: RoundRequest) -> int:
    """Bytes of the serialised update a site sends for ``request``."""
    return record_payload_bytes(arrays_to_record(outgoing_adapter(model, request)))  # type: ignore[arg-type]


def measure_model(task: str, base: PreTrainedModel, lora: LoraSettings) -> dict[str, Any]:
    spec = TASKS.get(task)
    full = full_model_bytes(base)
    model = spec.wrap_with_lora(base, lora)
    federation = FederationConfig(task=task, base_model=Path("."), lora=lora)
    rows: dict[str, Any] = {"full_model_bytes": full}
    for precision in PRECISIONS:
        for ffa in (False, True):
            request = RoundRequest.for_round(
                federation, "0" * 64, 1, spec.default_lora_targets, freeze_lora_a=ffa
            )
            request = request.model_copy(update={"update_dtype": precision})
            sent = update_bytes(model, request)
            key = f"{precision}{'-ffa' if ffa else ''}"
            rows[key] = {"update_bytes": sent, "ratio": sent / full}
    rows["ratio"] = rows["float16"]["ratio"]  # the default: fedavg, float16 updates
    rows["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return rows


def run(template: Template) -> dict[str, Any]:
    figures: dict[str, Any] = {"target": TARGET, "models": {}}
    models_dir = template.data_dir / "models"
    for task in template.document["tasks"]:
        spec = TASKS.get(task)
        base = spec.load_base_model(models_dir / task)
        figures["models"][task] = measure_model(task, base, LoraSettings())
    vit = ViTForImageClassification(vit_b16_config())
    figures["models"][VIT_B16] = measure_model("dicom-classification", vit, LoraSettings(r=16))
    figures["vit_b16_ratio"] = figures["models"][VIT_B16]["ratio"]
    figures["meets_targets"] = bool(verdict(figures["vit_b16_ratio"], TARGET))
    return figures


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    lines: list[tuple[str, str, str, bool | None]] = []
    for name, model in figures["models"].items():
        f16, f32, ffa = model["float16"], model["float32"], model["float16-ffa"]
        target = "≤ 0.5%" if name == VIT_B16 else ""
        met = figures["meets_targets"] if name == VIT_B16 else None
        lines.append(
            (
                f"{name} update / full model",
                f"{100 * f16['ratio']:.3f}% ({f16['update_bytes'] / 1e6:.2f} of "
                f"{model['full_model_bytes'] / 1e6:.1f} MB; float32 {100 * f32['ratio']:.3f}%, "
                f"FFA {100 * ffa['ratio']:.3f}%)",
                target,
                met,
            )
        )
    return lines
