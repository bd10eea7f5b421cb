"""Hand-built Flower reply Messages, as a SuperLink would hand them to the strategy.

A reply normally gets its metadata from the instruction it answers; the instruction
needs a running Flower task identity, so these replies are given their metadata
directly (source node, message type), which is all the strategy reads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from common.adapters import arrays_to_record
from common.protocol import SITE_ID_KEY


def metadata(node_id: int, message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def train_metrics(
    examples: int,
    loss: float = 0.5,
    accuracy: float = 0.75,
    epsilon: float = 1.0,
    *,
    steps: int = 1,
    noise_multiplier: float = 1.1,
) -> dict[str, float | int]:
    """A training reply's metrics. The defaults pass server/validation.py's checks for
    any plausible count (one step is always within ⌈num-examples / batch⌉ · epochs);
    ``train-loss`` and ``train-accuracy`` are extras the strategy must not release."""
    return {
        "num-examples": examples,
        "train-loss": loss,
        "train-accuracy": accuracy,
        "epsilon": epsilon,
        "epsilon-budget": 8.0,
        "delta": 1e-5,
        "noise-multiplier": noise_multiplier,
        "steps": steps,
    }


def nudged(
    reference: Mapping[str, np.ndarray], seed: int, scale: float = 0.01
) -> dict[str, np.ndarray]:
    """An honest-looking update: ``reference`` moved by a little seeded noise, well within
    any norm bound DP-SGD derives for a step."""
    rng = np.random.default_rng(seed)
    return {
        name: (value + scale * rng.standard_normal(value.shape)).astype(value.dtype)
        for name, value in reference.items()
    }


def eval_metrics(examples: int, loss: float, accuracy: float) -> dict[str, float | int]:
    return {"num-examples": examples, "eval-loss": loss, "eval-accuracy": accuracy}


def reply(
    node_id: int,
    *,
    metrics: Mapping[str, float | int] | None,
    arrays: Mapping[str, np.ndarray] | ArrayRecord | None = None,
    site: str | None = None,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A content reply like client.app's: metrics, optional adapter, optional site name."""
    content = RecordDict()
    if metrics is not None:
        content["metrics"] = MetricRecord(dict(metrics))
    if site is not None:
        content["site"] = ConfigRecord({SITE_ID_KEY: site})
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else arrays_to_record(arrays)
    return Message(content, metadata=metadata(node_id, message_type))


def error_reply(
    node_id: int, code: int, reason: str | None, message_type: str = MessageType.TRAIN
) -> Message:
    error = Error(code=code) if reason is None else Error(code=code, reason=reason)
    return Message(error, metadata=metadata(node_id, message_type))
