"""Adapter tensors <-> Flower ArrayRecords, and the schema check every update must pass."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from common.adapters import (
    AdapterSchema,
    arrays_to_record,
    payload_bytes,
    record_to_arrays,
)
from common.errors import FedloraError, UpdateError

SHAPES = [(1,), (7,), (3, 4), (2, 3, 5), (0,), (0, 4), (4, 0)]


def _random_arrays(dtype: type[np.floating], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {f"t{i}": rng.standard_normal(shape).astype(dtype) for i, shape in enumerate(SHAPES)}
    # Values that a lossy or text-based encoding would change.
    arrays["special"] = np.array([np.pi, -0.0, 1e-38, np.finfo(dtype).max, np.nan, -np.inf], dtype)
    return arrays


def _assert_bit_exact(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def _over_the_wire(record: ArrayRecord) -> ArrayRecord:
    """Deflate the record and its children the way Flower ships them, then inflate."""
    contents = {
        object_id: obj.deflate() for object_id, obj in get_all_nested_objects(record).items()
    }
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ArrayRecord)
    return inflated


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_bit_exact(dtype: type[np.floating]) -> None:
    arrays = _random_arrays(dtype)
    record = arrays_to_record(arrays)
    assert isinstance(record, ArrayRecord)
    assert list(record) == list(arrays)
    assert all(isinstance(value, Array) for value in record.values())
    _assert_bit_exact(record_to_arrays(record), arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_survives_flower_serialisation(dtype: type[np.floating]) -> None:
    arrays = _random_arrays(dtype, seed=1)
    # Large enough to be sent as several chunks.
    arrays["large"] = np.random.default_rng(2).standard_normal((600, 700)).astype(dtype)
    _assert_bit_exact(record_to_arrays(_over_the_wire(arrays_to_record(arrays))), arrays)


def test_non_contiguous_arrays_are_sent_with_their_values() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {"transposed": base.T, "strided": base[:, ::2]}
    assert not arrays["transposed"].flags.c_contiguous
    got = record_to_arrays(_over_the_wire(arrays_to_record(arrays)))
    np.testing.assert_array_equal(got["transposed"], base.T)
    np.testing.assert_array_equal(got["strided"], base[:, ::2])
    assert got["transposed"].shape == (6, 4)


def test_big_endian_values_survive() -> None:
    value = np.arange(5, dtype=">f4")
    got = record_to_arrays(arrays_to_record({"be": value}))["be"]
    np.testing.assert_array_equal(got, value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_dimensional_round_trip(dtype: type[np.floating]) -> None:
    arrays = {"scale": np.array(2.5, dtype=dtype)}
    got = record_to_arrays(arrays_to_record(arrays))
    _assert_bit_exact(got, arrays)
    AdapterSchema.of(arrays).check(got)


def test_record_to_arrays_reads_a_record_built_by_flower() -> None:
    record = ArrayRecord({"w": Array(np.full((2, 2), 3.0, dtype=np.float32))})
    got = record_to_arrays(record)
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], np.full((2, 2), 3.0, dtype=np.float32))


def test_empty_mapping_round_trip() -> None:
    assert record_to_arrays(arrays_to_record({})) == {}


def test_payload_bytes() -> None:
    arrays = {
        "a": np.zeros((16, 4), np.float32),  # 256
        "b": np.zeros((3,), np.float64),  # 24
        "c": np.zeros((0, 8), np.float32),  # 0
        "d": np.zeros((), np.float16),  # 2
    }
    assert payload_bytes(arrays) == 282
    assert payload_bytes({}) == 0


# ---------------------------------------------------------------------- schema ---


def _adapter() -> dict[str, np.ndarray]:
    return {
        "layer.0.lora_A": np.zeros((4, 16), np.float32),
        "layer.0.lora_B": np.zeros((16, 4), np.float32),
        "classifier.weight": np.zeros((2, 16), np.float32),
        "classifier.bias": np.zeros((2,), np.float32),
    }


def test_schema_of_lists_sorted_names_shapes_dtypes() -> None:
    schema = AdapterSchema.of(_adapter())
    assert schema.entries == (
        ("classifier.bias", (2,), "float32"),
        ("classifier.weight", (2, 16), "float32"),
        ("layer.0.lora_A", (4, 16), "float32"),
        ("layer.0.lora_B", (16, 4), "float32"),
    )
    assert AdapterSchema.of(_adapter()) == schema
    assert hash(AdapterSchema.of(_adapter())) == hash(schema)


def test_schema_accepts_identical_and_different_values() -> None:
    schema = AdapterSchema.of(_adapter())
    schema.check(_adapter())
    other = {k: np.ones_like(v) for k, v in _adapter().items()}
    schema.check(other)
    schema.check(record_to_arrays(arrays_to_record(other)))


def test_schema_missing_tensor() -> None:
    schema = AdapterSchema.of(_adapter())
    update = _adapter()
    del update["layer.0.lora_B"]
    with pytest.raises(UpdateError, match=r"^missing tensors: layer\.0\.lora_B$") as info:
        schema.check(update)
    assert isinstance(info.value, FedloraError)


def test_schema_missing_tensors_are_listed_at_most_three() -> None:
    schema = AdapterSchema.of({f"t{i}": np.zeros(1, np.float32) for i in range(5)})
    with pytest.raises(UpdateError) as info:
        schema.check({})
    assert str(info.value) == "missing tensors: t0, t1, t2"


def test_schema_extra_tensor() -> None:
    schema = AdapterSchema.of(_adapter())
    update = {**_adapter(), "layer.0.backdoor": np.zeros((1,), np.float32)}
    with pytest.raises(UpdateError, match=r"^unexpected tensors: layer\.0\.backdoor$"):
        schema.check(update)


def test_schema_wrong_shape() -> None:
    schema = AdapterSchema.of(_adapter())
    update = {**_adapter(), "layer.0.lora_A": np.zeros((4, 17), np.float32)}
    with pytest.raises(UpdateError) as info:
        schema.check(update)
    assert str(info.value) == "layer.0.lora_A: shape (4, 17), expected (4, 16)"


def test_schema_transposed_shape_is_rejected() -> None:
    schema = AdapterSchema.of(_adapter())
    update = {**_adapter(), "layer.0.lora_A": np.zeros((16, 4), np.float32)}
    with pytest.raises(UpdateError, match=r"layer\.0\.lora_A: shape \(16, 4\)"):
        schema.check(update)


def test_schema_wrong_dtype() -> None:
    schema = AdapterSchema.of(_adapter())
    update = {**_adapter(), "classifier.bias": np.zeros((2,), np.float64)}
    with pytest.raises(UpdateError) as info:
        schema.check(update)
    assert str(info.value) == "classifier.bias: dtype float64, expected float32"


def test_schema_float16_is_rejected() -> None:
    schema = AdapterSchema.of(_adapter())
    update = {**_adapter(), "classifier.weight": np.zeros((2, 16), np.float16)}
    with pytest.raises(UpdateError, match=r"classifier\.weight: dtype float16"):
        schema.check(update)
