"""Checks every site update must pass before it may be aggregated.

Pure functions over NumPy arrays and plain numbers: a bug, a disk error, a poisoned
update or a lying site each fails one named check, and the reason is what the round's
metrics and logs show. The order matters: the cheap checks that need no decoding (the
payload size, the reported numbers) come before the arrays are even read, then the
decoding, the schema, the values (finite, within the norm bound).

Fast enough for a thousand sites a round: a tensor whose bytes are exactly what
``np.save`` writes for its expected name, dtype and shape is viewed in place (its header
proves its schema), and the norm is one float32 pass over buffers reused from update to
update. A sum of squares is finite iff every value is: no separate pass for NaN/inf.
"""

from __future__ import annotations

import io
import math
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord

from common.adapters import AdapterArrays, AdapterSchema
from common.config import SMALLEST_COHORT, UpdateValidation
from common.errors import UpdateError
from common.protocol import RoundRequest

SGD_MOMENTUM = 0.9
"""The momentum of the sites' SGD (client/training.py): it lets past steps add up."""
ADAM_STEP_BOUND = 0.1 / math.sqrt(1 - 0.999)
"""Adam moves each coordinate at most lr·(1-β1)/√(1-β2) per step (Kingma & Ba, §2.1)."""
NPY_HEADER_ALLOWANCE = 256
"""Bytes per tensor beyond its values that a serialised Flower Array may carry."""
POISSON_SLACK_SIGMAS = 4.0
"""How far above its expectation a Poisson batch (or a noise vector's norm) is allowed."""
NUMPY_STYPE = "numpy.ndarray"
"""How a Flower Array says its bytes are an ``.npy`` file."""

VectorFold = Callable[[npt.NDArray[np.floating], float], None]
"""Takes an accepted update as one vector in the schema's order (float32, or float64 for
a float64 adapter) and its weight (num-examples): fedavg's ``StreamingMean.add``. The
vector is a buffer the next validation overwrites: it must be read before returning."""


@dataclass(frozen=True)
class UpdateLimits:
    """The run's limits, with the derived defaults filled in."""

    max_payload_bytes: int
    min_examples: int
    max_examples: int
    norm_bound: float | Literal["derived", "off"]

    @classmethod
    def for_run(cls, settings: UpdateValidation, schema: AdapterSchema) -> UpdateLimits:
        return cls(
            max_payload_bytes=settings.max_payload_bytes
            or 2 * (schema.payload_bytes + NPY_HEADER_ALLOWANCE * len(schema.entries)),
            min_examples=settings.min_examples,
            max_examples=settings.max_examples,
            norm_bound=settings.max_update_norm,
        )


def record_payload_bytes(record: ArrayRecord) -> int:
    """Bytes of every array in a record, read from the serialised buffers (no decoding)."""
    return sum(len(array.data) for array in record.values())


def max_local_steps(num_examples: int, request: RoundRequest) -> int:
    """The most optimiser steps an honest site with ``num_examples`` records takes in a
    round: Opacus runs ⌈people / batch⌉ batches an epoch, and people ≤ records."""
    return request.local_epochs * max(1, math.ceil(num_examples / request.batch_size))


def _expected_batch(people: int, batch_size: int) -> int:
    """Opacus's expected batch for ``people``: int(people · q), q = 1/⌈people / B⌉."""
    return max(1, int(people * (1.0 / math.ceil(people / batch_size))))


def smallest_expected_batch(records: int, batch_size: int, min_people: int) -> int:
    """The smallest expected batch Opacus can divide by at an honest site.

    Opacus divides the noisy sum by int(people · q) with q = 1/⌈people / B⌉: all the
    people when they are fewer than B, and about B/2 or more above. The server knows
    records, not people (min_people ≤ people ≤ records), so it takes the least value
    over that range. Within a block of people sharing ⌈people / B⌉ the value grows with
    people, and each block's least value exceeds the one before, so the least over the
    range is at its lower end or at the start of the next block.
    """
    low = max(1, min(min_people, records))
    candidates = [low]
    next_block = math.ceil(low / batch_size) * batch_size + 1
    if next_block <= records:
        candidates.append(next_block)
    return min(_expected_batch(people, batch_size) for people in candidates)


def derived_norm_bound(
    request: RoundRequest,
    steps: int,
    noise_multiplier: float,
    trainable: int,
    expected_batch: int | None = None,
) -> float:
    """The largest L2 norm an honest DP-SGD round can give an update (w.h.p.).

    Per step: the clipped sum over a Poisson batch (at most E + 1 + 4√(E + 1) people,
    each at most C) plus Gaussian noise of norm at most σC(√d + 4), divided by the
    expected batch E (``expected_batch``; the run's batch size when not given). SGD's
    momentum lets the steps add up to 1/(1 - β) times each; Adam normalises the
    gradient away, so its bound comes from its per-coordinate step limit instead.
    """
    if request.optimizer == "adam":
        return request.learning_rate * ADAM_STEP_BOUND * math.sqrt(trainable) * steps
    batch = expected_batch or request.batch_size
    clip = request.max_grad_norm
    per_step = clip * (
        1
        + (1 + POISSON_SLACK_SIGMAS * math.sqrt(batch + 1)) / batch
        + noise_multiplier * (math.sqrt(trainable) + POISSON_SLACK_SIGMAS) / batch
    )
    return request.learning_rate * per_step * steps / (1 - SGD_MOMENTUM)


def update_norm(
    update: Mapping[str, npt.NDArray[np.floating]],
    reference: Mapping[str, npt.NDArray[np.floating]],
) -> float:
    """L2 norm of ``update - reference`` over every tensor, in float64."""
    total = 0.0
    for name, value in update.items():
        difference = np.asarray(value, dtype=np.float64) - np.asarray(
            reference[name], dtype=np.float64
        )
        total += float(np.dot(difference.ravel(), difference.ravel()))
    return math.sqrt(total)


def npy_header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    """The header ``np.save`` writes before the values of a C-ordered array."""
    buffer, descr = io.BytesIO(), np.lib.format.dtype_to_descr(dtype)
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


@dataclass(frozen=True, eq=False)
class WireLayout:
    """An adapter in one dtype as the wire carries it (each tensor's exact ``.npy`` header
    and size) and as one vector (each tensor's place in it, in the schema's order)."""

    dtype: np.dtype[Any]
    names: tuple[str, ...]
    slots: Mapping[str, tuple[bytes, int, int, tuple[int, ...]]]
    """name -> (header, bytes with the header, values, shape)."""
    elements: int

    @classmethod
    def of(cls, schema: AdapterSchema) -> WireLayout | None:
        """The schema's layout; None when its tensors differ in dtype (no one vector)."""
        dtypes = {dtype for _, _, dtype in schema.entries}
        if len(dtypes) > 1:
            return None
        dtype = np.dtype(dtypes.pop() if dtypes else "float32")
        slots = {}
        for name, shape, _ in schema.entries:
            header, values = npy_header(shape, dtype), math.prod(shape)
            slots[name] = (header, len(header) + values * dtype.itemsize, values, shape)
        elements = sum(values for _, _, values, _ in slots.values())
        return cls(dtype, tuple(name for name, _, _ in schema.entries), slots, elements)


_LAYOUTS: dict[tuple[int, str], tuple[AdapterSchema, tuple[WireLayout, ...]]] = {}
"""(id(schema), update dtype) -> (the schema, kept so that its id stays its own; layouts)."""


def wire_layouts(schema: AdapterSchema, update_dtype: str) -> tuple[WireLayout, ...]:
    """The layouts an update may come in: the run's update precision, then full precision
    (a site from before update_precision sends float32 whatever the request says)."""
    cached = _LAYOUTS.get((id(schema), update_dtype))
    if cached is not None and cached[0] is schema:
        return cached[1]
    wire, full = WireLayout.of(schema.with_dtype(update_dtype)), WireLayout.of(schema)
    if full is not None and wire is not None and full.dtype == wire.dtype:
        full = None
    layouts = tuple(layout for layout in (wire, full) if layout is not None)
    if len(_LAYOUTS) >= 16:
        _LAYOUTS.clear()
    _LAYOUTS[(id(schema), update_dtype)] = (schema, layouts)
    return layouts


def decode_arrays(
    record: ArrayRecord, layouts: Sequence[WireLayout] = ()
) -> tuple[AdapterArrays, WireLayout | None]:
    """The record's arrays, and the layout that every one of them matched, if one did.

    A tensor whose bytes are exactly a layout's header and values is a read-only view of
    the record's bytes (no copy); any other is decoded by ``np.load`` as before, and its
    failure is an UpdateError. When every tensor matched the same layout, that layout's
    names, shapes and dtype are proven, and the schema check need not run.
    """
    arrays: AdapterArrays = {}
    proof: WireLayout | None = None
    consistent = True
    order = tuple(layouts)
    for name, array in record.items():
        layout = _matching_layout(name, array.data, array.stype, order)
        if layout is None:
            try:
                arrays[name] = array.numpy()
            except Exception as exc:  # any way bytes from another party fail to decode
                raise UpdateError(f"undecodable arrays: {type(exc).__name__}: {exc}") from None
            consistent = False
            continue
        header, _, values, shape = layout.slots[name]
        arrays[name] = np.frombuffer(array.data, layout.dtype, values, len(header)).reshape(shape)
        if proof is None:
            proof = layout
            order = (layout, *(other for other in order if other is not layout))
        elif layout is not proof:
            consistent = False
    if proof is None or not consistent or len(arrays) != len(proof.names):
        return arrays, None
    return arrays, proof


def _matching_layout(
    name: str, data: bytes, stype: str, layouts: Sequence[WireLayout]
) -> WireLayout | None:
    for layout in layouts:
        slot = layout.slots.get(name)
        if slot is not None and len(data) == slot[1] and data.startswith(slot[0]):
            return layout if stype == NUMPY_STYPE else None
    return None


def check_schema(arrays: AdapterArrays, schema: AdapterSchema, request: RoundRequest) -> None:
    """Every tensor the schema names, in its shape, all in the run's precision or all in
    full precision (as good, and hashed as sent); UpdateError naming the first mismatch."""
    full_precision = all(
        str(arrays[name].dtype) == dtype for name, _, dtype in schema.entries if name in arrays
    )
    wire = schema if full_precision else schema.with_dtype(request.update_dtype)
    wire.check(arrays)
    if WireLayout.of(wire) is None:
        wire.pack(arrays)  # raises: an update of mixed dtypes is no one vector


def check_finite(arrays: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Every value finite; UpdateError naming the first (sorted) tensors that are not."""
    not_finite = sorted(name for name, value in arrays.items() if not np.isfinite(value).all())
    if not_finite:
        raise UpdateError(f"non-finite values in {', '.join(not_finite[:3])}")


class _Scratch:
    """What checking updates against one reference reuses from one update to the next:
    the reference as one vector, and the buffers the norm is computed in. One per
    thread (see ``_scratch_for``); its reference is the round's sent adapter."""

    def __init__(self, reference: Mapping[str, npt.NDArray[np.floating]], names: tuple[str, ...]):
        self.source = reference
        self.names = names
        self.arrays = tuple(reference[name] for name in names)
        self.work = np.result_type(np.float32, *(value.dtype for value in self.arrays))
        flat = np.concatenate(self.arrays, axis=None, dtype=self.work) if names else np.zeros(0)
        self.reference = torch.from_numpy(flat.astype(self.work, copy=False))
        self.values = torch.empty_like(self.reference)
        self.difference = torch.empty_like(self.reference)
        self.staging: dict[np.dtype[Any], npt.NDArray[np.floating]] = {}

    def serves(self, reference: Mapping[str, npt.NDArray[np.floating]], layout: WireLayout) -> bool:
        return (
            self.source is reference
            and self.names == layout.names
            and all(map(operator.is_, self.arrays, map(reference.__getitem__, self.names)))
            and np.result_type(self.work, layout.dtype) == self.work
        )

    def squared_distance(self, arrays: AdapterArrays, layout: WireLayout) -> float:
        """Σ (update − reference)², in the work dtype; leaves the update in ``values``."""
        if not self.names:
            return 0.0
        tensors = [arrays[name] for name in self.names]
        values = self.values.numpy()
        if layout.dtype == self.work:
            np.concatenate(tensors, axis=None, out=values)
        else:  # float16 on the wire: gathered as sent, converted once (torch: SIMD)
            staged = self.staging.get(layout.dtype)
            if staged is None:
                staged = self.staging.setdefault(layout.dtype, np.empty(values.size, layout.dtype))
            np.concatenate(tensors, axis=None, out=staged)
            self.values.copy_(torch.from_numpy(staged))
        torch.sub(self.values, self.reference, out=self.difference)
        return float(torch.dot(self.difference, self.difference))


_SCRATCH = threading.local()


def _scratch_for(reference: Mapping[str, npt.NDArray[np.floating]], layout: WireLayout) -> _Scratch:
    """The thread's scratch for ``reference``: kept while the same reference (the same
    arrays, which validation never writes) is checked against, rebuilt otherwise."""
    scratch: _Scratch | None = getattr(_SCRATCH, "last", None)
    if scratch is None or not scratch.serves(reference, layout):
        scratch = _SCRATCH.last = _Scratch(reference, layout.names)
    return scratch


def check_norm(
    arrays: AdapterArrays,
    layout: WireLayout,
    reference: Mapping[str, npt.NDArray[np.floating]],
    bound: float | Literal["off"],
) -> float:
    """The update's norm once its values are finite and within ``bound``; UpdateError
    otherwise.

    One float32 pass, relative error at most (n + 3)·ε/2 (n values, ε float32's epsilon:
    n squares summed in any order), ~1e-7 in practice. Closer than that to the bound, or
    when the float32 sum overflowed (values finite, squares not), the norm is redone in
    float64: the verdict is always that of the exact norm.
    """
    scratch = _scratch_for(reference, layout)
    squared = scratch.squared_distance(arrays, layout)
    if math.isfinite(squared):
        norm = math.sqrt(squared)
        slack = (layout.elements + 3) * float(np.finfo(scratch.work).eps) / 2
        if bound != "off" and abs(norm - bound) <= slack * bound:
            norm = update_norm(arrays, reference)
    else:  # a NaN or inf among the values, or a float32 overflow of finite ones
        check_finite(arrays)
        norm = update_norm(arrays, reference)
    if bound != "off" and norm > bound:
        raise UpdateError(f"update norm {norm:.4g} exceeds the bound of {bound:.4g}")
    return norm


def _check_examples(examples: float, limits: UpdateLimits) -> None:
    if not limits.min_examples <= examples <= limits.max_examples:
        raise UpdateError(
            f"num-examples {examples:g} outside the accepted range "
            f"[{limits.min_examples}, {limits.max_examples}]"
        )


def check_reported(
    metrics: Mapping[str, float], request: RoundRequest, limits: UpdateLimits
) -> None:
    """The numbers a training reply reports must be ones an honest site could report."""
    examples = metrics["num-examples"]
    _check_examples(examples, limits)
    steps = metrics["steps"]
    if (
        steps < 1
        or not float(steps).is_integer()
        or steps > max_local_steps(int(examples), request)
    ):
        raise UpdateError(
            f"reports {steps:g} steps; {int(examples)} records allow 1 to "
            f"{max_local_steps(int(examples), request)}"
        )
    sigma = metrics["noise-multiplier"]
    if request.noise_multiplier > 0 and not math.isclose(sigma, request.noise_multiplier):
        raise UpdateError(f"reports σ={sigma:g}; the run fixed σ={request.noise_multiplier:g}")
    if not 0 <= sigma <= 1000:
        raise UpdateError(f"reports an implausible noise multiplier {sigma:g}")


def check_payload(record: ArrayRecord | None, limits: UpdateLimits) -> ArrayRecord:
    """The record, if there is one and its bytes (never decoded here) are within limits."""
    if record is None:
        raise UpdateError("reply carries no adapter")
    size = record_payload_bytes(record)
    if size > limits.max_payload_bytes:
        raise UpdateError(
            f"payload of {size} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    return record


def reply_norm_bound(
    metrics: Mapping[str, float], request: RoundRequest, limits: UpdateLimits, trainable: int
) -> float | Literal["off"]:
    """The run's bound on this reply's norm: explicit, off, or derived from its numbers."""
    if limits.norm_bound != "derived":
        return limits.norm_bound
    return derived_norm_bound(
        request,
        int(metrics["steps"]),
        metrics["noise-multiplier"],
        trainable,
        smallest_expected_batch(int(metrics["num-examples"]), request.batch_size, SMALLEST_COHORT),
    )


def validate_update(
    record: ArrayRecord | None,
    metrics: Mapping[str, float],
    reference: Mapping[str, npt.NDArray[np.floating]],
    schema: AdapterSchema,
    request: RoundRequest,
    limits: UpdateLimits,
    *,
    fold: VectorFold | None = None,
) -> tuple[AdapterArrays, float]:
    """The update's arrays and its norm, or UpdateError naming the first failed check.

    ``reference`` is the global adapter the site was sent (what the update moved from);
    it must not be written to while updates are checked against it. The arrays are
    read-only views of the record's bytes where those are well formed. ``fold``, if
    given, receives the accepted update as one vector with its weight, num-examples
    (fedavg folds it into its running sum while it is still in cache).
    """
    record = check_payload(record, limits)
    check_reported(metrics, request, limits)
    layouts = wire_layouts(schema, request.update_dtype)
    arrays, layout = decode_arrays(record, layouts)
    if layout is None:
        check_schema(arrays, schema, request)
        layout = next(one for one in layouts if all(a.dtype == one.dtype for a in arrays.values()))
    bound = reply_norm_bound(metrics, request, limits, layout.elements)
    norm = check_norm(arrays, layout, reference, bound)
    if fold is not None:  # the update as the norm's pass left it, in this thread's buffer
        fold(_SCRATCH.last.values.numpy(), metrics["num-examples"])
    return arrays, norm


def check_evaluation(metrics: Mapping[str, float], limits: UpdateLimits) -> None:
    """An evaluation reply's numbers must be ones an honest site could report: they feed
    the federated accuracy and, through it, the rollback guard."""
    _check_examples(metrics["num-examples"], limits)
    if not 0.0 <= metrics["eval-accuracy"] <= 1.0:
        raise UpdateError(f"eval-accuracy {metrics['eval-accuracy']:g} is not in [0, 1]")
    if metrics["eval-loss"] < 0:
        raise UpdateError(f"eval-loss {metrics['eval-loss']:g} is negative")
