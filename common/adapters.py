"""Adapter tensors <-> Flower records, and the schema every update must match.

Only the peft adapter state (LoRA matrices and the trainable head) ever crosses the
wire, as Flower ``Array``s (NumPy's ``.npy`` bytes, never pickle).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from common.errors import UpdateError

AdapterArrays = dict[str, npt.NDArray[np.floating]]


def arrays_to_record(arrays: Mapping[str, npt.NDArray[np.generic]]) -> ArrayRecord:
    return ArrayRecord(
        {name: Array(np.require(value, requirements="C")) for name, value in arrays.items()}
    )


def record_to_arrays(record: ArrayRecord) -> AdapterArrays:
    return {name: array.numpy() for name, array in record.items()}


@lru_cache(maxsize=4096)  # a pure function of its arguments: every schema of a run shares it
def npy_header(dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> bytes | None:
    """The header ``np.save`` writes for a C-order array of ``dtype`` and ``shape`` in
    ``.npy`` format 1.0, or None when the header does not fit that format."""
    buffer = io.BytesIO()
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buffer, fields)
    except ValueError:
        return None
    return buffer.getvalue()


def adapter_sha256(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str:
    """One hash of an adapter (names, dtypes, shapes, bytes), the same at the site that
    sent it and at the coordinator that received it: the audit trail's update hash."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        header = f"{name}|{value.dtype.str}|{','.join(map(str, value.shape))}|"
        digest.update(header.encode("utf-8"))
        digest.update(value.tobytes())
    return digest.hexdigest()


def payload_bytes(arrays: Mapping[str, npt.NDArray[np.generic]]) -> int:
    return sum(int(value.nbytes) for value in arrays.values())


class PackedAdapter(dict[str, npt.NDArray[np.floating]]):
    """An adapter whose tensors are views of one contiguous vector, ``flat``."""

    def __init__(
        self, views: Mapping[str, npt.NDArray[np.floating]], flat: npt.NDArray[np.floating]
    ) -> None:
        super().__init__(views)
        self.flat = flat


@dataclass(frozen=True)
class AdapterSchema:
    """Names, shapes and dtypes of the run's adapter, fixed by the initial global adapter."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, npt.NDArray[np.generic]]) -> AdapterSchema:
        return cls(
            tuple(
                (name, tuple(int(d) for d in value.shape), str(value.dtype))
                for name, value in sorted(arrays.items())
            )
        )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Values in each tensor, in the schema's order."""
        return tuple(math.prod(shape) for _, shape, _ in self.entries)

    @cached_property
    def elements(self) -> int:
        return sum(self.sizes)

    @property
    def payload_bytes(self) -> int:
        return sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for _, shape, dtype in self.entries
        )

    def with_dtype(self, dtype: str) -> AdapterSchema:
        """The same tensors in ``dtype``: what an update looks like on the wire."""
        return AdapterSchema(tuple((name, shape, dtype) for name, shape, _ in self.entries))

    def pack(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> PackedAdapter:
        """One contiguous vector in the schema's order and dtype, the tensors its views.

        Aggregating packed updates is one fused operation per update rather than one
        per tensor (a ViT-B/16 adapter has 48), which is what makes 1000 updates fast.
        """
        dtype = np.dtype(self.entries[0][2]) if self.entries else np.dtype(np.float32)
        if any(np.dtype(entry_dtype) != dtype for _, _, entry_dtype in self.entries):
            raise UpdateError("a packed adapter needs one dtype for every tensor")
        flat = (
            np.concatenate(
                [np.asarray(arrays[name], dtype=dtype).reshape(-1) for name, _, _ in self.entries]
            )
            if self.entries
            else np.zeros(0, dtype)
        )
        return self.unpack(flat)

    def unpack(self, flat: npt.NDArray[np.floating]) -> PackedAdapter:
        """The schema's tensors as views of ``flat`` (no copy)."""
        if flat.ndim != 1 or flat.size != self.elements:
            raise UpdateError(f"a packed adapter has {self.elements} values, not {flat.size}")
        views: dict[str, npt.NDArray[np.floating]] = {}
        start = 0
        for (name, shape, _), size in zip(self.entries, self.sizes, strict=True):
            views[name] = flat[start : start + size].reshape(shape)
            start += size
        return PackedAdapter(views, flat)

    @cached_property
    def npy_headers(self) -> tuple[bytes | None, ...]:
        """The ``.npy`` header NumPy writes before each tensor's values (format 1.0, what
        Flower's ``Array`` holds); None where a tensor would need another format."""
        return tuple(npy_header(np.dtype(dtype), shape) for _, shape, dtype in self.entries)

    def unpack_record(self, record: ArrayRecord) -> PackedAdapter | None:
        """The record read straight from its bytes into one packed vector (one copy), or
        None unless every tensor is exactly what NumPy writes for the schema's tensor:
        then the general decoder (``record_to_arrays``) and ``check`` name what differs.

        NumPy's own loader parses each header with ``ast.literal_eval``; for a ViT-B/16
        adapter's 48 tensors that costs more than reading the values. Comparing the bytes
        with the header the schema implies is exact and strict: a tensor that is not C
        order, little-endian, of the schema's dtype and shape, or that carries a byte
        more or less, takes the general path.
        """
        if len(record) != len(self.entries) or not self.entries:
            return None
        dtype = np.dtype(self.entries[0][2])
        if any(entry_dtype != self.entries[0][2] for _, _, entry_dtype in self.entries):
            return None
        flat = np.empty(self.elements, dtype)
        start = 0
        layout = zip(self.entries, self.sizes, self.npy_headers, strict=True)
        for (name, _, _), size, header in layout:
            array = record.get(name)
            if (
                header is None
                or array is None
                or array.stype != "numpy.ndarray"
                or len(array.data) != len(header) + size * dtype.itemsize
                or memoryview(array.data)[: len(header)] != header
            ):
                return None
            flat[start : start + size] = np.frombuffer(array.data, dtype, size, len(header))
            start += size
        return self.unpack(flat)

    def check(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Raise UpdateError naming the first mismatch (missing, extra, shape, dtype)."""
        expected = {name: (shape, dtype) for name, shape, dtype in self.entries}
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise UpdateError(f"missing tensors: {', '.join(missing[:3])}")
        extra = sorted(set(arrays) - set(expected))
        if extra:
            raise UpdateError(f"unexpected tensors: {', '.join(extra[:3])}")
        for name, (shape, dtype) in expected.items():
            value = arrays[name]
            if tuple(value.shape) != shape:
                raise UpdateError(f"{name}: shape {tuple(value.shape)}, expected {shape}")
            if str(value.dtype) != dtype:
                raise UpdateError(f"{name}: dtype {value.dtype}, expected {dtype}")


# ------------------------------------------------------------------ FFA-LoRA ---
#
# FFA-LoRA freezes every LoRA A matrix at a random initialisation shared by the run and
# trains B only. Each site's update is then B_k·A with the same A, so the mean of the
# B_k times A *is* the mean of the updates: aggregation is exact, and only B (about
# half of the LoRA tensors) travels. A is never sent: every party regenerates it from
# the run's seed and the tensor's name.

LORA_A_MARKER = ".lora_A."


def is_lora_a(name: str) -> bool:
    return LORA_A_MARKER in name


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA module in an adapter's tensor names."""
    present = set(names)
    pairs = []
    for name in sorted(present):
        if is_lora_a(name):
            partner = name.replace(LORA_A_MARKER, ".lora_B.")
            if partner in present:
                pairs.append((name, partner))
    return pairs


def without_lora_a(arrays: Mapping[str, npt.NDArray[np.floating]]) -> AdapterArrays:
    return {name: value for name, value in arrays.items() if not is_lora_a(name)}


def lora_a_dtype(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str:
    """The dtype of an adapter's LoRA A matrices: FFA-LoRA regenerates them in it."""
    return next((str(v.dtype) for k, v in sorted(arrays.items()) if is_lora_a(k)), "float32")


def seeded_lora_a(
    shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: str = "float32"
) -> AdapterArrays:
    """The run's frozen A matrices: peft's own init distribution, U(±1/√fan_in), drawn
    from a generator keyed by the run's seed and each tensor's name (so the order in
    which parties build them does not matter)."""
    frozen: AdapterArrays = {}
    for name, shape in sorted(shapes.items()):
        if not is_lora_a(name):
            continue
        if len(shape) != 2:
            raise UpdateError(f"{name}: a LoRA A matrix must be 2-D, got shape {shape}")
        key = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
        generator = np.random.default_rng(int.from_bytes(key[:16], "big"))
        bound = 1.0 / np.sqrt(shape[1])
        frozen[name] = generator.uniform(-bound, bound, size=shape).astype(dtype)
    return frozen


@dataclass(frozen=True)
class AdapterLayout:
    """Which tensors of a run's adapter train and travel, and which stay frozen.

    Under FFA-LoRA (``freeze_lora_a``) the A matrices are never sent: every party
    regenerates them from the run's seed, and only B (and the head) train. Otherwise
    every tensor trains and travels. Sites and coordinator split adapters with this
    one rule.
    """

    freeze_lora_a: bool = False
    seed: int = 0

    def is_trained(self, name: str) -> bool:
        return not (self.freeze_lora_a and is_lora_a(name))

    def trained(self, arrays: Mapping[str, npt.NDArray[np.floating]]) -> AdapterArrays:
        """The tensors that train and travel."""
        return {name: value for name, value in arrays.items() if self.is_trained(name)}

    def frozen(self, like: Mapping[str, npt.NDArray[np.floating]]) -> AdapterArrays:
        """The frozen tensors of an adapter shaped ``like`` (regenerated, never sent)."""
        if not self.freeze_lora_a:
            return {}
        shapes = {name: tuple(value.shape) for name, value in like.items()}
        return seeded_lora_a(shapes, self.seed, dtype=lora_a_dtype(like))

    def complete(
        self,
        received: Mapping[str, npt.NDArray[np.floating]],
        local: Mapping[str, npt.NDArray[np.floating]],
    ) -> AdapterArrays:
        """The whole adapter from the tensors that travelled and a local adapter of the
        same model (for names, shapes and dtypes): the received tensors must be exactly
        the trained ones; the frozen ones are regenerated."""
        AdapterSchema.of(self.trained(local)).check(received)
        whole = {**received, **self.frozen(local)}
        AdapterSchema.of(local).check(whole)
        return whole
