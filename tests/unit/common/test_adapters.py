"""Adapter tensors <-> Flower ArrayRecords, and the schema check every update must pass."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from common.adapters import (
    AdapterSchema,
    PackedAdapter,
    adapter_sha256,
    arrays_to_record,
    is_lora_a,
    lora_pairs,
    npy_header,
    payload_bytes,
    record_to_arrays,
    seeded_lora_a,
    without_lora_a,
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


def test_schema_elements_and_payload_bytes() -> None:
    schema = AdapterSchema.of(_adapter())
    assert schema.elements == 64 + 64 + 32 + 2
    assert schema.payload_bytes == 4 * (64 + 64 + 32 + 2)
    assert schema.payload_bytes == payload_bytes(_adapter())


def test_schema_payload_bytes_counts_each_dtype_and_empty_and_scalar_tensors() -> None:
    arrays = {
        "a": np.zeros((16, 4), np.float32),  # 64 elements, 256 bytes
        "b": np.zeros((3,), np.float64),  # 3 elements, 24 bytes
        "c": np.zeros((0, 8), np.float32),  # 0 elements
        "d": np.zeros((), np.float16),  # 1 element, 2 bytes
    }
    schema = AdapterSchema.of(arrays)
    assert schema.elements == 68
    assert schema.payload_bytes == 282 == payload_bytes(arrays)
    assert AdapterSchema.of({}).elements == 0
    assert AdapterSchema.of({}).payload_bytes == 0


def test_schema_elements_do_not_overflow_for_large_tensors() -> None:
    # Only the schema is built here: the tensor itself would not fit in memory.
    schema = AdapterSchema((("huge", (70_000, 70_000), "float32"),))
    assert schema.elements == 4_900_000_000
    assert schema.payload_bytes == 19_600_000_000


# ------------------------------------------------------- reading records directly ---


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_unpack_record_reads_what_flower_sends_bit_exactly(dtype: type[np.floating]) -> None:
    arrays = _random_arrays(dtype, seed=4)
    record = _over_the_wire(arrays_to_record(arrays))
    schema = AdapterSchema.of(arrays)
    packed = schema.unpack_record(record)
    assert isinstance(packed, PackedAdapter)
    _assert_bit_exact(dict(packed), schema.pack(record_to_arrays(record)))
    packed.flat[0] = 1.0  # its own buffer, writable, not a view of the message
    assert record_to_arrays(record)["special"][0] == np.asarray(np.pi, dtype)


@pytest.mark.parametrize("shape", [*SHAPES, (), (64, 768)])
def test_npy_header_is_what_flower_writes(shape: tuple[int, ...]) -> None:
    for dtype in (np.float16, np.float32, np.float64):
        data = Array(np.zeros(shape, dtype)).data
        header = npy_header(np.dtype(dtype), shape)
        assert header is not None and data.startswith(header)
        assert len(data) == len(header) + np.zeros(shape, dtype).nbytes


def _with_data(record: ArrayRecord, name: str, data: bytes) -> ArrayRecord:
    array = record[name]
    changed = dict(record.items())
    changed[name] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=data)
    return ArrayRecord(changed)


def test_unpack_record_leaves_anything_unusual_to_the_general_decoder() -> None:
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)}
    schema = AdapterSchema.of(arrays)
    record = arrays_to_record(arrays)
    assert schema.unpack_record(record) is not None
    data = record["a"].data
    unusual = {
        "trailing byte": _with_data(record, "a", data + b"\0"),
        "truncated": _with_data(record, "a", data[:-4]),
        "Fortran order": ArrayRecord(
            {"a": Array(np.asfortranarray(arrays["a"])), "b": record["b"]}
        ),
        "big-endian": ArrayRecord({"a": Array(arrays["a"].astype(">f4")), "b": record["b"]}),
        "other shape": ArrayRecord({"a": Array(arrays["a"].reshape(4, 3)), "b": record["b"]}),
        "other dtype": arrays_to_record({**arrays, "b": np.ones(5, np.float64)}),
        "missing tensor": ArrayRecord({"a": record["a"]}),
        "extra tensor": ArrayRecord({**dict(record.items()), "c": record["b"]}),
        "renamed tensor": ArrayRecord({"a": record["a"], "c": record["b"]}),
        "not numpy": _with_data(record, "a", data),
    }
    changed = dict(unusual["not numpy"].items())
    changed["a"] = Array(dtype="float32", shape=(3, 4), stype="torch.Tensor", data=data)
    unusual["not numpy"] = ArrayRecord(changed)
    for why, odd in unusual.items():
        assert schema.unpack_record(odd) is None, why
    # Read the general way, Fortran order and big-endian values are the same tensor.
    general = record_to_arrays(unusual["Fortran order"])
    np.testing.assert_array_equal(general["a"], arrays["a"])


# -------------------------------------------------------------------- FFA-LoRA ---

PEFT_SHAPES: dict[str, tuple[int, ...]] = {
    "base_model.model.layers.0.attention.q_proj.lora_A.weight": (4, 32),
    "base_model.model.layers.0.attention.q_proj.lora_B.weight": (32, 4),
    "base_model.model.layers.0.attention.v_proj.lora_A.weight": (4, 64),
    "base_model.model.layers.0.attention.v_proj.lora_B.weight": (64, 4),
    "base_model.model.layers.1.attention.q_proj.lora_A.weight": (8, 16),
    "base_model.model.layers.1.attention.q_proj.lora_B.weight": (16, 8),
    "base_model.model.classifier.weight": (2, 32),
    "base_model.model.classifier.bias": (2,),
}
A_NAMES = sorted(name for name in PEFT_SHAPES if ".lora_A." in name)


def _peft_adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in PEFT_SHAPES.items()
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("base_model.model.layers.0.attention.q_proj.lora_A.weight", True),
        ("base_model.model.layers.0.attention.q_proj.lora_A.default.weight", True),
        ("base_model.model.layers.0.attention.q_proj.lora_B.weight", False),
        ("base_model.model.classifier.weight", False),
        ("lora_A.weight", False),  # the marker is a whole path component
        ("base_model.model.lora_Alpha.weight", False),
        ("base_model.model.x.lora_a.weight", False),
    ],
)
def test_is_lora_a(name: str, expected: bool) -> None:
    assert is_lora_a(name) is expected


def test_seeded_lora_a_is_deterministic_for_the_same_seed_and_name() -> None:
    first = seeded_lora_a(PEFT_SHAPES, seed=7)
    second = seeded_lora_a(dict(PEFT_SHAPES), seed=7)
    assert sorted(first) == A_NAMES == sorted(second)
    for name in A_NAMES:
        assert first[name].tobytes() == second[name].tobytes(), name
    # A party that only knows one module gets the very same matrix for it.
    alone = seeded_lora_a({A_NAMES[1]: PEFT_SHAPES[A_NAMES[1]]}, seed=7)
    np.testing.assert_array_equal(alone[A_NAMES[1]], first[A_NAMES[1]])


def test_seeded_lora_a_differs_across_seeds() -> None:
    zero, one, other = (seeded_lora_a(PEFT_SHAPES, seed) for seed in (0, 1, 12345))
    for name in A_NAMES:
        assert not np.array_equal(zero[name], one[name]), name
        assert not np.array_equal(one[name], other[name]), name
        assert not np.array_equal(zero[name], other[name]), name


def test_seeded_lora_a_differs_across_names_of_the_same_shape() -> None:
    shapes = {
        "m.layers.0.q.lora_A.weight": (4, 32),
        "m.layers.1.q.lora_A.weight": (4, 32),
        "m.layers.0.v.lora_A.weight": (4, 32),
    }
    frozen = seeded_lora_a(shapes, seed=3)
    values = [frozen[name].tobytes() for name in shapes]
    assert len(set(values)) == len(values)


def test_seeded_lora_a_does_not_depend_on_the_order_of_the_mapping() -> None:
    forward = seeded_lora_a(PEFT_SHAPES, seed=9)
    backward = seeded_lora_a(dict(reversed(list(PEFT_SHAPES.items()))), seed=9)
    assert set(forward) == set(backward)
    for name in A_NAMES:
        np.testing.assert_array_equal(forward[name], backward[name])


def test_seeded_lora_a_returns_only_lora_a_tensors() -> None:
    frozen = seeded_lora_a(PEFT_SHAPES, seed=1)
    assert sorted(frozen) == A_NAMES
    assert all(is_lora_a(name) for name in frozen)
    assert seeded_lora_a({"m.classifier.weight": (2, 3), "m.x.lora_B.weight": (3, 2)}, 1) == {}
    assert seeded_lora_a({}, 1) == {}


def test_seeded_lora_a_values_follow_peft_init_bounds() -> None:
    frozen = seeded_lora_a(PEFT_SHAPES, seed=2)
    for name in A_NAMES:
        value = frozen[name]
        assert value.shape == PEFT_SHAPES[name]
        assert value.dtype == np.float32
        bound = 1.0 / np.sqrt(PEFT_SHAPES[name][1])
        assert np.all(np.isfinite(value))
        assert np.all(np.abs(value) <= bound), name
        # Uniform over the whole interval, not a constant or a narrow band.
        assert value.max() > 0.5 * bound and value.min() < -0.5 * bound, name
        assert len(np.unique(value)) == value.size


def test_seeded_lora_a_uses_fan_in_the_second_dimension() -> None:
    wide = seeded_lora_a({"m.x.lora_A.weight": (2, 10_000)}, seed=0)["m.x.lora_A.weight"]
    assert np.abs(wide).max() <= 0.01
    assert np.abs(wide).max() > 0.009  # 20 000 draws reach close to the bound


def test_seeded_lora_a_honours_the_dtype() -> None:
    frozen = seeded_lora_a(PEFT_SHAPES, seed=2, dtype="float64")
    assert all(value.dtype == np.float64 for value in frozen.values())


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_seeded_lora_a_rejects_a_matrix_that_is_not_2d(shape: tuple[int, ...]) -> None:
    shapes = {"m.layers.0.q.lora_A.weight": shape, "m.layers.0.q.lora_B.weight": (4, 2)}
    with pytest.raises(UpdateError, match=r"m\.layers\.0\.q\.lora_A\.weight: .*must be 2-D"):
        seeded_lora_a(shapes, seed=0)


def test_seeded_lora_a_accepts_shapes_given_as_torch_sizes() -> None:
    torch = pytest.importorskip("torch")
    name = "m.layers.0.q.lora_A.weight"
    from_torch = seeded_lora_a({name: torch.zeros(4, 8).shape}, seed=4)
    from_tuple = seeded_lora_a({name: (4, 8)}, seed=4)
    np.testing.assert_array_equal(from_torch[name], from_tuple[name])


def test_lora_pairs_matches_each_a_with_its_b() -> None:
    pairs = lora_pairs(PEFT_SHAPES)
    assert pairs == [
        (
            "base_model.model.layers.0.attention.q_proj.lora_A.weight",
            "base_model.model.layers.0.attention.q_proj.lora_B.weight",
        ),
        (
            "base_model.model.layers.0.attention.v_proj.lora_A.weight",
            "base_model.model.layers.0.attention.v_proj.lora_B.weight",
        ),
        (
            "base_model.model.layers.1.attention.q_proj.lora_A.weight",
            "base_model.model.layers.1.attention.q_proj.lora_B.weight",
        ),
    ]
    # Any iterable of names: a generator, in any order.
    assert lora_pairs(name for name in reversed(list(PEFT_SHAPES))) == pairs


def test_lora_pairs_skips_unpaired_tensors() -> None:
    names = [
        "m.a.lora_A.weight",  # no B
        "m.b.lora_B.weight",  # no A
        "m.c.lora_A.weight",
        "m.c.lora_B.weight",
        "m.classifier.weight",
    ]
    assert lora_pairs(names) == [("m.c.lora_A.weight", "m.c.lora_B.weight")]
    assert lora_pairs([]) == []
    assert lora_pairs(without_lora_a(_peft_adapter())) == []


def test_without_lora_a_keeps_everything_else_untouched() -> None:
    adapter = _peft_adapter()
    kept = without_lora_a(adapter)
    assert sorted(kept) == sorted(set(PEFT_SHAPES) - set(A_NAMES))
    for name, value in kept.items():
        assert value is adapter[name]  # not copied, not converted
    assert set(adapter) == set(PEFT_SHAPES)  # the input is not modified
    assert without_lora_a({}) == {}


def test_without_lora_a_plus_seeded_lora_a_has_the_full_schema() -> None:
    adapter = _peft_adapter()
    rebuilt = {
        **without_lora_a(adapter),
        **seeded_lora_a({k: v.shape for k, v in adapter.items()}, seed=0),
    }
    AdapterSchema.of(adapter).check(rebuilt)
    full, sent = AdapterSchema.of(adapter), AdapterSchema.of(without_lora_a(adapter))
    a_elements = sum(int(np.prod(PEFT_SHAPES[name])) for name in A_NAMES)
    assert full.elements - sent.elements == a_elements
    assert full.payload_bytes - sent.payload_bytes == 4 * a_elements


# ------------------------------------------------------------------ packing ---


def _packable(dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {
        "b.lora_B.weight": rng.standard_normal((6, 2)).astype(dtype),
        "a.lora_A.weight": rng.standard_normal((2, 6)).astype(dtype),
        "head.bias": rng.standard_normal(3).astype(dtype),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_packed_adapter_is_one_vector_with_the_same_tensors(dtype: str) -> None:
    arrays = _packable(dtype)
    packed = AdapterSchema.of(arrays).pack(arrays)
    assert isinstance(packed, PackedAdapter)
    assert packed.flat.shape == (12 + 12 + 3,) and packed.flat.dtype == np.dtype(dtype)
    assert list(packed) == sorted(arrays)  # the schema's order
    for name, value in arrays.items():
        np.testing.assert_array_equal(packed[name], value)
        assert np.shares_memory(packed[name], packed.flat)
    # The same bytes, so the same audit hash as the tensors sent one by one.
    assert adapter_sha256(packed) == adapter_sha256(arrays)


def test_packing_casts_to_the_schema_dtype() -> None:
    arrays = _packable("float16")
    packed = AdapterSchema.of(_packable("float32")).pack(arrays)
    assert packed.flat.dtype == np.float32
    np.testing.assert_array_equal(packed["head.bias"], arrays["head.bias"].astype(np.float32))


def test_unpacking_the_wrong_number_of_values_is_an_update_error() -> None:
    schema = AdapterSchema.of(_packable())
    with pytest.raises(UpdateError, match="27 values, not 26"):
        schema.unpack(np.zeros(26, np.float32))


def test_a_schema_with_two_dtypes_cannot_be_packed() -> None:
    arrays = {**_packable(), "head.bias": np.zeros(3, np.float64)}
    with pytest.raises(UpdateError, match="one dtype"):
        AdapterSchema.of(arrays).pack(arrays)


def test_with_dtype_keeps_names_and_shapes() -> None:
    schema = AdapterSchema.of(_packable())
    wire = schema.with_dtype("float16")
    assert [(n, s) for n, s, _ in wire.entries] == [(n, s) for n, s, _ in schema.entries]
    assert {d for _, _, d in wire.entries} == {"float16"}
    assert wire.payload_bytes == schema.payload_bytes // 2
