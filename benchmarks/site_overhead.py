"""What a site spends outside training, per message, with and without its site service.

    python -m benchmarks --only site_overhead
    python -m benchmarks.site_overhead [--quick] [--layers N] [--no-real-size]

The same messages (an introduction, then per round a training and an evaluation
message, as the coordinator sends them) go to a site's ClientApp two ways, side by side
on copies of the same site:

* ``rebuilt``: the site is built anew for every message, as fedlora did before its site
  service: config read, data read and hashed, base model hashed and loaded each time;
* ``service``: one app and one Site for the whole run (client/service.py), as in the
  site's long-lived ClientApp process.

Cases: a hospital (DICOM) and a bank (table) of the default scenario, and a text site
on the DeepSeek-R1-Distill-Qwen-1.5B shape with random weights (every dimension of its
config.json; 1.5B parameters, ~6 GB of float32 weights on disk).

Measured per training message: arrival to the first optimiser step; per round: the
site's non-training time, the training and evaluation messages' wall time less the
optimiser steps' span and the evaluation's forward passes. Target after the first
round: ≤ 1 s and ≤ 5 % of the round.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim import optimizer as torch_optimizer

from benchmarks.fixtures import Template
from benchmarks.measure import verdict
from benchmarks.results import report
from benchmarks.text_real_size import save_base_model
from client.app import build_client_app
from client.service import process_site_cache
from client.training import DPTrainer
from common.adapters import arrays_to_record
from common.cli import configure_logging
from common.config import FederationConfig, LoraSettings
from common.protocol import RoundRequest
from common.tasks import TASKS, model_fingerprint
from server.aggregation import AGGREGATORS
from server.run import adapter_arrays, initial_model
from simulations.generators.text import (
    LABEL_COLUMN,
    PERSON_COLUMNS,
    TEXT_CLASSES,
    TEXT_COLUMNS,
    write_texts,
)

logger = logging.getLogger(__name__)

TARGET_SECONDS = 1.0
TARGET_SHARE = 0.05
REAL_SIZE_PRESET = "r1-distill-qwen-1.5b"
MODES = ("rebuilt", "service")


@dataclass
class _Clock:
    """Training and evaluation of the message being timed: training runs from the first
    forward pass of the model under training to the end of its last optimiser step."""

    first_forward: float | None = None
    first_step: float | None = None
    last_step: float | None = None
    evaluating: float = 0.0

    def forward(self, module: torch.nn.Module, *_: object) -> None:
        if self.first_forward is None and module.training:
            self.first_forward = time.perf_counter()

    def step_started(self, *_: object) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter()

    def step_done(self, *_: object) -> None:
        self.last_step = time.perf_counter()


@dataclass
class MessageTiming:
    seconds: float
    first_step_after: float | None = None
    """Arrival to the first optimiser step (training messages)."""
    work: float = 0.0
    """Training (first forward pass to the last step's end), or the evaluation."""

    @property
    def overhead(self) -> float:
        return max(self.seconds - self.work, 0.0)


@dataclass
class Case:
    name: str
    config: Path
    federation: FederationConfig
    rounds: int
    timings: dict[str, list[tuple[MessageTiming, MessageTiming]]] = field(default_factory=dict)


@contextmanager
def _timed(clock: _Clock) -> Iterator[None]:
    """Global optimiser hooks and a timed DPTrainer.evaluate, for one message."""
    pre = torch_optimizer.register_optimizer_step_pre_hook(clock.step_started)
    post = torch_optimizer.register_optimizer_step_post_hook(clock.step_done)
    forward = register_module_forward_pre_hook(clock.forward)
    evaluate = DPTrainer.evaluate

    def timed_evaluate(self: DPTrainer, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            clock.evaluating += time.perf_counter() - started

    DPTrainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    try:
        yield
    finally:
        DPTrainer.evaluate = evaluate  # type: ignore[method-assign]
        pre.remove()
        post.remove()
        forward.remove()


def _send(app: Callable[..., Message], message: Message, context: Context) -> MessageTiming:
    clock = _Clock()
    with _timed(clock):
        started = time.perf_counter()
        reply = app(message=message, context=context)
        seconds = time.perf_counter() - started
    if reply.has_error():
        raise RuntimeError(f"the site refused a benchmark message: {reply.error.reason}")
    if clock.first_step is None or clock.last_step is None or clock.first_forward is None:
        return MessageTiming(seconds, work=clock.evaluating)
    return MessageTiming(
        seconds, clock.first_step - started, work=clock.last_step - clock.first_forward
    )


def _messages(case: Case, run: str) -> Iterator[tuple[str, Message]]:
    federation = case.federation
    spec = TASKS.get(federation.task)
    model = initial_model(federation)
    freeze = AGGREGATORS.get(federation.aggregator).freezes_lora_a
    digest = model_fingerprint(federation.base_model)
    yield "introduce", Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    for server_round in range(1, case.rounds + 1):
        request = RoundRequest.for_round(
            federation,
            digest,
            server_round,
            spec.lora_targets(model.config),
            freeze_lora_a=freeze,
            run_id=run,
        )
        adapter = arrays_to_record(request.layout.trained(adapter_arrays(model)))
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            content = RecordDict({"arrays": adapter, "config": request.to_record()})
            yield kind, Message(content, dst_node_id=1, message_type=kind)


def run_case(case: Case, mode: str) -> list[tuple[MessageTiming, MessageTiming]]:
    """The case's messages in ``mode``; (training, evaluation) timings per round."""
    cache = process_site_cache()
    cache.clear()
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(case.config)},
        state=RecordDict(),
        run_config={},
    )
    app = build_client_app()
    rounds: list[tuple[MessageTiming, MessageTiming]] = []
    train: MessageTiming | None = None
    for kind, message in _messages(case, f"bench-{mode}"):
        if mode == "rebuilt":
            cache.clear()  # every message builds its site anew
        timing = _send(app, message, context)
        if kind == MessageType.TRAIN:
            train = timing
        elif kind == MessageType.EVALUATE and train is not None:
            rounds.append((train, timing))
            logger.info(
                "%s %s round %d: %.2f s, of which %.2f s outside training",
                case.name,
                mode,
                len(rounds),
                train.seconds + timing.seconds,
                train.overhead + timing.overhead,
            )
    cache.clear()
    return rounds


def summarise(timings: list[tuple[MessageTiming, MessageTiming]]) -> dict[str, Any]:
    rounds: list[dict[str, float]] = [
        {
            "round_seconds": round(train.seconds + evaluation.seconds, 3),
            "overhead_seconds": round(train.overhead + evaluation.overhead, 3),
            "first_step_seconds": round(train.first_step_after or 0.0, 3),
        }
        for train, evaluation in timings
    ]
    later = rounds[1:] or rounds
    overhead = max(r["overhead_seconds"] for r in later)
    share = max(r["overhead_seconds"] / r["round_seconds"] for r in later)
    return {
        "rounds": rounds,
        "later_overhead_seconds": overhead,
        "later_overhead_share": round(share, 4),
        "later_first_step_seconds": max(r["first_step_seconds"] for r in later),
    }


def text_case(root: Path, model_dir: Path, rounds: int) -> Case:
    """A hospital of radiology reports on the real-size preset's shape (its own copy of
    the site under ``root``; the base model in ``model_dir`` is shared, read-only)."""
    site = root / "sites" / "hospital-text"
    texts = write_texts(site / "data" / "texts.csv", kind="hospital", people=100, seed=7)
    document = {
        "site": {
            "id": "hospital-text",
            "kind": "hospital",
            "task": "text-classification",
            "base_model": str(model_dir),
            "state_dir": str(site / "state"),
        },
        "privacy": {"epsilon": 8.0, "delta": 1e-5},
        "policy": {"min_cohort": 20},
        "data": {
            "format": "csv",
            "path": str(texts),
            "classes": TEXT_CLASSES,
            "text_column": TEXT_COLUMNS["hospital"],
            "label_column": LABEL_COLUMN,
            "person_column": PERSON_COLUMNS["hospital"],
            "max_tokens": 32,
        },
    }
    config = site / "site.toml"
    config.write_text(tomli_w.dumps(document))
    federation = FederationConfig(
        task="text-classification",
        base_model=model_dir,
        rounds=rounds,
        batch_size=16,
        learning_rate=0.05,
        lora=LoraSettings(r=8),
    )
    return Case(f"text {REAL_SIZE_PRESET}", config, federation, rounds)


def template_cases(template: Template, mode: str, rounds: int) -> list[Case]:
    """One site per task of the default scenario, on a fresh copy for ``mode``."""
    prepared, _ = template.run(f"site-overhead-{mode}", rounds=rounds)
    cases = []
    for task, configs in sorted(prepared.site_configs.items()):
        federation = prepared.federations[task]
        cases.append(Case(task, configs[0], federation, rounds))
    return cases


def run(
    template: Template | None, quick: bool, real_size: bool = True, layers: int | None = None
) -> dict[str, Any]:
    rounds = 2 if quick else 3
    figures: dict[str, Any] = {"rounds": rounds, "cases": {}}
    previous = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    # Flower stamps messages with the identity of the task that makes them.
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = 1
    try:
        with tempfile.TemporaryDirectory(prefix="fedlora-site-overhead-") as scratch:
            model_dir = Path(scratch) / "models" / REAL_SIZE_PRESET
            if real_size:
                size = layers if layers is not None else (4 if quick else None)
                parameters = save_base_model(REAL_SIZE_PRESET, size, model_dir)
                logger.info("%s: %.2fB parameters saved", REAL_SIZE_PRESET, parameters / 1e9)
            by_mode: dict[str, list[Case]] = {}
            for mode in MODES:
                cases = template_cases(template, mode, rounds) if template is not None else []
                if real_size:
                    cases.append(text_case(Path(scratch) / mode, model_dir, rounds))
                by_mode[mode] = cases
            for index, case in enumerate(by_mode["service"]):
                result: dict[str, Any] = {}
                for mode in MODES:
                    result[mode] = summarise(run_case(by_mode[mode][index], mode))
                before = result["rebuilt"]["later_overhead_seconds"]
                after = result["service"]["later_overhead_seconds"]
                result["overhead_ratio"] = round(after / before, 4) if before > 0 else None
                figures["cases"][case.name] = result
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = previous
    return figures


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    lines: list[tuple[str, str, str, bool | None]] = []
    for name, result in figures["cases"].items():
        service, rebuilt = result["service"], result["rebuilt"]
        first = service["rounds"][0]
        lines.append(
            (
                f"{name}: round 1 outside training",
                f"{first['overhead_seconds']:.2f} s (first step after "
                f"{first['first_step_seconds']:.2f} s; rebuilt: "
                f"{rebuilt['rounds'][0]['overhead_seconds']:.2f} s)",
                "",
                None,
            )
        )
        met = verdict(service["later_overhead_seconds"], TARGET_SECONDS) and verdict(
            service["later_overhead_share"], TARGET_SHARE
        )
        lines.append(
            (
                f"{name}: later rounds outside training",
                f"{service['later_overhead_seconds']:.2f} s, "
                f"{100 * service['later_overhead_share']:.1f}% of the round "
                f"(rebuilt: {rebuilt['later_overhead_seconds']:.2f} s, "
                f"{100 * rebuilt['later_overhead_share']:.1f}%; "
                f"ratio {result['overhead_ratio']})",
                "≤ 1 s and ≤ 5%",
                met,
            )
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.site_overhead", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 rounds and a 4-layer text model.")
    parser.add_argument("--layers", type=int, help="Decoder layers of the real-size model.")
    parser.add_argument(
        "--no-real-size", action="store_true", help="Leave out the real-size text site."
    )
    arguments = parser.parse_args(argv)
    configure_logging(False)
    logger.setLevel(logging.INFO)
    figures = run(None, arguments.quick, not arguments.no_real_size, arguments.layers)
    for line in rows(figures):
        print(f"{line[0]:<48} {line[1]}  {line[2]}")  # a benchmark's output is its table
    report("site_overhead", figures)


if __name__ == "__main__":
    main()
