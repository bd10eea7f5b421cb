"""The float32 norm check: fast where it is clearly decided, exact where it is close.

Every accept and reject must be the one the exact float64 norm gives; the float32 norm
must stay within the error it claims, including against a large reference (whose own
float32 rounding is part of that error) and across several of its summation steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.adapters import AdapterSchema, arrays_to_record
from common.config import UpdateValidation
from common.errors import UpdateError
from common.protocol import RoundRequest
from server.validation import (
    FAST_NORM_CHUNK,
    NormReference,
    UpdateLimits,
    checked_norm,
    fast_norm_error,
    packed_update_norm,
    single_precision_norm,
    validate_update,
)
from tests.unit.server.test_validation import _metrics as validation_metrics
from tests.unit.server.test_validation import _request as validation_request

SHAPES = {"a": (400, 700), "b": (7,), "c": (300, 333)}


def _pair(
    dtype: type[np.floating], scale: float = 1.0, step: float = 0.01, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A float64 reference whose values float32 cannot hold, and an update near it."""
    rng = np.random.default_rng(seed)
    reference = {n: scale * (1 + rng.random(s)) / 3 for n, s in SHAPES.items()}
    update = {
        n: (v + step * rng.standard_normal(v.shape)).astype(dtype) for n, v in reference.items()
    }
    return reference, update


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_the_float32_norm_keeps_within_its_claimed_error(
    dtype: type[np.floating], scale: float
) -> None:
    reference, update = _pair(dtype, scale)
    schema = AdapterSchema.of(update)
    assert schema.elements > 2 * FAST_NORM_CHUNK  # several summation steps
    norm_reference = NormReference.of(reference, schema)
    flat = schema.pack(update).flat
    exact = packed_update_norm(flat, norm_reference.exact)
    fast = single_precision_norm(flat, norm_reference.single)
    assert abs(fast - exact) <= fast_norm_error(fast, norm_reference.norm, flat.size)
    assert abs(fast - exact) > 0 or dtype is np.float16  # it is a different computation


def test_a_value_float32_cannot_hold_is_left_to_the_exact_norm() -> None:
    schema = AdapterSchema.of({"w": np.zeros(3)})
    reference = NormReference.of({"w": np.zeros(3)}, schema)
    nan = np.array([1.0, np.nan, 0.0])
    assert math.isnan(single_precision_norm(nan, reference.single))
    assert math.isnan(checked_norm(nan, reference, None))
    huge = np.array([1e30, 1e30, 0.0])  # finite squares in float64 only
    assert math.isinf(single_precision_norm(huge, reference.single))
    assert checked_norm(huge, reference, None) == pytest.approx(math.sqrt(2) * 1e30)


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_differences_whose_float32_squares_underflow_are_decided_exactly(
    flush_denormal: bool,
) -> None:
    """1e-23 squared is below float32's smallest value: the float32 norm reads 0, and
    the check must still reject a norm twice its bound."""
    flat = np.full(1 << 17, 1e-23, np.float32)
    schema = AdapterSchema.of({"w": flat})
    reference = NormReference.of({"w": np.zeros_like(flat)}, schema)
    exact = packed_update_norm(flat, reference.exact)
    torch.set_flush_denormal(flush_denormal)  # training turns it on in its process
    try:
        assert single_precision_norm(flat, reference.single) < exact / 2
        assert checked_norm(flat, reference, exact / 2) == exact
        assert checked_norm(flat, reference, exact * 2) == exact
    finally:
        torch.set_flush_denormal(False)  # a fresh process's setting


def _limits(bound: float) -> UpdateLimits:
    schema = AdapterSchema.of({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    return UpdateLimits.for_run(UpdateValidation(max_update_norm=bound), schema)


def _request(dtype: str) -> RoundRequest:
    return validation_request(update_dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_norm_a_hair_either_side_of_the_bound_is_decided_exactly(
    dtype: type[np.floating],
) -> None:
    reference, update = _pair(dtype)
    schema = AdapterSchema.of({n: v.astype(np.float32) for n, v in reference.items()})
    norm_reference = NormReference.of(reference, schema)
    exact = packed_update_norm(
        schema.with_dtype(np.dtype(dtype).name).pack(update).flat, norm_reference.exact
    )
    metrics = validation_metrics()
    request = _request(np.dtype(dtype).name)
    record = arrays_to_record(update)
    _, norm = validate_update(
        record, metrics, norm_reference, schema, request, _limits(exact * (1 + 1e-12))
    )
    assert norm == exact  # too close for float32 to call: the exact norm decided
    with pytest.raises(UpdateError, match=r"update norm .* exceeds the bound"):
        validate_update(
            record, metrics, norm_reference, schema, request, _limits(exact * (1 - 1e-12))
        )
    _, far = validate_update(record, metrics, reference, schema, request, _limits(2 * exact))
    assert far != exact and far == pytest.approx(exact, rel=1e-5)  # float32 decided
    with pytest.raises(UpdateError, match=r"update norm .* exceeds the bound"):
        validate_update(record, metrics, norm_reference, schema, request, _limits(exact / 2))


def test_the_reference_is_packed_once_in_both_precisions() -> None:
    reference, _ = _pair(np.float32)
    schema = AdapterSchema.of(reference)
    packed = NormReference.of(reference, schema)
    assert packed.single.dtype == torch.float32 and packed.exact.dtype == np.float64
    assert packed.norm == pytest.approx(float(np.linalg.norm(packed.exact)), rel=1e-12)
