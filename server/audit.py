"""The coordinator's audit events: one method per thing an auditor asks about.

Each call appends one signed entry to the run's log (``common/audit``). Only public site
names, counts, hashes, privacy figures and reasons go in: nothing a site did not already
send in the clear.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.adapters import AdapterArrays, adapter_sha256
from common.audit.chain import canonical
from common.audit.log import AuditLog
from common.audit.review import AUDIT_DIR, coordinator_log_name
from common.config import FederationConfig
from common.errors import ConfigError
from server.strategy_utils import UpdateReceipt

COORDINATOR = "coordinator"


def coordinator_log_path(run_dir: Path, task: str) -> Path:
    return run_dir / AUDIT_DIR / coordinator_log_name(task)


def config_sha256(federation: FederationConfig) -> str:
    """Hash of the run's settings, without the base model's local path (its content
    hash is recorded separately)."""
    document = federation.model_dump(mode="json", exclude={"base_model"})
    return hashlib.sha256(canonical(document)).hexdigest()


class CoordinatorAudit:
    def __init__(self, log: AuditLog) -> None:
        self.log = log

    @classmethod
    def open(cls, run_dir: Path, task: str, key: Ed25519PrivateKey) -> CoordinatorAudit:
        """A new log for this run; a run directory that already holds one for the task
        is refused (one log per run, never two runs in one log)."""
        path = coordinator_log_path(run_dir, task)
        if path.exists() and path.stat().st_size > 0:
            raise ConfigError(
                f"{run_dir} already holds the audit log of a {task} run; choose a new run directory"
            )
        return cls(AuditLog(path, COORDINATOR, key))

    @classmethod
    def reopen(cls, run_dir: Path, task: str, key: Ed25519PrivateKey) -> CoordinatorAudit:
        """The log of the run being resumed: it goes on in the same chain."""
        path = coordinator_log_path(run_dir, task)
        if not path.exists() or path.stat().st_size == 0:
            raise ConfigError(f"{run_dir} holds no audit log of a {task} run to resume")
        return cls(AuditLog(path, COORDINATOR, key))

    def run_started(
        self,
        *,
        run: str,
        federation: FederationConfig,
        base_model_sha256: str,
        initial: AdapterArrays,
        sites: list[str],
    ) -> None:
        self.log.append(
            "run-started",
            run=run,
            task=federation.task,
            config_sha256=config_sha256(federation),
            base_model_sha256=base_model_sha256,
            planned_rounds=federation.rounds,
            aggregator=federation.aggregator,
            initial_adapter_sha256=adapter_sha256(initial),
            sites=sorted(sites),
        )

    def run_resumed(
        self, *, run: str, run_id: str, from_round: int, adapter: AdapterArrays, sites: list[str]
    ) -> None:
        """A new Flower run (``run``) takes over the federation run ``run_id`` after
        ``from_round``, starting from exactly the checkpointed adapter."""
        self.log.append(
            "run-resumed",
            run=run,
            run_id=run_id,
            from_round=from_round,
            adapter_sha256=adapter_sha256(adapter),
            sites=sorted(sites),
        )

    def site_joined(self, site: str, details: Mapping[str, Any]) -> None:
        self.log.append("site-joined", site=site, **details)

    def round_started(self, server_round: int, phase: str, sites: list[str]) -> None:
        self.log.append("round-started", round=server_round, phase=phase, sites=sorted(sites))

    def update_received(
        self,
        server_round: int,
        site: str,
        receipt: UpdateReceipt,
        *,
        accepted: bool,
        norm: float | None = None,
        reason: str | None = None,
    ) -> None:
        self.log.append(
            "update-received",
            round=server_round,
            site=site,
            status="accepted" if accepted else "rejected",
            update_sha256=receipt.sha256,
            examples=receipt.examples,
            epsilon=receipt.epsilon,
            norm=norm,
            reason=reason,
            site_log_seq=receipt.site_log[0] if receipt.site_log else None,
            site_log_hash=receipt.site_log[1] if receipt.site_log else None,
        )

    def site_excluded(
        self, server_round: int, site: str, phase: str, status: str, reason: str
    ) -> None:
        """A site that refused, failed or stayed silent (rejections are update events)."""
        event = "site-refused" if status == "refused" else "site-excluded"
        self.log.append(
            event, round=server_round, site=site, phase=phase, status=status, reason=reason
        )

    def aggregated(
        self,
        server_round: int,
        adapter: AdapterArrays,
        sites: list[str],
        examples: int,
        lora_error: float | None,
    ) -> None:
        self.log.append(
            "aggregation-done",
            round=server_round,
            adapter_sha256=adapter_sha256(adapter),
            sites=sorted(sites),
            examples=examples,
            lora_product_error=lora_error,
        )

    def round_failed(self, server_round: int, reason: str) -> None:
        self.log.append("round-failed", round=server_round, reason=reason)

    def evaluated(
        self, server_round: int, accuracy: float, loss: float, examples: int, sites: list[str]
    ) -> None:
        self.log.append(
            "evaluation",
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            examples=examples,
            sites=sorted(sites),
        )

    def rolled_back(
        self, server_round: int, to_round: int, adapter: AdapterArrays, reason: str
    ) -> None:
        self.log.append(
            "rolled-back",
            round=server_round,
            to_round=to_round,
            adapter_sha256=adapter_sha256(adapter),
            reason=reason,
        )

    def run_finished(self, result: Mapping[str, Any], adapter: AdapterArrays) -> None:
        self.log.append(
            "run-finished",
            rounds_completed=result["rounds_completed"],
            final_adapter_round=result["final_adapter_round"],
            final_adapter_sha256=adapter_sha256(adapter),
            accuracy=result["final"].get("accuracy"),
            loss=result["final"].get("loss"),
        )

    def run_failed(self, error: BaseException) -> None:
        # The exception's type only: its message may name local paths.
        self.log.append("run-failed", error=type(error).__name__)

    def record(self, event: str, **data: Any) -> dict[str, Any]:
        """Any other event (artifact export, distribution, installation); returns the
        entry, whose number and hash a manifest can cite."""
        return self.log.append(event, **data)
