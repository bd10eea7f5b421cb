"""Scoring a classifier: AUC against a brute-force reference, accuracy and loss by hand,
softmax's stability, and batched onnxruntime inference on a real exported model."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime
import pytest

from common.artifact import MODEL_INT8
from common.errors import ArtifactError
from common.inference import OnnxClassifier, binary_auc, classification_metrics, softmax
from tests.artifacts import BuiltArtifact, build_test_artifact

TABULAR = "tabular-classification"


def _pairwise_auc(scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_]) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    wins = 0.0
    pairs = 0
    for p, n in itertools.product(scores[positive], scores[~positive]):
        wins += 1.0 if p > n else 0.5 if p == n else 0.0
        pairs += 1
    return wins / pairs


# ----------------------------------------------------------------- binary_auc ---


@pytest.mark.parametrize("seed", range(8))
def test_binary_auc_matches_pairwise_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(5, 60))
    scores = rng.integers(0, 6, rows) / 5.0  # few distinct values: many ties
    positive = rng.random(rows) < 0.4
    positive[0], positive[1] = True, False  # both classes present
    assert len(np.unique(scores)) < rows
    assert binary_auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_binary_auc_matches_reference_on_continuous_scores(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    scores = rng.normal(size=80)
    positive = rng.random(80) < 0.5
    positive[:2] = [True, False]
    assert binary_auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive), abs=1e-12)


def test_binary_auc_known_values() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    positive = np.array([False, False, True, True])
    assert binary_auc(scores, positive) == pytest.approx(0.75)  # sklearn's doc example
    assert binary_auc(np.array([0.0, 1.0]), np.array([False, True])) == 1.0
    assert binary_auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert binary_auc(np.full(6, 0.3), np.array([True, False] * 3)) == 0.5


def test_binary_auc_is_order_independent() -> None:
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, 40).astype(float)
    positive = rng.random(40) < 0.5
    positive[:2] = [True, False]
    order = rng.permutation(40)
    assert binary_auc(scores[order], positive[order]) == pytest.approx(binary_auc(scores, positive))


@pytest.mark.parametrize("value", [True, False])
def test_binary_auc_is_none_with_one_class(value: bool) -> None:
    scores = np.array([0.2, 0.5, 0.9])
    assert binary_auc(scores, np.full(3, value)) is None


# ----------------------------------------------------- classification_metrics ---


def test_binary_metrics_by_hand() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    labels = np.array([0, 0, 1, 1])
    metrics = classification_metrics(logits, labels)
    # argmax [0, 1, 0 (tie → first), 1] against [0, 0, 1, 1]
    assert metrics["accuracy"] == pytest.approx(0.5)
    picked = [
        math.exp(2) / (math.exp(2) + 1),
        1 / (1 + math.e),
        0.5,
        math.exp(3) / (1 + math.exp(3)),
    ]
    assert metrics["loss"] == pytest.approx(-sum(math.log(p) for p in picked) / 4)
    # P(class 1) = [0.119, 0.731, 0.5, 0.953]; positives 0.5 and 0.953 against
    # negatives 0.119 and 0.731: 3 of 4 pairs won.
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["examples"] == 4


def test_loss_is_clipped_for_certain_wrong_predictions() -> None:
    logits = np.array([[1000.0, -1000.0]])
    metrics = classification_metrics(logits, np.array([1]))
    assert metrics["accuracy"] == 0.0
    assert metrics["loss"] == pytest.approx(-math.log(1e-12))
    assert math.isfinite(metrics["loss"])  # type: ignore[arg-type]


def test_three_class_metrics_use_macro_one_vs_rest_auc() -> None:
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(30, 3))
    labels = rng.integers(0, 3, 30)
    labels[:3] = [0, 1, 2]
    metrics = classification_metrics(logits, labels)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    per_class = [_pairwise_auc(probabilities[:, c], labels == c) for c in range(3)]
    assert metrics["auc"] == pytest.approx(float(np.mean(per_class)))
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    expected_loss = -np.log(probabilities[np.arange(30), labels]).mean()
    assert metrics["loss"] == pytest.approx(float(expected_loss))
    assert metrics["examples"] == 30


def test_three_class_auc_skips_an_absent_class() -> None:
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    labels = np.array([0, 1, 0, 1])  # class 2 never occurs
    metrics = classification_metrics(logits, labels)
    probabilities = softmax(logits)
    expected = np.mean([_pairwise_auc(probabilities[:, c], labels == c) for c in (0, 1)])
    assert metrics["auc"] == pytest.approx(float(expected))


def test_single_class_binary_metrics_have_no_auc() -> None:
    metrics = classification_metrics(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1, 1]))
    assert metrics["auc"] is None
    assert metrics["accuracy"] == 0.5


def test_empty_metrics() -> None:
    metrics = classification_metrics(np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
    assert metrics == {"accuracy": 0.0, "loss": 0.0, "auc": None, "examples": 0}


# -------------------------------------------------------------------- softmax ---


def test_softmax_rows_sum_to_one() -> None:
    logits = np.random.default_rng(2).normal(scale=5, size=(50, 4)).astype(np.float32)
    probabilities = softmax(logits)
    assert probabilities.dtype == np.float64
    assert probabilities.shape == (50, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    assert (probabilities >= 0).all()
    np.testing.assert_array_equal(probabilities.argmax(axis=1), logits.argmax(axis=1))


def test_softmax_is_stable_for_large_logits() -> None:
    logits = np.array([[1000.0, 1001.0], [-1000.0, -1001.0], [1e30, 0.0]])
    probabilities = softmax(logits)
    assert np.isfinite(probabilities).all()
    expected = 1 / (1 + math.e)
    np.testing.assert_allclose(probabilities[0], [expected, 1 - expected])
    np.testing.assert_allclose(probabilities[1], [1 - expected, expected])
    np.testing.assert_allclose(probabilities[2], [1.0, 0.0])


def test_softmax_is_shift_invariant() -> None:
    logits = np.array([[0.5, -1.0, 2.0]])
    np.testing.assert_allclose(softmax(logits + 700.0), softmax(logits), atol=1e-12)
    e = np.exp([0.5, -1.0, 2.0])
    np.testing.assert_allclose(softmax(logits)[0], e / e.sum())


# -------------------------------------------------------------- OnnxClassifier ---


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, site_workspace: Path) -> BuiltArtifact:
    root = tmp_path_factory.mktemp("inference-tabular")
    return build_test_artifact(root, TABULAR, site_workspace / "models" / TABULAR)


def _features(built: BuiltArtifact, rows: int, seed: int = 0) -> dict[str, npt.NDArray]:
    rng = np.random.default_rng(seed)
    features: dict[str, npt.NDArray] = {}
    for name, spec in built.manifest.inputs.items():
        shape = (rows, *(int(d) for d in spec.shape[1:]))
        if spec.dtype == "int64":
            features[name] = rng.integers(0, 2, size=shape).astype(np.int64)
        else:
            features[name] = rng.normal(size=shape).astype(np.float32)
    return features


@pytest.mark.slow
def test_onnx_classifier_batches_like_a_direct_run(built: BuiltArtifact) -> None:
    path = built.directory / MODEL_INT8
    classifier = OnnxClassifier(path, threads=1)
    assert classifier.input_names == list(built.manifest.inputs)
    features = _features(built, 37)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 5, 37, 256):
        found = classifier.logits(features, batch_size=batch_size)
        assert found.shape == (37, built.manifest.num_labels)
        assert found.dtype == np.float32
        # Exactly the direct runs over the same chunks, in order.
        expected = np.concatenate(
            [
                session.run(None, {k: v[start : start + batch_size] for k, v in features.items()})[
                    0
                ]
                for start in range(0, 37, batch_size)
            ]
        )
        np.testing.assert_array_equal(found, expected)


@pytest.mark.slow
def test_onnx_classifier_result_does_not_depend_on_batch_size(built: BuiltArtifact) -> None:
    features = _features(built, 37, seed=1)
    # fp32: the same up to float rounding.
    fp32 = OnnxClassifier(built.fp32)
    reference = fp32.logits(features)
    for batch_size in (1, 4, 10):
        np.testing.assert_allclose(
            fp32.logits(features, batch_size=batch_size), reference, atol=1e-5
        )
    # int8: activations are quantized per batch, so the batch changes the rounding a
    # little (measured up to ~0.11 on logits of size ~3), never the picture.
    int8 = OnnxClassifier(built.directory / MODEL_INT8)
    whole = int8.logits(features)
    for batch_size in (1, 4, 10):
        batched = int8.logits(features, batch_size=batch_size)
        assert batched.shape == whole.shape
        np.testing.assert_allclose(batched, whole, atol=0.3)
        assert (batched.argmax(1) == whole.argmax(1)).mean() >= 0.9
    np.testing.assert_allclose(whole, reference, atol=0.3)


@pytest.mark.slow
def test_onnx_classifier_refuses_missing_inputs(built: BuiltArtifact) -> None:
    classifier = OnnxClassifier(built.directory / MODEL_INT8)
    features = _features(built, 3)
    del features["categorical_ids"]
    with pytest.raises(ArtifactError) as caught:
        classifier.logits(features)
    assert caught.value.kind == "bad-input"
    assert "categorical_ids" in str(caught.value)


@pytest.mark.parametrize("content", [b"this is not an onnx model", b""], ids=["text", "empty"])
def test_onnx_classifier_refuses_a_file_that_is_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.int8.onnx"
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as caught:
        OnnxClassifier(path)
    assert caught.value.kind == "bad-model"
    assert "model.int8.onnx" in str(caught.value)


def test_onnx_classifier_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as caught:
        OnnxClassifier(tmp_path / "absent.onnx")
    assert caught.value.kind == "bad-model"
