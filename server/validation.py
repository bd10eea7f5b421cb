"""Checks every site update must pass before it may be aggregated.

Pure functions over NumPy arrays and plain numbers: a bug, a disk error, a poisoned
update or a lying site each fails one named check, and the reason is what the round's
metrics and logs show. The order matters: the cheap checks that need no decoding (the
payload size, the reported numbers) come before the arrays are even read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord

from common import dp
from common.adapters import AdapterArrays, AdapterSchema, PackedAdapter, record_to_arrays
from common.config import MAX_DELTA, MAX_EPSILON_BUDGET, SMALLEST_COHORT, UpdateValidation
from common.errors import UpdateError
from common.protocol import RoundRequest

ADAM_STEP_BOUND = 0.1 / math.sqrt(1 - 0.999)
"""Adam moves each coordinate at most lr·(1-β1)/√(1-β2) per step (Kingma & Ba, §2.1)."""
NPY_HEADER_ALLOWANCE = 256
"""Bytes per tensor beyond its values that a serialised Flower Array may carry."""
NORM_CHUNK = 1 << 18
"""Values per step of ``packed_update_norm``: its float64 buffer stays in the cache."""
FAST_NORM_CHUNK = 1 << 17
"""Values per step of ``single_precision_norm``: each step's float32 sum of squares is
folded into a float64 total, which bounds its rounding (see FAST_NORM_TOLERANCE)."""
FAST_NORM_TOLERANCE = 0.01
"""Relative error the float32 norm is trusted to. A float32 sum of k squares is within
k·2⁻²⁴ of the exact sum whatever the order (Higham, Accuracy and Stability, §4.2): at
k = 2¹⁷ that is 0.79 %, 0.39 % on the norm; 1 % leaves 2.5× of margin."""
MAX_EVAL_LOSS = 1e4
"""Largest mean held-out loss a reply may report. A classifier's cross-entropy is a few
units (ln k for a uniform guess over k classes); a mean over 1e4 is a broken model or a
lie, and figures near float64's limit would overflow the federated mean and the run's
saved state."""
POISSON_SLACK_SIGMAS = 4.0
"""How far above its expectation a Poisson batch (or a noise vector's norm) is allowed."""


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
    return dp.max_steps_per_round(num_examples, request.batch_size, request.local_epochs)


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
    return min(dp.expected_batch(people, batch_size) for people in candidates)


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
    return request.learning_rate * per_step * steps / (1 - dp.SGD_MOMENTUM)


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


def reference_vector(
    reference: Mapping[str, npt.NDArray[np.floating]], schema: AdapterSchema
) -> npt.NDArray[np.float64]:
    """The reference adapter as one float64 vector in the schema's order: pack it once
    per round (``schema.with_dtype("float64").pack``) and every update reuses it."""
    if (
        isinstance(reference, PackedAdapter)
        and reference.flat.dtype == np.float64
        and list(reference) == [name for name, _, _ in schema.entries]
        and all(reference[name].shape == shape for name, shape, _ in schema.entries)
    ):
        return reference.flat.astype(np.float64, copy=False)
    return schema.with_dtype("float64").pack(reference).flat.astype(np.float64, copy=False)


def packed_update_norm(flat: npt.NDArray[np.floating], reference: npt.NDArray[np.float64]) -> float:
    """``update_norm`` of a packed update against a packed float64 reference, with the
    same float64 differences, in cache-sized steps (NumPy converts float16 one value at
    a time; torch's vectorised casts make this about 4× faster). Not finite exactly
    when some value is not: float16 and float32 squares cannot overflow float64."""
    update, wide = torch.from_numpy(flat), torch.from_numpy(reference)
    narrow = torch.empty(min(NORM_CHUNK, flat.size) if flat.dtype == np.float16 else 0)
    buffer = torch.empty(min(NORM_CHUNK, flat.size), dtype=torch.float64)
    total = 0.0
    for start in range(0, flat.size, NORM_CHUNK):
        stop = min(start + NORM_CHUNK, flat.size)
        difference = buffer[: stop - start]
        if update.dtype == torch.float16:  # via float32: both casts exact and vectorised
            difference.copy_(narrow[: stop - start].copy_(update[start:stop]))
        else:
            difference.copy_(update[start:stop])
        difference.sub_(wide[start:stop])
        total += float(torch.dot(difference, difference))
    return math.sqrt(total)


@dataclass(frozen=True)
class NormReference:
    """The adapter the sites were sent, packed once per round for every update's norm:
    in float64 for the exact norm, in float32 for the fast one, and its own norm."""

    exact: npt.NDArray[np.float64]
    single: torch.Tensor
    norm: float

    @classmethod
    def of(
        cls, reference: Mapping[str, npt.NDArray[np.floating]], schema: AdapterSchema
    ) -> NormReference:
        exact = reference_vector(reference, schema)
        single = torch.from_numpy(exact.astype(np.float32))
        return cls(exact, single, math.sqrt(float(np.dot(exact, exact))))


def single_precision_norm(flat: npt.NDArray[np.floating], reference: torch.Tensor) -> float:
    """``update_norm`` in float32 (3-4× faster than the float64 pass), each step of
    FAST_NORM_CHUNK squares summed in float32 and the steps in float64. Within
    :func:`fast_norm_error` of the exact norm; not finite when some value is not, or
    when a float32 square overflows (then only the exact norm can tell)."""
    update = torch.from_numpy(flat)
    buffer = torch.empty(min(FAST_NORM_CHUNK, flat.size), dtype=torch.float32)
    total = 0.0
    for start in range(0, flat.size, FAST_NORM_CHUNK):
        stop = min(start + FAST_NORM_CHUNK, flat.size)
        difference = buffer[: stop - start]
        difference.copy_(update[start:stop]).sub_(reference[start:stop])
        total += float(torch.dot(difference, difference))
    return math.sqrt(total)


def fast_norm_error(fast_norm: float, reference_norm: float, values: int) -> float:
    """How far the float32 norm of ``values`` differences may lie from the exact one:
    the summation's rounding (FAST_NORM_TOLERANCE of it); one float32 rounding of the
    reference and of each difference, which moves the difference vector by at most 2⁻²⁴
    of the norms of the update and the reference each (2⁻²² covers both, with margin);
    and underflow, which is absolute: a difference below 2⁻⁶³ has a square float32
    cannot hold (with flush-to-zero on, it is lost whole), √values·2⁻⁶² in all."""
    relative = FAST_NORM_TOLERANCE * fast_norm + 2.0**-22 * (fast_norm + 2 * reference_norm)
    return relative + math.sqrt(values) * 2.0**-62


def checked_norm(
    flat: npt.NDArray[np.floating], reference: NormReference, bound: float | None
) -> float:
    """The update's norm, as exact as the bound check needs. The float32 norm when it
    lies clearly on one side of ``bound`` (or there is no bound), its error bounded by
    :func:`fast_norm_error`; the exact float64 norm when it is too close to call, or
    not finite (a NaN, an infinity, or an overflowing float32 square): every accept or
    reject is the one the exact norm gives."""
    fast = single_precision_norm(flat, reference.single)
    if math.isfinite(fast):
        margin = fast_norm_error(fast, reference.norm, flat.size)
        if bound is None or fast + margin < bound or fast - margin > bound:
            return fast
    return packed_update_norm(flat, reference.exact)


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
    _check_privacy(metrics["epsilon"], metrics["epsilon-budget"], metrics["delta"])


def _check_privacy(epsilon: float, budget: float, delta: float) -> None:
    """The privacy a site reports must be one a site config can hold (ε budget in
    (0, 100], δ in (0, 0.01)) and within its own budget: the coordinator's records and
    the run summary show these figures as they are sent."""
    if not 0 < budget <= MAX_EPSILON_BUDGET:
        raise UpdateError(f"reports an ε budget of {budget:g}, outside (0, {MAX_EPSILON_BUDGET:g}]")
    if not 0 <= epsilon <= budget + dp.BUDGET_TOLERANCE:
        raise UpdateError(f"reports ε={epsilon:g}, outside its own budget [0, {budget:g}]")
    if not 0 < delta < MAX_DELTA:
        raise UpdateError(f"reports δ={delta:g}, outside (0, {MAX_DELTA:g})")


def validate_update(
    record: ArrayRecord | None,
    metrics: Mapping[str, float],
    reference: Mapping[str, npt.NDArray[np.floating]] | NormReference,
    schema: AdapterSchema,
    request: RoundRequest,
    limits: UpdateLimits,
) -> tuple[AdapterArrays, float]:
    """The update's arrays and its norm, or UpdateError naming the first failed check.

    ``reference`` is the global adapter the site was sent (what the update moved from);
    pass it as a :class:`NormReference` to pack it once per round.
    """
    if record is None:
        raise UpdateError("reply carries no adapter")
    size = record_payload_bytes(record)
    if size > limits.max_payload_bytes:
        raise UpdateError(
            f"payload of {size} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    check_reported(metrics, request, limits)
    # The run's precision, or full precision: a site from before update_precision sends
    # float32 whatever the request says, and its update is as good (and hashed as sent).
    wire = schema.with_dtype(request.update_dtype)
    arrays = wire.unpack_record(record)
    if arrays is None:
        arrays = schema.unpack_record(record)
    if arrays is None:  # not exactly what NumPy writes: decode, then name what differs
        arrays = _decode_and_pack(record, schema, wire)
    if not isinstance(reference, NormReference):
        reference = NormReference.of(reference, schema)
    bound = _norm_bound(limits, metrics, request, schema)
    norm = checked_norm(arrays.flat, reference, bound)
    if not math.isfinite(norm):
        not_finite = sorted(n for n, value in arrays.items() if not np.isfinite(value).all())
        raise UpdateError(f"non-finite values in {', '.join(not_finite[:3]) or 'the update'}")
    if bound is not None and norm > bound:
        raise UpdateError(f"update norm {norm:.4g} exceeds the bound of {bound:.4g}")
    return arrays, norm


def _norm_bound(
    limits: UpdateLimits,
    metrics: Mapping[str, float],
    request: RoundRequest,
    schema: AdapterSchema,
) -> float | None:
    """The bound this update's norm must keep, or None when the run sets none."""
    if limits.norm_bound == "off":
        return None
    if limits.norm_bound != "derived":
        return limits.norm_bound
    examples = int(metrics["num-examples"])
    return derived_norm_bound(
        request,
        int(metrics["steps"]),
        metrics["noise-multiplier"],
        schema.elements,
        smallest_expected_batch(examples, request.batch_size, SMALLEST_COHORT),
    )


def _decode_and_pack(
    record: ArrayRecord, schema: AdapterSchema, wire: AdapterSchema
) -> PackedAdapter:
    try:
        arrays = record_to_arrays(record)
    except Exception as exc:  # any way bytes from another party fail to decode
        raise UpdateError(f"undecodable arrays: {type(exc).__name__}: {exc}") from None
    full_precision = all(
        str(arrays[name].dtype) == dtype for name, _, dtype in schema.entries if name in arrays
    )
    layout = schema if full_precision else wire
    layout.check(arrays)
    # One contiguous vector per update (the tensors its views, the bytes unchanged): the
    # aggregator then reads each update in one pass instead of one call per tensor.
    return layout.pack(arrays)


def check_evaluation(metrics: Mapping[str, float], limits: UpdateLimits) -> None:
    """An evaluation reply's numbers must be ones an honest site could report: they feed
    the federated accuracy and, through it, the rollback guard."""
    _check_examples(metrics["num-examples"], limits)
    if not 0.0 <= metrics["eval-accuracy"] <= 1.0:
        raise UpdateError(f"eval-accuracy {metrics['eval-accuracy']:g} is not in [0, 1]")
    if not 0 <= metrics["eval-loss"] <= MAX_EVAL_LOSS:
        raise UpdateError(f"eval-loss {metrics['eval-loss']:g} is not in [0, {MAX_EVAL_LOSS:g}]")
