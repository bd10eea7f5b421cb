"""Fault injection for simulated sites: a Flower mod around the honest ClientApp.

A scenario gives a site a :class:`~simulations.scenario.SiteBehaviour`; this mod lets
the site train honestly and then corrupts what it sends, or makes the site fail, crash
or straggle. Nothing here exists in a deployment: the honest ClientApp is unchanged,
and the coordinator meets the faults exactly as it would meet real ones.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.app import SiteResolver, build_client_app
from common.adapters import AdapterArrays, arrays_to_record, record_to_arrays
from common.protocol import SITE_FAILED
from simulations.scenario import SiteBehaviour

logger = logging.getLogger(__name__)

CRASH_EXIT_CODE = 137  # what a SIGKILLed process reports


def corrupt_adapter(
    kind: str, sent: AdapterArrays, trained: AdapterArrays, factor: float
) -> AdapterArrays:
    """The adapter a faulty site sends instead of ``trained`` (``sent``: the global one)."""
    names = sorted(trained)
    corrupted = {name: np.array(value, copy=True, order="C") for name, value in trained.items()}
    first = next((name for name in names if corrupted[name].size), names[0])
    if kind in ("nan", "inf"):
        corrupted[first].reshape(-1)[: max(1, corrupted[first].size // 10)] = (
            np.nan if kind == "nan" else np.inf
        )
    elif kind == "wrong-shape":
        value = corrupted[first]
        corrupted[first] = np.concatenate([value, np.zeros_like(value[:1])])
    elif kind == "missing-keys":
        corrupted = {name: corrupted[name] for name in names[: len(names) // 2]}
    elif kind == "scaled":
        corrupted = {
            name: (sent[name] + factor * (trained[name] - sent[name])).astype(trained[name].dtype)
            for name in names
        }
    elif kind == "oversized":
        elements = sum(value.size for value in trained.values())
        corrupted["padding"] = np.zeros(8 * elements, dtype=np.float32)
    else:
        raise ValueError(f"{kind!r} does not corrupt an adapter")
    return corrupted


@dataclass(frozen=True)
class FaultInjection:
    """The mod: ``behaviours[partition]`` says how each simulated site misbehaves."""

    behaviours: tuple[SiteBehaviour | None, ...]
    resolve_site: SiteResolver

    def __call__(self, message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        behaviour = self.behaviours[int(context.node_config["partition-id"])]
        if behaviour is not None and behaviour.kind == "slow-introduction":
            if message.metadata.message_type == MessageType.QUERY:
                time.sleep(behaviour.delay)
            return call_next(message, context)
        if (
            behaviour is None
            or message.metadata.message_type != MessageType.TRAIN
            or _round_of(message) < behaviour.from_round
        ):
            return call_next(message, context)
        logger.info("injecting %r into this site's round", behaviour.kind)
        if behaviour.kind == "error":
            return Message(
                Error(code=SITE_FAILED, reason="injected fault: the site failed"),
                reply_to=message,
            )
        if behaviour.kind == "crash":
            return _crash_mid_training(message, context, self.resolve_site, behaviour)
        if behaviour.kind == "slow":
            time.sleep(behaviour.delay)
            return call_next(message, context)
        reply = call_next(message, context)
        if reply.has_error():
            return reply
        sent = record_to_arrays(message.content.array_records["arrays"])
        trained = record_to_arrays(reply.content.array_records["arrays"])
        corrupted = corrupt_adapter(behaviour.kind, sent, trained, behaviour.factor)
        reply.content.array_records["arrays"] = arrays_to_record(corrupted)
        return reply


def _round_of(message: Message) -> int:
    config = message.content.config_records.get("config")
    value = config.get("server-round", 1) if config is not None else 1
    return int(value) if isinstance(value, int) else 1


def _crash_mid_training(
    message: Message, context: Context, resolve_site: SiteResolver, behaviour: SiteBehaviour
) -> Message:
    """Train in a child process that is killed after a few optimiser steps.

    A child, because the simulation's worker must survive to serve other sites; what
    the coordinator sees is what Flower reports for a ClientApp whose process died.
    """
    with tempfile.TemporaryDirectory() as scratch:
        job = Path(scratch) / "job.pickle"
        # Our own process wrote it a moment ago; nothing from another party is unpickled.
        job.write_bytes(pickle.dumps((message, context, resolve_site, behaviour.crash_after_steps)))
        child = subprocess.run(
            [sys.executable, "-m", "simulations.faults", str(job)],
            check=False,
            capture_output=True,
            cwd=Path(__file__).resolve().parents[1],  # where `simulations` imports from
        )
    if child.returncode != CRASH_EXIT_CODE:  # the child broke before it could crash
        logger.error("crash injection failed:\n%s", child.stderr.decode(errors="replace"))
    raise RuntimeError(f"the site's process died during training (exit code {child.returncode})")


def _train_until_killed(job: Path) -> None:
    """The child: run the honest ClientApp and die after ``steps`` optimiser steps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    message, context, resolve_site, steps = pickle.loads(job.read_bytes())
    taken = 0

    def die_after_steps(*_args: object) -> None:
        nonlocal taken
        taken += 1
        if taken >= steps:
            os._exit(CRASH_EXIT_CODE)

    register_optimizer_step_post_hook(die_after_steps)
    build_client_app(resolve_site)(message, context)
    os._exit(CRASH_EXIT_CODE)  # trained fewer steps than asked: die at the end instead


def fault_mods(
    behaviours: Sequence[SiteBehaviour | None], resolve_site: SiteResolver
) -> list[Callable[[Message, Context, ClientAppCallable], Message]]:
    """The ClientApp mods for a federation: none when every site is honest."""
    if all(behaviour is None for behaviour in behaviours):
        return []
    return [FaultInjection(tuple(behaviours), resolve_site)]


if __name__ == "__main__":
    _train_until_killed(Path(sys.argv[1]))
