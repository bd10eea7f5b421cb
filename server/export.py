"""The final model, made distributable: peft merge → ONNX (fp32) → onnxruntime int8.

Only linear layers (ONNX ``MatMul``/``Gemm``) are quantized, weights to int8 and
activations dynamically per batch; layer norms, softmax, GELU, embeddings and the
classifier head stay fp32 (the head is a few hundred weights whose rounding would cost
accuracy and save nothing).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from peft import PeftModel
from torch import nn

from common.artifact import ADAPTER_FILES, InputSpec, Quantization, file_entry
from common.errors import ArtifactError
from common.offline import quiet_onnxruntime

logger = logging.getLogger(__name__)

OPSET = 17
QUANTIZED_OPS = ("MatMul", "Gemm")
MODEL_FP32 = "model.fp32.onnx"


class _Logits(nn.Module):
    """The model with named inputs in and bare logits out: the ONNX graph's interface."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(**dict(zip(self.input_names, inputs, strict=True))).logits
        return logits


@dataclass(frozen=True)
class ExportedModel:
    fp32: Path
    int8: Path
    inputs: dict[str, InputSpec]
    quantization: Quantization


def merged_copy(model: PeftModel) -> nn.Module:
    """The base model with the adapter folded into its weights (the peft model is kept)."""
    merged: nn.Module = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    return merged


def export_onnx(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    path: Path,
    opset: int = OPSET,
    sequence_inputs: Sequence[str] = (),
) -> None:
    """Trace ``model`` to ONNX with a free batch axis on every input and the logits, and
    a free length axis on ``sequence_inputs`` (token ids: any text length runs)."""
    names = list(example)
    dynamic: dict[str, dict[int, str]] = {name: {0: "batch"} for name in [*names, "logits"]}
    for name in sequence_inputs:
        dynamic[name][1] = "sequence"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation notices, not problems
        torch.onnx.export(
            _Logits(model, names),
            tuple(example.values()),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )


class _QuantizerChatter(logging.Filter):
    """onnxruntime's quantizer reports every tensor it skips on the root logger at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "onnxruntime" not in record.pathname


def quantize_int8(fp32: Path, int8: Path, fp32_modules: Sequence[str]) -> list[str]:
    """Dynamic int8 quantization of the linear layers, except those of ``fp32_modules``
    (the task's head); returns the nodes kept fp32."""
    graph = onnx.load(str(fp32), load_external_data=False).graph
    kept = sorted(
        node.name
        for node in graph.node
        if node.op_type in QUANTIZED_OPS and any(f"/{m}/" in node.name for m in fp32_modules)
    )
    if fp32_modules and not kept:
        raise ArtifactError(
            "export-failed", f"no linear layer of {list(fp32_modules)} found in the ONNX graph"
        )
    # Imported here, after the switch: a process whose first fedlora import is this
    # module would otherwise load onnxruntime with its telemetry on.
    quiet_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    chatter = _QuantizerChatter()
    root = logging.getLogger()
    root.addFilter(chatter)  # only records logged on the root logger itself pass here
    try:
        with tempfile.TemporaryDirectory() as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            # Shape inference and constant folding first, as onnxruntime recommends.
            # auto_merge lets the symbolic pass equate the token count of a mixture of
            # experts' routing with batch x sequence, which it cannot prove.
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False, auto_merge=True)
            quantize_dynamic(
                str(prepared),
                str(int8),
                weight_type=QuantType.QInt8,
                # 7-bit weights: onnxruntime's u8s8 kernel on x86 CPUs without VNNI
                # (AVX2 only) sums pairs of products in int16 and saturates with full
                # 8-bit weights (its quantization docs say to reduce the range there).
                # A site may run the artifact on any CPU, so it is built for all.
                reduce_range=True,
                op_types_to_quantize=list(QUANTIZED_OPS),
                # The quantizer first rewrites a Gemm into "<name>_MatMul" + "<name>_Add"
                # and only then applies exclusions, so both names are needed.
                nodes_to_exclude=[*kept, *(f"{name}_MatMul" for name in kept)],
            )
    finally:
        root.removeFilter(chatter)
    quantized = {
        node.name
        for node in onnx.load(str(int8), load_external_data=False).graph.node
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QGemm")
    }
    leaked = sorted(n for n in quantized if any(n.startswith(k) for k in kept))
    if leaked:
        raise ArtifactError("export-failed", f"layers meant to stay fp32 were quantized: {leaked}")
    return kept


def export_model(
    model: PeftModel,
    example: dict[str, torch.Tensor],
    fp32: Path,
    int8: Path,
    fp32_modules: Sequence[str] = ("classifier",),
    sequence_inputs: Sequence[str] = (),
    prepare: Callable[[nn.Module], None] | None = None,
) -> ExportedModel:
    """Merge, export to ``fp32`` and quantize that to ``int8``. ``prepare`` switches the
    merged copy to kernels the exporter can trace (the task's ``prepare_export``)."""
    for path in (fp32, int8):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged = merged_copy(model)
        if prepare is not None:
            prepare(merged)
        export_onnx(merged, example, fp32, sequence_inputs=sequence_inputs)
        kept = quantize_int8(fp32, int8, fp32_modules)
    except ArtifactError:
        raise
    except Exception as exc:  # the exporter and quantizer raise many kinds
        raise ArtifactError("export-failed", f"exporting the model failed: {exc}") from exc
    entry = file_entry(fp32)
    inputs = {
        name: InputSpec(
            dtype="int64" if tensor.dtype == torch.int64 else "float32",
            shape=["batch", "sequence"]
            if name in sequence_inputs
            else ["batch", *tensor.shape[1:]],
        )
        for name, tensor in example.items()
    }
    quantization = Quantization(
        op_types=list(QUANTIZED_OPS),
        kept_fp32=kept,
        opset=OPSET,
        fp32_onnx_bytes=entry.bytes,
        fp32_onnx_sha256=entry.sha256,
    )
    logger.info(
        "exported the model: fp32 %d bytes, int8 %d bytes", entry.bytes, int8.stat().st_size
    )
    return ExportedModel(fp32=fp32, int8=int8, inputs=inputs, quantization=quantization)


def copy_adapter(adapter_dir: Path, directory: Path) -> None:
    """The adapter alone (peft's two files), for sites that already hold the base model."""
    for name in ADAPTER_FILES:
        source = adapter_dir / Path(name).name
        if not source.is_file():
            raise ArtifactError("missing-file", f"the saved adapter lacks {source.name}")
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
