"""A small audited run directory built with the real log writers (no training, no Flower):
the coordinator's CoordinatorAudit and plain AuditLogs for two sites, recording the
events a 3-round run leaves, with one rejected update and one refusal.

Layout (as a simulation leaves it): RUN/audit/coordinator-<task>.jsonl (+ head),
RUN/audit/sites/<site>.jsonl (+ head), RUN/keys/coordinator.pub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.adapters import adapter_sha256
from common.audit.chain import GENESIS_PREV, opening_data, seal, sign_head
from common.audit.log import AuditLog
from common.audit.review import AUDIT_DIR, SITE_LOGS_DIR, coordinator_log_name
from common.cli import cli
from common.config import FederationConfig
from common.signing import fingerprint, write_public_key
from server.audit import COORDINATOR, CoordinatorAudit
from server.strategy_utils import UpdateReceipt

TASK = "tabular-classification"
RUN = "4242"
SITES = ("bank-a", "bank-b")
ROUNDS = 3


@dataclass(frozen=True)
class AuditedRun:
    run_dir: Path
    coordinator_log: Path
    site_logs: dict[str, Path]
    coordinator_key: Ed25519PrivateKey
    site_keys: dict[str, Ed25519PrivateKey]


def _update(site: str, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(hash((site, server_round)) % 2**32)
    return {"l0.lora_A.weight": rng.standard_normal((2, 4)).astype(np.float32)}


def write_audited_run(run_dir: Path) -> AuditedRun:
    """Round 1: both accepted. Round 2: bank-b's update rejected (norm). Round 3: bank-b
    refuses (budget); bank-a accepted."""
    coordinator_key = Ed25519PrivateKey.generate()
    site_keys = {site: Ed25519PrivateKey.generate() for site in SITES}
    write_public_key(run_dir / "keys" / "coordinator.pub", coordinator_key.public_key())
    coordinator_log = run_dir / AUDIT_DIR / coordinator_log_name(TASK)
    audit = CoordinatorAudit(AuditLog(coordinator_log, COORDINATOR, coordinator_key))
    site_logs = {site: run_dir / AUDIT_DIR / SITE_LOGS_DIR / f"{site}.jsonl" for site in SITES}
    sites = {site: AuditLog(site_logs[site], site, site_keys[site]) for site in SITES}
    federation = FederationConfig(task=TASK, base_model=Path("/models/base"), rounds=ROUNDS)
    initial = _update("initial", 0)
    audit.run_started(
        run=RUN,
        federation=federation,
        base_model_sha256="b" * 64,
        initial=initial,
        sites=list(SITES),
    )
    for site in SITES:
        key = fingerprint(site_keys[site].public_key())
        sites[site].append("run-joined", run=RUN, task=TASK, audit_key=key)
        audit.site_joined(site, {"kind": "bank", "task": TASK, "audit-key": key})
    epsilon = dict.fromkeys(SITES, 0.0)
    for server_round in range(1, ROUNDS + 1):
        audit.round_started(server_round, "train", list(SITES))
        for site in SITES:
            where = {"run": RUN, "round": server_round, "phase": "train"}
            if site == "bank-b" and server_round == 3:
                reason = "site bank-b refuses round 3: over the site's budget"
                sites[site].append("budget-refused", **where, reason=reason)
                audit.site_excluded(server_round, site, "train", "refused", reason)
                continue
            sites[site].append("policy-decision", **where, decision="accepted")
            if server_round == 1:
                sites[site].append(
                    "data-summary", run=RUN, records=200, people=150, rejected_records=0
                )
            update = _update(site, server_round)
            before, epsilon[site] = epsilon[site], epsilon[site] + 1.25
            logged = sites[site].append(
                "training-done",
                run=RUN,
                round=server_round,
                update_sha256=adapter_sha256(update),
                records=200,
                people=150,
                steps=5,
                epsilon_before=before,
                epsilon_after=epsilon[site],
                epsilon_budget=4.0,
                delta=1e-5,
            )
            receipt = UpdateReceipt(
                adapter_sha256(update), 200.0, epsilon[site], (logged["seq"], logged["hash"])
            )
            if site == "bank-b" and server_round == 2:
                audit.update_received(
                    server_round,
                    site,
                    receipt,
                    accepted=False,
                    reason="update norm 612 exceeds the bound 44",
                )
            else:
                audit.update_received(server_round, site, receipt, accepted=True, norm=0.8)
        audit.aggregated(server_round, _update("global", server_round), ["bank-a"], 200, None)
        audit.round_started(server_round, "evaluate", list(SITES))
        audit.evaluated(
            server_round, 0.6 + 0.05 * server_round, 0.9 - 0.1 * server_round, 80, list(SITES)
        )
    result = {
        "rounds_completed": ROUNDS,
        "final_adapter_round": ROUNDS,
        "final": {"accuracy": 0.75, "loss": 0.6},
    }
    audit.run_finished(result, _update("global", ROUNDS))
    return AuditedRun(run_dir, coordinator_log, site_logs, coordinator_key, site_keys)


def reseal_all(
    entries: list[dict[str, Any]], key: Ed25519PrivateKey, *, reopen: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The whole log rewritten by ``key``'s holder (a new chain, new signatures and, with
    ``reopen``, a new opening entry with its public key) and its new head."""
    sealed: list[dict[str, Any]] = []
    prev = GENESIS_PREV
    for entry in entries:
        data = entry["data"]
        if entry["seq"] == 0 and reopen:
            data = {"party": entry["actor"], **opening_data(key)}
        new = seal(
            key,
            seq=entry["seq"],
            time=entry["time"],
            actor=entry["actor"],
            event=entry["event"],
            data=data,
            prev=prev,
        )
        sealed.append(new)
        prev = new["hash"]
    last = sealed[-1]
    head = sign_head(
        key, log=sealed[0]["hash"], seq=last["seq"], digest=last["hash"], time=last["time"]
    )
    return sealed, head


WIDE = {"COLUMNS": "250"}
"""rich wraps long lines at the terminal width: a wide one keeps messages whole."""


def invoke_audit(*args: str) -> Result:
    """``fedlora audit ARGS`` through the real root command."""
    return CliRunner().invoke(cli, ["audit", *args], env=WIDE)


def flat_output(result: Result) -> str:
    """The output with rich's line wrapping undone (runs of whitespace become one space)."""
    return " ".join(result.output.split())
