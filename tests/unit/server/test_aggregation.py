"""FedAvg against a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from server.aggregation import fedavg

SHAPES = {"a.lora_A": (4, 8), "a.lora_B": (8, 4), "head.weight": (2, 8), "head.bias": (2,)}


def _updates(count: int, seed: int, dtype: type[np.floating] = np.float32) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
        for _ in range(count)
    ]


def _reference(updates: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    return {
        name: np.average(
            np.stack([u[name].astype(np.float64) for u in updates]), axis=0, weights=weights
        )
        for name in updates[0]
    }


def _assert_matches(got: dict, expected: dict, updates: list[dict]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == updates[0][name].dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "weights",
    [
        [1.0, 1.0, 1.0],
        [120.0, 30.0, 50.0],
        [0.0, 3.0, 1.0],
        [1e-3, 2e-3, 7e-3],
        [5, 17, 1],
    ],
)
def test_fedavg_matches_numpy_weighted_average(weights: list[float]) -> None:
    updates = _updates(3, seed=len(weights) + int(sum(weights)))
    _assert_matches(fedavg(updates, weights), _reference(updates, weights), updates)


@pytest.mark.parametrize("sites", [1, 2, 7, 25])
def test_fedavg_random_site_counts(sites: int) -> None:
    rng = np.random.default_rng(sites)
    updates = _updates(sites, seed=sites)
    weights = list(rng.integers(1, 1000, size=sites).astype(float))
    _assert_matches(fedavg(updates, weights), _reference(updates, weights), updates)


def test_equal_weights_give_the_plain_mean() -> None:
    updates = _updates(4, seed=1)
    got = fedavg(updates, [7.0] * 4)
    for name in SHAPES:
        expected = np.mean(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-7)


def test_zero_weight_update_is_ignored() -> None:
    updates = _updates(3, seed=2)
    poisoned = {name: np.full(shape, 1e6, np.float32) for name, shape in SHAPES.items()}
    got = fedavg([*updates, poisoned], [1.0, 2.0, 3.0, 0.0])
    _assert_matches(got, _reference(updates, [1.0, 2.0, 3.0]), updates)


def test_single_update_is_returned_unchanged() -> None:
    (update,) = _updates(1, seed=3)
    got = fedavg([update], [42.0])
    for name, value in update.items():
        np.testing.assert_array_equal(got[name], value)
    assert got["a.lora_A"] is not update["a.lora_A"]


def test_identical_updates_are_a_fixed_point() -> None:
    (update,) = _updates(1, seed=4)
    got = fedavg([update, update, update], [1.0, 5.0, 9.0])
    for name, value in update.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_dtype_is_preserved(dtype: type[np.floating]) -> None:
    updates = _updates(3, seed=5, dtype=dtype)
    got = fedavg(updates, [1.0, 2.0, 3.0])
    assert all(got[name].dtype == np.dtype(dtype) for name in SHAPES)
    if dtype is not np.float16:
        _assert_matches(got, _reference(updates, [1.0, 2.0, 3.0]), updates)


def test_accumulates_in_float64() -> None:
    # float32 running sums would lose the small update next to the large ones.
    big = {"w": np.array([1e8], np.float32)}
    small = {"w": np.array([1.0], np.float32)}
    got = fedavg([big, small, {"w": np.array([-1e8], np.float32)}], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(got["w"], [1.0 / 3.0], rtol=1e-6)


def test_inputs_are_not_modified() -> None:
    updates = _updates(3, seed=6)
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    fedavg(updates, [1.0, 2.0, 3.0])
    for update, copy in zip(updates, copies, strict=True):
        for name in SHAPES:
            np.testing.assert_array_equal(update[name], copy[name])


def test_zero_dimensional_and_empty_tensors() -> None:
    updates = [
        {"s": np.array(1.0, np.float32), "e": np.zeros((0, 3), np.float32)},
        {"s": np.array(4.0, np.float32), "e": np.zeros((0, 3), np.float32)},
    ]
    got = fedavg(updates, [2.0, 1.0])
    assert got["s"].shape == ()
    assert float(got["s"]) == pytest.approx(2.0)
    assert got["e"].shape == (0, 3)


def test_empty_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="nothing to aggregate"):
        fedavg([], [])


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_one_weight_per_update(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="one weight per update"):
        fedavg(_updates(2, seed=7), weights)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 3.0], [2.0, -1.0], [-1.0, -1.0]])
def test_negative_or_zero_sum_weights_are_rejected(weights: list[float]) -> None:
    with pytest.raises(ValueError, match=r"non-negative|positive sum"):
        fedavg(_updates(2, seed=8), weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError):
        fedavg(_updates(2, seed=9), [bad, 1.0])
