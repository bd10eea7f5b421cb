"""Adapter tensors <-> Flower records, and the schema every update must match.

Only the peft adapter state (LoRA matrices and the trainable head) ever crosses the
wire, as Flower ``Array``s (NumPy's ``.npy`` bytes, never pickle).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


def payload_bytes(arrays: Mapping[str, npt.NDArray[np.generic]]) -> int:
    return sum(int(value.nbytes) for value in arrays.values())


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
