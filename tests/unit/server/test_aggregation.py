"""The aggregators against NumPy references, their robustness, and the LoRA product error."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest

from common.adapters import AdapterSchema, PackedAdapter, lora_pairs
from common.errors import RegistryError
from server.aggregation import (
    AGGREGATORS,
    Aggregate,
    Aggregator,
    AggregatorSpec,
    Arrays,
    coordinate_median,
    fedavg,
    lora_product_error,
    symmetric_trimmed_mean,
    trimmed_mean,
)

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype: type[np.floating]) -> None:
    updates = _updates(3, seed=5, dtype=dtype)
    got = fedavg(updates, [1.0, 2.0, 3.0])
    assert all(got[name].dtype == np.dtype(dtype) for name in SHAPES)
    _assert_matches(got, _reference(updates, [1.0, 2.0, 3.0]), updates)


def test_partial_sums_are_folded_into_float64() -> None:
    # A float32 running sum over all sites would lose the small update next to the large
    # ones; folding after every update (partial sums of one) keeps it.
    big = {"w": np.array([1e8], np.float32)}
    small = {"w": np.array([1.0], np.float32)}
    updates = [big, small, {"w": np.array([-1e8], np.float32)}]
    got = fedavg(updates, [1.0, 1.0, 1.0], partial_sum_updates=1)
    np.testing.assert_allclose(got["w"], [1.0 / 3.0], rtol=1e-6)
    # Within one float32 partial sum it is lost: the documented cost of the speed.
    assert fedavg(updates, [1.0, 1.0, 1.0], partial_sum_updates=32)["w"][0] == 0.0


def test_many_updates_agree_with_float64_to_float32_precision() -> None:
    updates = _updates(200, seed=9)
    weights = list(np.random.default_rng(9).integers(1, 5000, size=200).astype(float))
    got = fedavg(updates, weights)
    expected = _reference(updates, weights)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-5, atol=1e-6)


def test_fedavg_streams_a_generator_once() -> None:
    updates = _updates(5, seed=10)
    consumed = []

    def stream():
        for update in updates:
            consumed.append(1)
            yield update

    got = fedavg(stream(), iter([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert len(consumed) == 5
    _assert_matches(got, _reference(updates, [1.0, 2.0, 3.0, 4.0, 5.0]), updates)


def test_packed_updates_give_the_same_mean_as_plain_ones() -> None:
    updates = _updates(4, seed=11)
    schema = AdapterSchema.of(updates[0])
    packed = [schema.pack(update) for update in updates]
    assert all(isinstance(update, PackedAdapter) for update in packed)
    weights = [1.0, 2.0, 3.0, 4.0]
    plain, fast = fedavg(updates, weights), fedavg(packed, weights)
    for name in SHAPES:
        np.testing.assert_array_equal(plain[name], fast[name])


@pytest.mark.parametrize(
    "aggregate", [fedavg, coordinate_median, partial(trimmed_mean, trim_fraction=0.2)]
)
def test_float16_updates_aggregate_into_float32(aggregate) -> None:
    """Sites may send float16 to halve the traffic; the aggregate keeps full precision."""
    updates = _updates(5, seed=12, dtype=np.float16)
    got = aggregate(updates, [1.0, 1.0, 2.0, 1.0, 3.0])
    assert all(got[name].dtype == np.float32 for name in SHAPES)


def test_float16_fedavg_is_the_float64_mean_to_float32_precision() -> None:
    updates = _updates(3, seed=12, dtype=np.float16)
    got = fedavg([AdapterSchema.of(u).pack(u) for u in updates], [1.0, 1.0, 2.0])
    expected = _reference(updates, [1.0, 1.0, 2.0])
    for name in SHAPES:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)


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


# ------------------------------------------------------------ robust aggregators ---


def _hand_trimmed_mean(values: list[float], trim_fraction: float) -> float:
    """Trimmed mean of one coordinate, written out with Python's sorted() and a loop."""
    trim = int(trim_fraction * len(values))
    kept = sorted(values)[trim : len(values) - trim]
    total = 0.0
    for value in kept:
        total += value
    return total / len(kept)


def _hand_reference(
    updates: list[dict], statistic: Callable[[list[float]], float]
) -> dict[str, np.ndarray]:
    """Apply ``statistic`` to every coordinate separately (slow, obviously correct)."""
    result = {}
    for name, first in updates[0].items():
        out = np.empty(first.shape, np.float64)
        for index in np.ndindex(first.shape):
            out[index] = statistic([float(u[name][index]) for u in updates])
        result[name] = out
    return result


@pytest.mark.parametrize(
    ("sites", "trim_fraction"),
    [(5, 0.2), (5, 0.4), (7, 0.1), (7, 0.3), (10, 0.25), (11, 0.45), (3, 0.0), (20, 0.49)],
)
def test_symmetric_trimmed_mean_matches_a_hand_written_reference(
    sites: int, trim_fraction: float
) -> None:
    updates = _updates(sites, seed=100 + sites)
    got = symmetric_trimmed_mean(updates, [1.0] * sites, trim_fraction=trim_fraction)
    expected = _hand_reference(updates, lambda v: _hand_trimmed_mean(v, trim_fraction))
    _assert_matches(got, expected, updates)


@pytest.mark.parametrize(("sites", "trim_fraction"), [(5, 0.2), (9, 0.34), (12, 0.1), (4, 0.3)])
def test_symmetric_trimmed_mean_matches_scipy(sites: int, trim_fraction: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    updates = _updates(sites, seed=200 + sites)
    got = symmetric_trimmed_mean(updates, [1.0] * sites, trim_fraction=trim_fraction)
    expected = {
        name: stats.trim_mean(
            np.stack([u[name].astype(np.float64) for u in updates]), trim_fraction, axis=0
        )
        for name in SHAPES
    }
    _assert_matches(got, expected, updates)


@pytest.mark.parametrize("sites", [1, 2, 3, 4, 5, 8, 13])
def test_median_matches_numpy(sites: int) -> None:
    updates = _updates(sites, seed=300 + sites)
    got = coordinate_median(updates, [1.0] * sites)
    expected = {
        name: np.median(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
        for name in SHAPES
    }
    _assert_matches(got, expected, updates)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    updates = [{"w": np.array([value, -value], np.float32)} for value in (1.0, 10.0, 3.0, 7.0)]
    got = coordinate_median(updates, [1.0] * 4)
    np.testing.assert_array_equal(got["w"], np.array([5.0, -5.0], np.float32))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(3,), (4, 5), (2, 3, 4), ()])
def test_robust_aggregators_random_properties(seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    sites = int(rng.integers(3, 12))
    updates = [
        {"w": (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float64)}
        for _ in range(sites)
    ]
    weights = list(rng.uniform(0.5, 100, size=sites))
    stacked = np.stack([u["w"] for u in updates])
    lowest, highest = stacked.min(axis=0), stacked.max(axis=0)
    fraction = float(rng.uniform(0, 0.49))
    shift = float(rng.standard_normal())
    order = rng.permutation(sites)

    for aggregate in (partial(symmetric_trimmed_mean, trim_fraction=fraction), coordinate_median):
        got = aggregate(updates, weights)["w"]
        assert got.shape == shape
        # Inside the range of the sites' values, coordinate by coordinate.
        assert np.all(got >= lowest - 1e-12) and np.all(got <= highest + 1e-12)
        # The order of the sites does not matter.
        permuted = aggregate([updates[i] for i in order], [weights[i] for i in order])["w"]
        np.testing.assert_allclose(permuted, got, rtol=1e-12, atol=1e-12)
        # Equivariant to shifts and to a sign flip.
        shifted = aggregate([{"w": u["w"] + shift} for u in updates], weights)["w"]
        np.testing.assert_allclose(shifted, got + shift, rtol=1e-10, atol=1e-10)
        flipped = aggregate([{"w": -u["w"]} for u in updates], weights)["w"]
        np.testing.assert_allclose(flipped, -got, rtol=1e-12, atol=1e-12)

    # No trimming is the plain mean.
    np.testing.assert_allclose(
        symmetric_trimmed_mean(updates, weights, trim_fraction=0.0)["w"],
        stacked.mean(axis=0),
        rtol=1e-12,
    )
    # Trimming all but the middle one is the median (odd site counts).
    if sites % 2 == 1:
        most = (sites - 1) / 2 / sites + 1e-9
        np.testing.assert_allclose(
            symmetric_trimmed_mean(updates, weights, trim_fraction=most)["w"],
            np.median(stacked, axis=0),
            rtol=1e-12,
        )


@pytest.mark.parametrize(
    "aggregate",
    [
        fedavg,
        symmetric_trimmed_mean,
        partial(symmetric_trimmed_mean, trim_fraction=0.4),
        coordinate_median,
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_aggregator_preserves_dtype_and_shape(
    aggregate: Aggregator, dtype: type[np.floating]
) -> None:
    updates = _updates(5, seed=7, dtype=dtype)
    got = aggregate(updates, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert set(got) == set(SHAPES)
    for name, shape in SHAPES.items():
        assert got[name].dtype == np.dtype(dtype), name
        assert got[name].shape == shape, name


def test_robust_aggregators_keep_zero_dimensional_tensors() -> None:
    updates = [{"s": np.array(v, np.float32)} for v in (1.0, 2.0, 100.0, 3.0, 4.0)]
    median = coordinate_median(updates, [1.0] * 5)["s"]
    trimmed = symmetric_trimmed_mean(updates, [1.0] * 5, trim_fraction=0.2)["s"]
    assert median.shape == () and median.dtype == np.float32
    assert float(median) == 3.0
    assert float(trimmed) == pytest.approx(3.0)


def test_one_scaled_update_moves_fedavg_but_not_the_robust_aggregators() -> None:
    rng = np.random.default_rng(11)
    honest_centre = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    updates = [
        {
            name: (honest_centre[name] + 0.05 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in SHAPES.items()
        }
        for _ in range(5)
    ]
    updates[2] = {name: value * 1000 for name, value in updates[2].items()}
    honest = [u for i, u in enumerate(updates) if i != 2]
    honest_mean = {
        name: np.mean(np.stack([u[name].astype(np.float64) for u in honest]), axis=0)
        for name in SHAPES
    }
    weights = [1.0] * 5

    def distance(aggregate: Aggregate) -> float:
        return float(np.sqrt(sum(np.sum((aggregate[n] - honest_mean[n]) ** 2) for n in SHAPES)))

    scale = float(np.sqrt(sum(np.sum(v**2) for v in honest_mean.values())))
    assert distance(fedavg(updates, weights)) > 50 * scale
    assert distance(symmetric_trimmed_mean(updates, weights, trim_fraction=0.2)) < 0.1 * scale
    assert distance(coordinate_median(updates, weights)) < 0.1 * scale


@pytest.mark.parametrize("trim_fraction", [-0.01, -1.0, 0.5, 0.51, 1.0, float("nan")])
def test_trim_fraction_out_of_range_is_rejected(trim_fraction: float) -> None:
    with pytest.raises(ValueError, match=r"trim_fraction must lie in \[0, 0.5\)"):
        symmetric_trimmed_mean(_updates(5, seed=12), [1.0] * 5, trim_fraction=trim_fraction)


@pytest.mark.parametrize("sites", [1, 2, 3, 4])
def test_too_few_sites_to_trim_give_the_plain_mean(sites: int) -> None:
    # floor(0.2 * N) = 0 for N < 5: nothing is dropped.
    updates = _updates(sites, seed=13)
    got = symmetric_trimmed_mean(updates, list(np.arange(1.0, sites + 1)), trim_fraction=0.2)
    expected = {
        name: np.mean(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
        for name in SHAPES
    }
    _assert_matches(got, expected, updates)


def test_five_sites_at_twenty_percent_drop_one_at_each_end() -> None:
    updates = [{"w": np.array([v], np.float64)} for v in (0.0, 1.0, 2.0, 3.0, 1000.0)]
    got = symmetric_trimmed_mean(updates, [1.0] * 5, trim_fraction=0.2)
    assert got["w"][0] == pytest.approx(2.0)
    assert symmetric_trimmed_mean(updates, [1.0] * 5, trim_fraction=0.19)["w"][0] == pytest.approx(
        201.2
    )


@pytest.mark.parametrize("aggregate", [symmetric_trimmed_mean, coordinate_median])
def test_robust_aggregators_ignore_the_weights(aggregate: Aggregator) -> None:
    updates = _updates(6, seed=14)
    reference = aggregate(updates, [1.0] * 6)
    for weights in ([1e9, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0] * 6, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]):
        got = aggregate(updates, weights)
        for name in SHAPES:
            np.testing.assert_array_equal(got[name], reference[name])
    # ... whereas fedavg does not.
    heavy = fedavg(updates, [1e9, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert not np.allclose(heavy["a.lora_A"], fedavg(updates, [1.0] * 6)["a.lora_A"])


ALL_AGGREGATORS = [fedavg, symmetric_trimmed_mean, coordinate_median]


@pytest.mark.parametrize("aggregate", ALL_AGGREGATORS)
def test_every_aggregator_rejects_mismatched_names(aggregate: Aggregator) -> None:
    updates = _updates(3, seed=15)
    renamed = {("x.lora_A" if n == "a.lora_A" else n): v for n, v in updates[1].items()}
    with pytest.raises(ValueError, match="same tensors"):
        aggregate([updates[0], renamed, updates[2]], [1.0] * 3)
    missing = {n: v for n, v in updates[2].items() if n != "head.bias"}
    with pytest.raises(ValueError, match="same tensors"):
        aggregate([updates[0], updates[1], missing], [1.0] * 3)
    extra = {**updates[0], "extra": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="same tensors"):
        aggregate([updates[1], extra], [1.0] * 2)


@pytest.mark.parametrize("aggregate", ALL_AGGREGATORS)
def test_every_aggregator_rejects_empty_input_and_missing_weights(aggregate: Aggregator) -> None:
    with pytest.raises(ValueError, match="nothing to aggregate"):
        aggregate([], [])
    with pytest.raises(ValueError, match="one weight per update"):
        aggregate(_updates(3, seed=16), [1.0, 1.0])


@pytest.mark.parametrize("aggregate", [symmetric_trimmed_mean, coordinate_median])
def test_robust_aggregators_do_not_modify_their_inputs(aggregate: Aggregator) -> None:
    updates = _updates(5, seed=17)
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    aggregate(updates, [1.0] * 5)
    for update, copy in zip(updates, copies, strict=True):
        for name in SHAPES:
            np.testing.assert_array_equal(update[name], copy[name])


# --------------------------------------------------------------------- registry ---


def test_registry_names_and_ffa_flag() -> None:
    assert AGGREGATORS.names() == [
        "fedavg",
        "fedavg-ffa",
        "median",
        "trimmed-mean",
        "trimmed-mean-symmetric",
    ]
    assert AGGREGATORS.get("fedavg-ffa").freezes_lora_a is True
    for name in ("fedavg", "trimmed-mean", "median"):
        assert AGGREGATORS.get(name).freezes_lora_a is False, name
    for name in AGGREGATORS:
        assert isinstance(AGGREGATORS.get(name), AggregatorSpec)
        assert AGGREGATORS.get(name).summary, name


def test_unknown_aggregator_lists_the_known_ones() -> None:
    with pytest.raises(RegistryError, match=r"unknown aggregator 'krum'.*fedavg-ffa"):
        AGGREGATORS.get("krum")


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("fedavg", fedavg),
        ("fedavg-ffa", fedavg),
        ("median", coordinate_median),
    ],
)
def test_registered_aggregators_compute_what_they_name(name: str, reference: Aggregator) -> None:
    updates = _updates(5, seed=18)
    weights = [3.0, 1.0, 4.0, 1.0, 5.0]
    expected = reference(updates, weights)
    for trim_fraction in (0.0, 0.2, 0.4):
        got = AGGREGATORS.get(name).build(trim_fraction)(updates, weights)
        for key in SHAPES:
            np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize(
    ("name", "reference"),
    [("trimmed-mean", trimmed_mean), ("trimmed-mean-symmetric", symmetric_trimmed_mean)],
)
@pytest.mark.parametrize("trim_fraction", [0.0, 0.2, 0.4])
def test_registered_trimmed_means_use_the_runs_trim_fraction(
    name: str, reference: Callable[..., dict[str, np.ndarray]], trim_fraction: float
) -> None:
    updates = _updates(5, seed=19)
    got = AGGREGATORS.get(name).build(trim_fraction)(updates, [1.0] * 5)
    expected = reference(updates, [1.0] * 5, trim_fraction=trim_fraction)
    for key in SHAPES:
        np.testing.assert_array_equal(got[key], expected[key])
    others = [f for f in (0.0, 0.2, 0.4) if f != trim_fraction]
    for other in others:
        assert not np.allclose(
            got["a.lora_A"], reference(updates, [1.0] * 5, trim_fraction=other)["a.lora_A"]
        )


# ------------------------------------------------- trimmed mean around the median ---


def _hand_trimmed_around_median(values: list[float], trim_fraction: float) -> float:
    """Drop the ⌊β·N⌋ values farthest from the median (first-listed wins a tie)."""
    trim = math.floor(trim_fraction * len(values))
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    by_distance = sorted(range(len(values)), key=lambda i: (abs(values[i] - median), i))
    kept = [values[i] for i in by_distance[: len(values) - trim]]
    return sum(kept) / len(kept)


@pytest.mark.parametrize(
    ("sites", "trim_fraction"), [(1, 0.2), (4, 0.2), (5, 0.2), (7, 0.3), (10, 0.45), (9, 0.0)]
)
def test_trimmed_mean_matches_a_hand_written_reference(sites: int, trim_fraction: float) -> None:
    updates = _updates(sites, seed=40 + sites)
    got = trimmed_mean(updates, [1.0] * sites, trim_fraction=trim_fraction)
    expected = _hand_reference(updates, lambda v: _hand_trimmed_around_median(v, trim_fraction))
    for key in SHAPES:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_trimmed_mean_drops_the_outlier_and_keeps_every_honest_value() -> None:
    honest = _updates(4, seed=50)
    attacker = {k: 1000 * v for k, v in _updates(1, seed=51)[0].items()}
    got = trimmed_mean([*honest, attacker], [1.0] * 5, trim_fraction=0.2)
    symmetric = symmetric_trimmed_mean([*honest, attacker], [1.0] * 5, trim_fraction=0.2)
    for key in SHAPES:
        honest_mean = np.mean([u[key] for u in honest], axis=0, dtype=np.float64)
        # Exactly the honest mean: no honest value is dropped with the attacker ...
        np.testing.assert_allclose(got[key], honest_mean, rtol=1e-5, atol=1e-6)
        # ... while the symmetric trim drops one per coordinate and is pulled off it.
        assert not np.allclose(symmetric[key], honest_mean, rtol=1e-3, atol=1e-4)


def test_trimmed_mean_without_trimming_is_the_plain_mean() -> None:
    updates = _updates(6, seed=52)
    got = trimmed_mean(updates, [1.0] * 6, trim_fraction=0.1)  # ⌊0.6⌋ = 0
    for key in SHAPES:
        np.testing.assert_allclose(
            got[key], np.mean([u[key] for u in updates], axis=0), rtol=1e-6, atol=1e-7
        )


def test_registered_trimmed_mean_checks_the_fraction_when_called() -> None:
    aggregate = AGGREGATORS.get("trimmed-mean").build(0.5)
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregate(_updates(5, seed=20), [1.0] * 5)


# ------------------------------------------------------------ lora_product_error ---

MODULES = [
    f"base_model.model.layers.{layer}.attention.{proj}"
    for layer in (0, 1)
    for proj in ("q_proj", "v_proj")
]
HEAD = "base_model.model.classifier.weight"
RANK, WIDTH, CLASSES = 4, 12, 3


def _lora_update(
    rng: np.random.Generator, shared_a: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    update: dict[str, np.ndarray] = {}
    for module in MODULES:
        a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        update[a_name] = (
            shared_a[a_name].copy()
            if shared_a is not None
            else rng.standard_normal((RANK, WIDTH)).astype(np.float32)
        )
        update[b_name] = rng.standard_normal((WIDTH, RANK)).astype(np.float32)
    update[HEAD] = rng.standard_normal((CLASSES, WIDTH)).astype(np.float32)
    return update


def _independent_product_error(
    updates: list[dict[str, np.ndarray]], weights: list[float], aggregate: dict[str, np.ndarray]
) -> float:
    """‖agg(B)·agg(A) − mean_w(B·A)‖_F / ‖mean_w(B·A)‖_F with every module's matrices
    concatenated into one long vector."""
    differences, targets = [], []
    for module in MODULES:
        a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        products = np.stack(
            [u[b_name].astype(np.float64) @ u[a_name].astype(np.float64) for u in updates]
        )
        target = np.average(products, axis=0, weights=weights)
        combined = aggregate[b_name].astype(np.float64) @ aggregate[a_name].astype(np.float64)
        differences.append((combined - target).ravel())
        targets.append(target.ravel())
    return float(
        np.linalg.norm(np.concatenate(differences)) / np.linalg.norm(np.concatenate(targets))
    )


def test_lora_fixture_names_pair_up() -> None:
    update = _lora_update(np.random.default_rng(0))
    assert len(lora_pairs(update)) == len(MODULES)


@pytest.mark.parametrize("seed", range(4))
def test_fedavg_is_exact_when_every_site_shares_a(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shared = _lora_update(rng)
    updates = [_lora_update(rng, shared_a=shared) for _ in range(int(rng.integers(2, 7)))]
    weights = list(rng.uniform(1, 500, size=len(updates)))
    error = lora_product_error(updates, weights, fedavg(updates, weights))
    assert error <= 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_fedavg_is_inexact_when_sites_train_a(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [_lora_update(rng) for _ in range(int(rng.integers(2, 7)))]
    weights = list(rng.uniform(1, 500, size=len(updates)))
    assert lora_product_error(updates, weights, fedavg(updates, weights)) > 1e-2


def test_product_error_of_identical_updates_is_zero() -> None:
    update = _lora_update(np.random.default_rng(5))
    assert lora_product_error([update], [3.0], update) == 0.0
    copies = [{k: v.copy() for k, v in update.items()} for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    # fedavg's float32 partial sums round at float32 precision, nothing more.
    assert lora_product_error(copies, weights, fedavg(copies, weights)) <= 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_product_error_matches_an_independent_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [_lora_update(rng) for _ in range(int(rng.integers(2, 8)))]
    weights = list(rng.uniform(0.1, 100, size=len(updates)))
    averaged = fedavg(updates, weights)
    np.testing.assert_allclose(
        lora_product_error(updates, weights, averaged),
        _independent_product_error(updates, weights, averaged),
        rtol=1e-6,
    )
    # Any aggregate, not only fedavg's: here the (unweighted) median.
    median = coordinate_median(updates, weights)
    np.testing.assert_allclose(
        lora_product_error(updates, weights, median),
        _independent_product_error(updates, weights, median),
        rtol=1e-6,
    )


def test_product_error_uses_the_weights() -> None:
    rng = np.random.default_rng(21)
    updates = [_lora_update(rng) for _ in range(3)]
    aggregate = updates[0]
    assert lora_product_error(updates, [1.0, 0.0, 0.0], aggregate) == 0.0
    assert lora_product_error(updates, [1.0, 1.0, 1.0], aggregate) > 1e-2


def test_product_error_ignores_the_head_and_is_scale_free() -> None:
    rng = np.random.default_rng(22)
    updates = [_lora_update(rng) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    aggregate = fedavg(updates, weights)
    error = lora_product_error(updates, weights, aggregate)
    other_head = {**aggregate, HEAD: aggregate[HEAD] * 100 + 7}
    assert lora_product_error(updates, weights, other_head) == error

    def scaled(update: Arrays) -> dict[str, np.ndarray]:
        return {n: v * 4 if ".lora_B." in n else v for n, v in update.items()}

    scaled_updates = [scaled(u) for u in updates]
    assert lora_product_error(scaled_updates, weights, scaled(aggregate)) == pytest.approx(
        error, rel=1e-9
    )


def test_product_error_without_lora_pairs_or_with_zero_products() -> None:
    head_only = [{HEAD: np.ones((2, 2), np.float32)}, {HEAD: np.zeros((2, 2), np.float32)}]
    assert lora_product_error(head_only, [1.0, 1.0], fedavg(head_only, [1.0, 1.0])) == 0.0
    # LoRA's own initialisation: B = 0, so every product is 0.
    rng = np.random.default_rng(23)
    zero_b = [
        {n: np.zeros_like(v) if ".lora_B." in n else v for n, v in _lora_update(rng).items()}
        for _ in range(2)
    ]
    assert lora_product_error(zero_b, [1.0, 1.0], fedavg(zero_b, [1.0, 1.0])) == 0.0
    # A non-zero aggregate against an all-zero target is infinitely wrong.
    nonzero = _lora_update(rng)
    assert lora_product_error(zero_b, [1.0, 1.0], nonzero) == math.inf


def test_product_error_rejects_mismatched_updates() -> None:
    rng = np.random.default_rng(24)
    first, second = _lora_update(rng), _lora_update(rng)
    del second[HEAD]
    with pytest.raises(ValueError, match="same tensors"):
        lora_product_error([first, second], [1.0, 1.0], first)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        lora_product_error([], [], first)
