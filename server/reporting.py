"""What the coordinator learns each round, written as it happens.

Rows go to ``metrics.csv`` immediately (a crash keeps every finished round), and each
round's outcome is also logged with structured ``extra`` fields so a front end (the
simulate progress bar) can follow without parsing text.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.files import write_atomically

logger = logging.getLogger("fedlora.rounds")

METRIC_COLUMNS = (
    "task",
    "round",
    "site",
    "phase",
    "status",
    "examples",
    "loss",
    "accuracy",
    "epsilon",
    "epsilon_budget",
    "delta",
    "update_norm",
    "lora_error",
    "reason",
)

FEDERATED = "all"
"""The ``site`` value of rows that aggregate every site of a round."""


@dataclass
class SiteRecord:
    examples: int = 0
    epsilon: float = 0.0
    epsilon_budget: float = 0.0
    delta: float = 0.0
    rounds_trained: int = 0


@dataclass
class RunRecorder:
    """Collects per-site and federated metrics for one task's run."""

    task: str
    metrics_csv: Path
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    federated: dict[int, dict[str, float]] = field(default_factory=dict)
    exclusions: list[dict[str, str | int]] = field(default_factory=list)
    """Every site that did not contribute to a phase of a round, with the reason."""
    rollbacks: list[dict[str, str | int]] = field(default_factory=list)
    failed_rounds: list[int] = field(default_factory=list)
    lora_errors: dict[int, float] = field(default_factory=dict)
    """Round -> the aggregate's LoRA product error (see server/aggregation.py)."""

    def snapshot(self) -> dict[str, Any]:
        """What a resumed run needs to go on reporting the whole run (JSON-safe)."""
        return {
            "sites": {site: asdict(record) for site, record in self.sites.items()},
            "federated": {str(r): v for r, v in self.federated.items()},
            "exclusions": self.exclusions,
            "rollbacks": self.rollbacks,
            "failed_rounds": self.failed_rounds,
            "lora_errors": {str(r): v for r, v in self.lora_errors.items()},
        }

    def restore(self, snapshot: dict[str, Any], completed_round: int) -> None:
        """Continue from a checkpoint: its figures back in memory, and the rows of any
        round after it (cut short by the crash; it is run again) dropped from the CSV."""
        self.sites = {site: SiteRecord(**record) for site, record in snapshot["sites"].items()}
        self.federated = {int(r): v for r, v in snapshot["federated"].items()}
        self.exclusions = list(snapshot["exclusions"])
        self.rollbacks = list(snapshot["rollbacks"])
        self.failed_rounds = list(snapshot["failed_rounds"])
        self.lora_errors = {int(r): v for r, v in snapshot["lora_errors"].items()}
        if not self.metrics_csv.exists():
            return
        with self.metrics_csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if r["task"] != self.task or int(r["round"]) <= completed_round]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        write_atomically(self.metrics_csv, buffer.getvalue())

    def _write(self, row: dict[str, object]) -> None:
        new = not self.metrics_csv.exists()
        self.metrics_csv.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_csv.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({"task": self.task, **row})

    def site_trained(
        self, server_round: int, site: str, metrics: dict[str, float], norm: float | None = None
    ) -> None:
        record = self.sites.setdefault(site, SiteRecord())
        record.examples = int(metrics["num-examples"])
        record.epsilon = float(metrics["epsilon"])
        record.epsilon_budget = float(metrics["epsilon-budget"])
        record.delta = float(metrics["delta"])
        record.rounds_trained += 1
        self._write(
            {
                "round": server_round,
                "site": site,
                "phase": "train",
                "status": "accepted",
                "examples": record.examples,
                "epsilon": record.epsilon,
                "epsilon_budget": record.epsilon_budget,
                "delta": record.delta,
                "update_norm": norm,
            }
        )

    def site_evaluated(self, server_round: int, site: str, metrics: dict[str, float]) -> None:
        self._write(
            {
                "round": server_round,
                "site": site,
                "phase": "evaluate",
                "status": "ok",
                "examples": int(metrics["num-examples"]),
                "loss": metrics["eval-loss"],
                "accuracy": metrics["eval-accuracy"],
            }
        )

    def site_failed(
        self, server_round: int, site: str, phase: str, status: str, reason: str
    ) -> None:
        self.exclusions.append(
            {
                "round": server_round,
                "site": site,
                "phase": phase,
                "status": status,
                "reason": reason,
            }
        )
        logger.warning("round %d %s: %s %s — %s", server_round, phase, site, status, reason)
        self._write(
            {
                "round": server_round,
                "site": site,
                "phase": phase,
                "status": status,
                "reason": reason,
            }
        )

    def round_trained(
        self,
        server_round: int,
        examples: int,
        lora_error: float | None,
        failure: str | None = None,
    ) -> None:
        """The federated train row: examples summed over the accepted updates, and either
        the aggregate's LoRA product error or why the round could not aggregate."""
        if failure is not None:
            self.failed_rounds.append(server_round)
        if lora_error is not None:
            self.lora_errors[server_round] = lora_error
        self._write(
            {
                "round": server_round,
                "site": FEDERATED,
                "phase": "train",
                "status": "failed" if failure is not None else "aggregated",
                "examples": examples,
                "lora_error": lora_error,
                "reason": failure,
            }
        )

    def rolled_back(self, server_round: int, best_round: int, reason: str) -> None:
        self.rollbacks.append({"round": server_round, "kept_round": best_round, "reason": reason})
        self._write(
            {
                "round": server_round,
                "site": FEDERATED,
                "phase": "rollback",
                "status": "rolled-back",
                "reason": reason,
            }
        )

    def round_evaluated(
        self, server_round: int, loss: float, accuracy: float, examples: int
    ) -> None:
        self.federated[server_round] = {"loss": loss, "accuracy": accuracy}
        self._write(
            {
                "round": server_round,
                "site": FEDERATED,
                "phase": "evaluate",
                "status": "ok",
                "examples": examples,
                "loss": loss,
                "accuracy": accuracy,
            }
        )
        logger.info(
            "%s round %d: federated accuracy %.3f, loss %.3f",
            self.task,
            server_round,
            accuracy,
            loss,
            extra={"fedlora_task": self.task, "fedlora_round": server_round, "accuracy": accuracy},
        )
