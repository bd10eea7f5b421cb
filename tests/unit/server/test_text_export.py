"""Export of the text task: each architecture merges, traces to ONNX with free batch and
length axes (DeepSeek-V3's experts included), quantizes to int8 with its head kept fp32,
and onnxruntime reproduces the torch model on texts of other lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.config import LoraSettings
from common.inference import OnnxClassifier
from common.tasks.text import ARCHITECTURES, TEXT_TASK
from server.export import export_model
from tests.unit.common.test_text_task import save_tiny


def _trained_like(model: torch.nn.Module) -> None:
    """Non-zero LoRA B and head, as after training, so the merge changes the weights."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "score" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_export_reproduces_the_model_at_any_length(
    tmp_path: Path, architecture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    working = tmp_path / "working-directory"
    working.mkdir()
    monkeypatch.chdir(working)  # the exporter and quantizer must leave nothing here
    base = TEXT_TASK.load_base_model(save_tiny(tmp_path / "base", architecture))
    model = TEXT_TASK.wrap_with_lora(base, LoraSettings(r=4))
    _trained_like(model)
    model.eval()
    exported = export_model(
        model,
        TEXT_TASK.example_inputs(model.config),
        tmp_path / "model.fp32.onnx",
        tmp_path / "model.int8.onnx",
        TEXT_TASK.head_modules,
        sequence_inputs=TEXT_TASK.sequence_inputs,
        prepare=TEXT_TASK.prepare_export,
    )
    assert exported.inputs["input_ids"].shape == ["batch", "sequence"]
    assert exported.quantization.kept_fp32 and all(
        "/score/" in node for node in exported.quantization.kept_fp32
    )
    quantized = [
        node
        for node in onnx.load(str(exported.int8)).graph.node
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
    ]
    assert quantized, "no linear layer was quantized"
    assert not list(working.iterdir())

    generator = torch.Generator().manual_seed(2)
    for length in (5, 23):  # neither is the traced length (8)
        ids = torch.randint(2, 40, (3, length), generator=generator)
        ids[1, length - 2 :] = 0  # a right-padded text
        mask = (ids != 0).long()
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
        features = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        fp32 = OnnxClassifier(exported.fp32).logits(features)
        np.testing.assert_allclose(fp32, expected, atol=1e-4)
        int8 = OnnxClassifier(exported.int8).logits(features)
        assert np.abs(int8 - expected).max() < 0.1
