"""Running a classifier and scoring it: onnxruntime sessions and pure-numpy metrics.

The same functions score the torch model and the int8 ONNX model at a site, in the
benchmark and in ``fedlora artifact predict``, so the fp32/int8 comparison is like for
like.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime

from common.errors import ArtifactError
from common.offline import quiet_onnxruntime

Features = Mapping[str, npt.NDArray[np.generic]]


class OnnxClassifier:
    """An ONNX classifier on onnxruntime's CPU provider, run in batches."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        quiet_onnxruntime()
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: no node-placement chatter
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            # Its message names the file's full path: keep that out of the reason.
            raise ArtifactError(
                "bad-model", f"{path.name} is not a model onnxruntime can load"
            ) from exc
        self.input_names = [node.name for node in self.session.get_inputs()]

    def logits(self, features: Features, batch_size: int = 256) -> npt.NDArray[np.float32]:
        missing = [name for name in self.input_names if name not in features]
        if missing:
            raise ArtifactError("bad-input", f"the model needs inputs {missing}")
        rows = len(next(iter(features[name] for name in self.input_names)))
        outputs = []
        for start in range(0, rows, batch_size):
            batch = {
                name: np.ascontiguousarray(features[name][start : start + batch_size])
                for name in self.input_names
            }
            outputs.append(self.session.run(None, batch)[0])
        if not outputs:
            classes = self.session.get_outputs()[0].shape[-1]
            return np.zeros((0, classes if isinstance(classes, int) else 0), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32)


def softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def binary_auc(scores: npt.NDArray[np.floating], positive: npt.NDArray[np.bool_]) -> float | None:
    """ROC AUC as the Mann-Whitney statistic (ties count half); None with one class."""
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def classification_metrics(
    logits: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]
) -> dict[str, float | int | None]:
    """Accuracy, mean cross-entropy and ROC AUC (macro one-vs-rest beyond two classes)."""
    examples = len(labels)
    if examples == 0:
        return {"accuracy": 0.0, "loss": 0.0, "auc": None, "examples": 0}
    probabilities = softmax(logits)
    picked = np.clip(probabilities[np.arange(examples), labels], 1e-12, 1.0)
    classes = probabilities.shape[1]
    if classes == 2:
        auc = binary_auc(probabilities[:, 1], labels == 1)
    else:
        per_class = [binary_auc(probabilities[:, c], labels == c) for c in range(classes)]
        present = [value for value in per_class if value is not None]
        auc = float(np.mean(present)) if present else None
    return {
        "accuracy": float((logits.argmax(axis=1) == labels).mean()),
        "loss": float(-np.log(picked).mean()),
        "auc": auc,
        "examples": int(examples),
    }
