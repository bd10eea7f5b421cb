"""The checks every site update must pass, and the derived DP-SGD norm bound."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.adapters import AdapterSchema, arrays_to_record, payload_bytes
from common.config import DPSettings, FederationConfig, UpdateValidation
from common.errors import UpdateError
from common.protocol import SITE_CALIBRATED, RoundRequest
from server.validation import (
    ADAM_STEP_BOUND,
    NORM_CHUNK,
    UpdateLimits,
    check_reported,
    derived_norm_bound,
    max_local_steps,
    packed_update_norm,
    record_payload_bytes,
    reference_vector,
    smallest_expected_batch,
    update_norm,
    validate_update,
)

SIGMA = 1.1
EXAMPLES = 640
EPOCHS = 2
BATCH = 32
STEPS = EPOCHS * EXAMPLES // BATCH  # 40: the most an honest site with 640 records takes

A_NAME = "base_model.model.layers.0.attention.q_proj.lora_A.weight"
B_NAME = "base_model.model.layers.0.attention.q_proj.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def _request(**changes: object) -> RoundRequest:
    federation = FederationConfig(
        task="tabular-classification",
        base_model=Path("/nonexistent"),
        local_epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=0.1,
        dp=DPSettings(max_grad_norm=1.0, noise_multiplier=SIGMA),
        update_precision="float32",  # the fake updates below; float16 has its own tests
    )
    request = RoundRequest.for_round(federation, "0" * 64, 1, ("q_proj", "v_proj"))
    return request.model_copy(update=changes)


def _reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        A_NAME: rng.standard_normal((4, 16)).astype(np.float32),
        B_NAME: np.zeros((16, 4), np.float32),
        HEAD: rng.standard_normal((3, 16)).astype(np.float32),
    }


def _schema() -> AdapterSchema:
    return AdapterSchema.of(_reference())


def _limits(**changes: object) -> UpdateLimits:
    limits = UpdateLimits.for_run(UpdateValidation(), _schema())
    return dataclasses.replace(limits, **changes)  # type: ignore[arg-type]


def _metrics(**changes: float) -> dict[str, float]:
    metrics = {
        "num-examples": float(EXAMPLES),
        "epsilon": 1.0,
        "epsilon-budget": 8.0,
        "delta": 1e-5,
        "noise-multiplier": SIGMA,
        "steps": float(STEPS),
    }
    for key, value in changes.items():
        metrics[key.replace("_", "-")] = value
    return metrics


def _moved(norm: float, seed: int = 1) -> dict[str, np.ndarray]:
    """The reference plus a random step of exactly ``norm`` (in float64, before casting)."""
    rng = np.random.default_rng(seed)
    reference = _reference()
    steps = {name: rng.standard_normal(value.shape) for name, value in reference.items()}
    scale = norm / math.sqrt(sum(float(np.sum(s**2)) for s in steps.values()))
    return {
        name: (reference[name].astype(np.float64) + scale * steps[name]).astype(np.float32)
        for name in reference
    }


def _validate(
    arrays: dict[str, np.ndarray] | ArrayRecord | None,
    metrics: dict[str, float] | None = None,
    request: RoundRequest | None = None,
    limits: UpdateLimits | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    record = arrays_to_record(arrays) if isinstance(arrays, dict) else arrays
    return validate_update(
        record,
        metrics if metrics is not None else _metrics(),
        _reference(),
        _schema(),
        request if request is not None else _request(),
        limits if limits is not None else _limits(),
    )


def _rejects(message: str) -> pytest.RaisesExc[UpdateError]:
    return pytest.raises(UpdateError, match=re.escape(message))


# --------------------------------------------------------------------- limits ---


def test_limits_default_payload_is_twice_the_adapter() -> None:
    schema = _schema()
    limits = UpdateLimits.for_run(UpdateValidation(), schema)
    assert schema.payload_bytes == (4 * 16 + 16 * 4 + 3 * 16) * 4
    # Twice the values, plus room for each serialised tensor's .npy header.
    assert limits.max_payload_bytes == 2 * (schema.payload_bytes + 256 * len(schema.entries))
    assert (limits.min_examples, limits.max_examples) == (20, 10_000_000)
    assert limits.norm_bound == "derived"


def test_limits_take_the_runs_explicit_settings() -> None:
    settings = UpdateValidation(
        max_update_norm=2.5, max_payload_bytes=12345, min_examples=50, max_examples=900
    )
    limits = UpdateLimits.for_run(settings, _schema())
    assert limits == UpdateLimits(
        max_payload_bytes=12345, min_examples=50, max_examples=900, norm_bound=2.5
    )
    off = UpdateLimits.for_run(UpdateValidation(max_update_norm="off"), _schema())
    assert off.norm_bound == "off"


def test_record_payload_bytes_counts_the_serialised_buffers() -> None:
    arrays = _reference()
    record = arrays_to_record(arrays)
    expected = 0
    for value in arrays.values():
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        expected += len(buffer.getvalue())
    assert record_payload_bytes(record) == expected
    # The raw bytes plus a small header per tensor.
    assert payload_bytes(arrays) < record_payload_bytes(record) <= payload_bytes(arrays) + 256 * 3
    bigger = arrays_to_record({**arrays, "extra": np.zeros(1000, np.float64)})
    assert record_payload_bytes(bigger) >= record_payload_bytes(record) + 8000
    assert record_payload_bytes(ArrayRecord()) == 0


# ----------------------------------------------------------------- local steps ---


@pytest.mark.parametrize(
    ("examples", "epochs", "batch", "expected"),
    [
        (640, 2, 32, 40),
        (641, 2, 32, 42),
        (639, 2, 32, 40),
        (20, 1, 32, 1),
        (20, 3, 32, 3),
        (1, 5, 1, 5),
        (0, 4, 32, 4),
        (100_000, 1, 256, 391),
    ],
)
def test_max_local_steps(examples: int, epochs: int, batch: int, expected: int) -> None:
    request = _request(local_epochs=epochs, batch_size=batch)
    assert max_local_steps(examples, request) == expected


# ------------------------------------------------------------ derived norm bound ---


def test_sgd_bound_matches_a_hand_computation() -> None:
    # lr 0.05, C 2, B 16, σ 2, d 1296 (√d = 36), 4 steps:
    # per step 2·(1 + (1 + 4·√17)/16 + 2·(36 + 4)/16) = 2·(6 + (1 + 4·√17)/16);
    # bound 0.05 · that · 4 / (1 − 0.9) = 2 · that.
    request = _request(learning_rate=0.05, max_grad_norm=2.0, batch_size=16)
    expected = 2 * 2 * (6 + (1 + 4 * math.sqrt(17)) / 16)
    assert derived_norm_bound(request, 4, 2.0, 1296) == pytest.approx(expected, rel=1e-12)
    # Without noise: 0.05 · 2 · (1 + (1 + 4·√17)/16) · 4 / 0.1.
    quiet = 4 * (1 + (1 + 4 * math.sqrt(17)) / 16)
    assert derived_norm_bound(request, 4, 0.0, 1296) == pytest.approx(quiet, rel=1e-12)


def test_adam_bound_matches_a_hand_computation_and_ignores_clip_and_noise() -> None:
    # lr · 0.1/√0.001 · √d · steps = 0.05 · 0.1 · √(1000 / 0.001) · 7 = 0.05 · 100 · 7 = 35.
    request = _request(optimizer="adam", learning_rate=0.05)
    assert pytest.approx(0.1 / math.sqrt(0.001)) == ADAM_STEP_BOUND
    assert derived_norm_bound(request, 7, 1.0, 1000) == pytest.approx(35.0, rel=1e-12)
    for clip in (0.01, 1.0, 100.0):
        for sigma in (0.0, 0.5, 10.0):
            changed = request.model_copy(update={"max_grad_norm": clip})
            assert derived_norm_bound(changed, 7, sigma, 1000) == pytest.approx(35.0, rel=1e-12)
    # ... while the SGD bound does depend on C.
    sgd = _request(optimizer="sgd")
    assert derived_norm_bound(sgd.model_copy(update={"max_grad_norm": 2.0}), 7, 1.0, 1000) > (
        derived_norm_bound(sgd, 7, 1.0, 1000)
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bound_is_monotone_in_every_input(optimizer: str) -> None:
    base = {"steps": 10, "lr": 0.1, "clip": 1.0, "sigma": 1.0, "trainable": 5000}

    def bound(**changes: float) -> float:
        values = {**base, **changes}
        request = _request(
            optimizer=optimizer,
            learning_rate=values["lr"],
            max_grad_norm=values["clip"],
        )
        return derived_norm_bound(
            request, int(values["steps"]), values["sigma"], int(values["trainable"])
        )

    grids: dict[str, list[float]] = {
        "steps": [1, 2, 5, 10, 100, 1000],
        "lr": [1e-4, 1e-3, 0.01, 0.1, 1.0],
        "clip": [0.01, 0.1, 1.0, 10.0],
        "sigma": [0.0, 0.1, 0.5, 1.0, 3.0, 100.0],
        "trainable": [1, 10, 1000, 10**5, 10**7],
    }
    for name, grid in grids.items():
        values = [bound(**{name: value}) for value in grid]
        assert all(v > 0 and math.isfinite(v) for v in values), name
        ignored = optimizer == "adam" and name in ("clip", "sigma")
        if ignored:
            assert len(set(values)) == 1, name
        else:
            assert all(a < b for a, b in itertools.pairwise(values)), (name, values)
    # Linear in steps and the learning rate (and in C, for SGD).
    assert bound(steps=20) == pytest.approx(2 * bound(steps=10))
    assert bound(lr=0.3) == pytest.approx(3 * bound(lr=0.1))
    if optimizer == "sgd":
        assert bound(clip=5.0) == pytest.approx(5 * bound(clip=1.0))
        # Bigger batches average the noise away: the bound shrinks.
        request = _request(batch_size=16)
        assert derived_norm_bound(request, 10, 1.0, 5000) > derived_norm_bound(
            request.model_copy(update={"batch_size": 256}), 10, 1.0, 5000
        )


def _dp_sgd_update_norm(
    rng: np.random.Generator,
    *,
    trainable: int,
    people: int,
    batch: int,
    sigma: float,
    steps: int,
    lr: float,
    clip: float,
    averaging_batch: float | None = None,
) -> float:
    """Plain NumPy DP-SGD with momentum 0.9 under the worst honest case: every sampled
    person's clipped gradient has norm exactly C and they all point the same way.

    Each step: a Poisson batch (each person with q = batch / people), the clipped sum,
    Gaussian noise N(0, (σC)² I), division by the (expected) batch size, a momentum
    buffer and a learning-rate step. Returns the norm of the total parameter change.
    """
    q = min(1.0, batch / people)
    divide_by = batch if averaging_batch is None else averaging_batch
    direction = np.zeros(trainable)
    direction[0] = 1.0
    momentum = np.zeros(trainable)
    params = np.zeros(trainable)
    for _ in range(steps):
        sampled = rng.binomial(people, q)
        gradient = (sampled * clip * direction + rng.normal(0.0, sigma * clip, trainable)) / (
            divide_by
        )
        momentum = 0.9 * momentum + gradient
        params -= lr * momentum
    return float(np.linalg.norm(params))


DP_SETTINGS = [
    # (trainable d, batch B, σ, steps, lr, C)
    (1000, 32, 0.5, 3, 0.1, 1.0),
    (1000, 128, 0.5, 30, 0.05, 1.0),
    (5000, 64, 1.0, 10, 0.1, 0.5),
    (20000, 32, 3.0, 3, 0.01, 1.0),
    (20000, 128, 3.0, 30, 0.1, 2.0),
    (10000, 64, 2.0, 1, 0.1, 1.0),
    (2000, 96, 0.8, 17, 0.2, 1.0),
]


@pytest.mark.parametrize(("trainable", "batch", "sigma", "steps", "lr", "clip"), DP_SETTINGS)
def test_derived_bound_covers_honest_dp_sgd(
    trainable: int, batch: int, sigma: float, steps: int, lr: float, clip: float
) -> None:
    rng = np.random.default_rng(trainable + batch + steps)
    request = _request(batch_size=batch, learning_rate=lr, max_grad_norm=clip)
    bound = derived_norm_bound(request, steps, sigma, trainable)
    observed = [
        _dp_sgd_update_norm(
            rng,
            trainable=trainable,
            people=40 * batch,
            batch=batch,
            sigma=sigma,
            steps=steps,
            lr=lr,
            clip=clip,
        )
        for _ in range(4)
    ]
    assert max(observed) < bound, (observed, bound)
    # ... and it is not absurdly loose for the worst honest case.
    assert bound < 50 * min(observed), (observed, bound)


def test_derived_bound_covers_a_site_smaller_than_the_batch() -> None:
    # Opacus's Poisson loader: q = 1/ceil(N/B) and expected_batch_size = int(N·q), which
    # is N when N < B. 20 people (the smallest cohort a site accepts), B = 512, σ = 2,
    # one epoch = one step, 200k trainable parameters.
    people, batch, sigma, trainable = 20, 512, 2.0, 200_000
    rng = np.random.default_rng(0)
    request = _request(batch_size=batch, learning_rate=0.1, max_grad_norm=1.0, local_epochs=1)
    steps = max_local_steps(people, request)
    assert steps == 1
    # Dividing by B would not cover it (Opacus divides by the 20 people here) ...
    too_tight = derived_norm_bound(request, steps, sigma, trainable)
    # ... the smallest expected batch an honest site with 20 records can have does.
    expected = smallest_expected_batch(people, batch, min_people=20)
    assert expected == people
    bound = derived_norm_bound(request, steps, sigma, trainable, expected)
    observed = _dp_sgd_update_norm(
        rng,
        trainable=trainable,
        people=people,
        batch=batch,
        sigma=sigma,
        steps=steps,
        lr=0.1,
        clip=1.0,
        averaging_batch=people,
    )
    assert too_tight < observed < bound, (too_tight, observed, bound)


@pytest.mark.parametrize(
    ("records", "batch", "min_people", "expected"),
    [
        (20, 512, 20, 20),  # fewer people than B: Opacus averages over all of them
        (300, 128, 300, 100),  # exactly 300 people: int(300 / 3)
        (200, 32, 20, 16),  # 33 people: q = 1/2, int(16.5) = 16, the least in range
        (5000, 128, 20, 20),  # people unknown: as few as the cohort minimum
        (10, 64, 20, 10),  # fewer records than the minimum: records bound people
    ],
)
def test_smallest_expected_batch(records: int, batch: int, min_people: int, expected: int) -> None:
    assert smallest_expected_batch(records, batch, min_people) == expected


def test_smallest_expected_batch_matches_a_brute_force_over_people() -> None:
    for batch in (1, 7, 32, 100):
        for records in (1, 5, 33, 250, 1000):
            reference = min(
                max(1, int(n * (1.0 / math.ceil(n / batch))))
                for n in range(min(20, records), records + 1)
            )
            assert smallest_expected_batch(records, batch, 20) == reference


@pytest.mark.parametrize(("trainable", "sigma", "steps"), [(1000, 1.0, 5), (5000, 3.0, 30)])
def test_derived_adam_bound_covers_honest_dp_adam(trainable: int, sigma: float, steps: int) -> None:
    rng = np.random.default_rng(steps)
    lr, batch, clip = 0.01, 32, 1.0
    request = _request(optimizer="adam", batch_size=batch, learning_rate=lr, max_grad_norm=clip)
    direction = np.full(trainable, 1 / math.sqrt(trainable))
    first, second, params = (
        np.zeros(trainable),
        np.zeros(trainable),
        np.zeros(trainable),
    )
    for step in range(1, steps + 1):
        gradient = (batch * clip * direction + rng.normal(0.0, sigma * clip, trainable)) / batch
        first = 0.9 * first + 0.1 * gradient
        second = 0.999 * second + 0.001 * gradient**2
        corrected = (first / (1 - 0.9**step)) / (np.sqrt(second / (1 - 0.999**step)) + 1e-8)
        params -= lr * corrected
    observed = float(np.linalg.norm(params))
    assert observed < derived_norm_bound(request, steps, sigma, trainable)


# ------------------------------------------------------------------ update norm ---


def test_update_norm_is_the_l2_norm_of_every_difference() -> None:
    rng = np.random.default_rng(3)
    reference = _reference()
    update = {n: v + rng.standard_normal(v.shape).astype(np.float32) for n, v in reference.items()}
    expected = np.linalg.norm(
        np.concatenate(
            [
                (update[n].astype(np.float64) - reference[n].astype(np.float64)).ravel()
                for n in sorted(reference)
            ]
        )
    )
    assert update_norm(update, reference) == pytest.approx(float(expected), rel=1e-12)
    assert update_norm(reference, reference) == 0.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_packed_norm_is_update_norm(dtype: type[np.floating]) -> None:
    """The fast path over packed vectors, across several of its steps, is the same norm."""
    rng = np.random.default_rng(5)
    shapes = {"a": (300, 700), "b": (5,), "c": (1000, 351)}
    reference = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    update = {
        n: (v + 0.01 * rng.standard_normal(v.shape)).astype(dtype) for n, v in reference.items()
    }
    schema = AdapterSchema.of(update)
    assert schema.elements > 2 * NORM_CHUNK  # more than two of its steps
    packed = packed_update_norm(schema.pack(update).flat, reference_vector(reference, schema))
    assert packed == pytest.approx(update_norm(update, reference), rel=1e-12)
    assert packed_update_norm(np.zeros(0, dtype), np.zeros(0)) == 0.0
    spoiled = schema.pack(update)
    spoiled["c"][999, 350] = np.nan
    assert math.isnan(packed_update_norm(spoiled.flat, reference_vector(reference, schema)))


def test_reference_vector_reuses_a_packed_float64_reference_and_packs_anything_else() -> None:
    schema = _schema()
    packed = schema.with_dtype("float64").pack(_reference())
    assert reference_vector(packed, schema) is packed.flat
    fresh = reference_vector(_reference(), schema)
    np.testing.assert_array_equal(fresh, packed.flat)
    reordered = AdapterSchema(tuple(reversed(schema.with_dtype("float64").entries)))
    assert reference_vector(reordered.pack(_reference()), schema) is not packed.flat
    np.testing.assert_array_equal(reference_vector(reordered.pack(_reference()), schema), fresh)


def test_an_unusual_but_valid_encoding_is_validated_the_same() -> None:
    """Fortran-order tensors skip the direct read and are decoded by NumPy: same result."""
    update = _moved(0.5)
    direct, direct_norm = _validate(update)
    record = ArrayRecord({n: Array(np.asfortranarray(v)) for n, v in update.items()})
    assert _schema().unpack_record(record) is None
    arrays, norm = validate_update(
        record, _metrics(), _reference(), _schema(), _request(), _limits()
    )
    assert norm == direct_norm
    for name in update:
        np.testing.assert_array_equal(arrays[name], direct[name])


def test_float64_values_whose_squares_overflow_are_rejected() -> None:
    reference = {"w": np.zeros(2, np.float64)}
    schema = AdapterSchema.of(reference)
    update = arrays_to_record({"w": np.array([1e200, 1.0])})
    with _rejects("non-finite values in the update"):
        validate_update(
            update, _metrics(), reference, schema, _request(), _limits(norm_bound="off")
        )


def test_update_norm_accumulates_in_float64() -> None:
    # 3e20² overflows float32; the norm must still be 5e20.
    update = {"w": np.array([3e20, 4e20], np.float32)}
    zero = {"w": np.zeros(2, np.float32)}
    assert update_norm(update, zero) == pytest.approx(5e20, rel=1e-6)


# -------------------------------------------------------------- reported numbers ---


def test_honest_numbers_pass() -> None:
    check_reported(_metrics(), _request(), _limits())
    check_reported(_metrics(steps=1.0), _request(), _limits())
    check_reported(_metrics(num_examples=20.0, steps=2.0), _request(), _limits())


@pytest.mark.parametrize(("examples", "low", "high"), [(19.0, 20, 1000), (1001.0, 20, 1000)])
def test_num_examples_outside_the_range(examples: float, low: int, high: int) -> None:
    limits = _limits(min_examples=low, max_examples=high)
    with _rejects(f"num-examples {examples:g} outside the accepted range [{low}, {high}]"):
        check_reported(_metrics(num_examples=examples, steps=1.0), _request(), limits)
    check_reported(_metrics(num_examples=float(low), steps=1.0), _request(), limits)
    check_reported(_metrics(num_examples=float(high), steps=1.0), _request(), limits)


@pytest.mark.parametrize("steps", [0.0, -3.0, 2.5, 41.0, 1e6])
def test_steps_an_honest_site_cannot_take(steps: float) -> None:
    with _rejects(f"reports {steps:g} steps; 640 records allow 1 to 40"):
        check_reported(_metrics(steps=steps), _request(), _limits())


def test_steps_follow_examples_epochs_and_batch() -> None:
    # 641 records need one more batch an epoch: 2 · 21 = 42 steps.
    check_reported(_metrics(num_examples=641.0, steps=42.0), _request(), _limits())
    with _rejects("reports 43 steps; 641 records allow 1 to 42"):
        check_reported(_metrics(num_examples=641.0, steps=43.0), _request(), _limits())
    # More epochs allow more steps; a bigger batch allows fewer.
    check_reported(_metrics(steps=60.0), _request(local_epochs=3), _limits())
    with _rejects("reports 40 steps; 640 records allow 1 to 20"):
        check_reported(_metrics(steps=40.0), _request(batch_size=64), _limits())


@pytest.mark.parametrize("sigma", [1.0, 2.2, 0.0, 1.1001])
def test_sigma_must_match_when_the_run_fixed_it(sigma: float) -> None:
    with _rejects(f"reports σ={sigma:g}; the run fixed σ={SIGMA:g}"):
        check_reported(_metrics(noise_multiplier=sigma), _request(), _limits())


@pytest.mark.parametrize("sigma", [0.0, 0.37, 1.1, 5.0, 1000.0])
def test_site_calibrated_sigma_is_accepted(sigma: float) -> None:
    request = _request(noise_multiplier=SITE_CALIBRATED)
    check_reported(_metrics(noise_multiplier=sigma), request, _limits())


@pytest.mark.parametrize("sigma", [-0.5, -1.0, 1000.5, 1e9])
def test_implausible_sigma(sigma: float) -> None:
    request = _request(noise_multiplier=SITE_CALIBRATED)
    with _rejects(f"reports an implausible noise multiplier {sigma:g}"):
        check_reported(_metrics(noise_multiplier=sigma), request, _limits())


# ------------------------------------------------------------------ whole update ---


def test_honest_update_is_accepted_with_its_norm() -> None:
    update = _moved(0.5)
    arrays, norm = _validate(update)
    assert set(arrays) == set(update)
    for name, value in update.items():
        assert arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(arrays[name], value)
    reference = _reference()
    expected = np.linalg.norm(
        np.concatenate(
            [(update[n].astype(np.float64) - reference[n]).ravel() for n in sorted(update)]
        )
    )
    assert norm == pytest.approx(float(expected), rel=1e-6)  # float32: the bound is far
    assert norm == pytest.approx(0.5, rel=1e-5)


def test_missing_record() -> None:
    with _rejects("reply carries no adapter"):
        _validate(None)


def test_payload_over_the_limit_is_rejected() -> None:
    record = arrays_to_record(_reference())
    size = record_payload_bytes(record)
    with _rejects(f"payload of {size} bytes exceeds the limit of {size - 1}"):
        _validate(record, limits=_limits(max_payload_bytes=size - 1))
    _validate(record, limits=_limits(max_payload_bytes=size))
    # The default limit (twice the adapter) stops a padded payload.
    padded = {**_reference(), "padding": np.zeros(10_000, np.float32)}
    with _rejects("exceeds the limit of"):
        _validate(padded)


def test_payload_is_checked_before_anything_is_decoded() -> None:
    garbage = Array(dtype="float32", shape=(5000,), stype="numpy.ndarray", data=b"\0" * 20_000)
    record = ArrayRecord({**arrays_to_record(_reference()), "junk": garbage})
    # Over the limit: rejected for its size, before the reported numbers or the bytes.
    with _rejects("payload of"):
        _validate(record, metrics=_metrics(steps=1e6))
    # Under the limit, the same bytes fail to decode.
    with _rejects("undecodable arrays"):
        _validate(record, limits=_limits(max_payload_bytes=10**6))


def test_reported_numbers_are_checked_before_the_arrays() -> None:
    nan = _reference()
    nan[HEAD] = nan[HEAD].copy()
    nan[HEAD][0, 0] = np.nan
    with _rejects("num-examples 5 outside the accepted range"):
        _validate(nan, metrics=_metrics(num_examples=5.0, steps=1.0))


def test_num_examples_and_steps_through_validate_update() -> None:
    with _rejects("num-examples 1.2e+07 outside the accepted range [20, 10000000]"):
        _validate(_moved(0.1), metrics=_metrics(num_examples=1.2e7))
    with _rejects("reports 41 steps; 640 records allow 1 to 40"):
        _validate(_moved(0.1), metrics=_metrics(steps=41.0))


def test_sigma_through_validate_update() -> None:
    with _rejects("reports σ=0.5; the run fixed σ=1.1"):
        _validate(_moved(0.1), metrics=_metrics(noise_multiplier=0.5))
    calibrated = _request(noise_multiplier=SITE_CALIBRATED)
    _, norm = _validate(_moved(0.1), metrics=_metrics(noise_multiplier=0.5), request=calibrated)
    assert norm == pytest.approx(0.1, rel=1e-5)
    with _rejects("implausible noise multiplier 2000"):
        _validate(_moved(0.1), metrics=_metrics(noise_multiplier=2000.0), request=calibrated)


def test_schema_mismatches_are_rejected() -> None:
    reference = _reference()
    missing = {n: v for n, v in reference.items() if n != HEAD}
    with _rejects(f"missing tensors: {HEAD}"):
        _validate(missing)
    extra = {**reference, "base_model.model.extra.weight": np.zeros(3, np.float32)}
    with _rejects("unexpected tensors: base_model.model.extra.weight"):
        _validate(extra)
    reshaped = {**reference, HEAD: np.zeros((16, 3), np.float32)}
    with _rejects(f"{HEAD}: shape (16, 3), expected (3, 16)"):
        _validate(reshaped)
    retyped = {**reference, HEAD: reference[HEAD].astype(np.float64)}
    with _rejects(f"{HEAD}: dtype float64, expected float32"):
        _validate(retyped)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    update = _moved(0.1)
    update[B_NAME][3, 1] = bad
    with _rejects(f"non-finite values in {B_NAME}"):
        _validate(update)
    # ... even when no norm bound is checked.
    with _rejects("non-finite values"):
        _validate(update, limits=_limits(norm_bound="off"))


def test_non_finite_values_are_named_in_order() -> None:
    update = _moved(0.1)
    for name in update:
        update[name].flat[0] = np.nan
    with _rejects(f"non-finite values in {', '.join(sorted(update))}"):
        _validate(update)


def test_explicit_norm_bound() -> None:
    limits = _limits(norm_bound=0.5)
    with _rejects("update norm 0.6 exceeds the bound of 0.5"):
        _validate(_moved(0.6), limits=limits)
    _, norm = _validate(_moved(0.45), limits=limits)
    assert norm == pytest.approx(0.45, rel=1e-5)


def test_derived_norm_bound_is_applied_per_reply() -> None:
    request = _request()
    # The site's records allow as few as 20 people: the smallest batch Opacus may use.
    smallest = smallest_expected_batch(EXAMPLES, request.batch_size, 20)

    def bound_for(req: RoundRequest, steps: int, sigma: float) -> float:
        return derived_norm_bound(req, steps, sigma, _schema().elements, smallest)

    bound = bound_for(request, STEPS, SIGMA)
    _, norm = _validate(_moved(0.99 * bound))
    assert norm < bound
    with _rejects(f"exceeds the bound of {bound:.4g}"):
        _validate(_moved(1.01 * bound))
    # Fewer reported steps: a smaller bound for the same update.
    one_step = bound_for(request, 1, SIGMA)
    assert one_step < 0.99 * bound
    with _rejects(f"exceeds the bound of {one_step:.4g}"):
        _validate(_moved(0.99 * bound), metrics=_metrics(steps=1.0))
    # Under site-calibrated σ the reported σ sets the bound.
    calibrated = _request(noise_multiplier=SITE_CALIBRATED)
    small_sigma = bound_for(calibrated, STEPS, 0.1)
    with _rejects(f"exceeds the bound of {small_sigma:.4g}"):
        _validate(
            _moved(0.99 * bound),
            metrics=_metrics(noise_multiplier=0.1),
            request=calibrated,
        )


def test_off_disables_the_norm_check() -> None:
    huge = _moved(1e6)
    with _rejects("exceeds the bound"):
        _validate(huge)
    arrays, norm = _validate(huge, limits=_limits(norm_bound="off"))
    assert norm == pytest.approx(1e6, rel=1e-5)
    assert set(arrays) == set(huge)


def test_a_float16_update_is_accepted_when_the_run_asks_for_float16() -> None:
    request = _request(update_dtype="float16")
    update = {name: value.astype(np.float16) for name, value in _moved(0.5).items()}
    arrays, norm = _validate(update, request=request)
    assert all(value.dtype == np.float16 for value in arrays.values())
    assert norm == pytest.approx(0.5, rel=1e-2)  # float16 rounding, nothing more


def test_a_float16_update_is_rejected_when_the_run_asks_for_float32() -> None:
    update = {name: value.astype(np.float16) for name, value in _moved(0.5).items()}
    with pytest.raises(UpdateError, match="dtype float16, expected float32"):
        _validate(update, request=_request(update_dtype="float32"))


def test_a_full_precision_update_is_accepted_when_float16_was_asked() -> None:
    """A site from before update_precision sends float32: as good, and hashed as sent."""
    update = _moved(0.5)
    arrays, norm = _validate(update, request=_request(update_dtype="float16"))
    assert all(value.dtype == np.float32 for value in arrays.values())
    assert norm == pytest.approx(0.5, rel=1e-5)


def test_an_update_mixing_precisions_is_rejected() -> None:
    update = _moved(0.5)
    update[HEAD] = update[HEAD].astype(np.float16)
    with pytest.raises(UpdateError, match="dtype float32, expected float16"):
        _validate(update, request=_request(update_dtype="float16"))


def test_a_float16_update_that_overflowed_is_rejected_as_non_finite() -> None:
    update = {name: value.astype(np.float16) for name, value in _moved(0.5).items()}
    update[HEAD] = np.full_like(update[HEAD], 1e6)  # beyond float16: inf
    with pytest.raises(UpdateError, match="non-finite"):
        _validate(update, request=_request(update_dtype="float16"))
