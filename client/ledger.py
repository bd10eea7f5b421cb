"""The site's privacy ledger: every DP-SGD step ever taken on one dataset, on disk.

One JSON file per dataset (named by the dataset's content hash) in the site's state
directory, plus an index of every dataset that has history. The ledger is the only
source of ε for the site: it spans rounds, runs and restarts, and it is written
atomically (temporary file, fsync, rename, fsync of the folder) *before* an update
leaves the site, so a crash can only over-count, never under-count.

A ledger that is corrupt, edited, or missing while the index says the dataset has
history is an error, never a fresh budget.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.privacy import HistoryEntry, epsilon_spent
from common.errors import PolicyError
from common.files import write_atomically

LEDGER_VERSION = 1
LEDGER_DIR = "ledger"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"


class LedgerError(PolicyError):
    """The ledger cannot be trusted; the site refuses to train until an operator acts."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD at this site, as charged to the accountant."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    recorded_at: str

    @property
    def history(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class RunPlan:
    """What the site decided when a run first asked it to train."""

    run: str
    noise_multiplier: float
    epsilon_target: float
    """ε the site will have spent in total once the run's planned rounds are done."""
    planned_rounds: int


@dataclass
class LedgerState:
    dataset: str
    accountant: str
    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)
    plans: list[RunPlan] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _checksum(document: dict[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class PrivacyLedger:
    """The privacy history of one dataset at one site."""

    def __init__(self, path: Path, index: Path, state: LedgerState) -> None:
        self.path = path
        self.index = index
        self.state = state

    # ----------------------------------------------------------------- opening ---

    @classmethod
    def open(cls, state_dir: Path, dataset: str, *, accountant: str, delta: float) -> PrivacyLedger:
        folder = state_dir / LEDGER_DIR
        path = folder / f"{dataset}.json"
        index = folder / INDEX_FILE
        known = read_index(index)
        if not path.exists():
            if dataset in known:
                raise LedgerError(
                    f"the privacy ledger of dataset {dataset[:12]}… is missing, but the "
                    "site's index says it has history: restore it from backup; the site "
                    "will not start a fresh budget"
                )
            return cls(path, index, LedgerState(dataset, accountant, delta))
        state = read_ledger(path)
        if state.dataset != dataset:
            raise LedgerError(f"{path.name} holds the ledger of another dataset")
        if state.accountant != accountant or state.delta != delta:
            raise LedgerError(
                f"the ledger of dataset {dataset[:12]}… was kept with the {state.accountant} "
                f"accountant at δ={state.delta:g}; the site config now says {accountant} at "
                f"δ={delta:g}. A dataset's accounting cannot change mid-life."
            )
        return cls(path, index, state)

    # ------------------------------------------------------------------ reading ---

    @property
    def history(self) -> list[HistoryEntry]:
        return [entry.history for entry in self.state.entries]

    def epsilon(self, extra: Sequence[HistoryEntry] = ()) -> float:
        """ε after the recorded history (and ``extra`` planned steps)."""
        return epsilon_spent([*self.history, *extra], self.state.delta, self.state.accountant)

    def plan_for(self, run: str) -> RunPlan | None:
        return next((plan for plan in self.state.plans if plan.run == run), None)

    def runs(self) -> list[dict[str, Any]]:
        return run_summaries(self.state.entries)

    # ------------------------------------------------------------------ writing ---

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the site's ledger lock and reload from disk: another process (a second
        ClientApp, a restarted daemon) may have charged rounds since this one read it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with (self.path.parent / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    self.state = read_ledger(self.path)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def create(self) -> None:
        """Start this dataset's ledger with no history (an operator's decision)."""
        with self._exclusive():
            self._save()

    def record_plan(self, plan: RunPlan) -> RunPlan:
        """Keep the run's plan; if another process planned this run first, that plan wins."""
        with self._exclusive():
            existing = self.plan_for(plan.run)
            if existing is not None:
                return existing
            self.state.plans.append(plan)
            self._save()
        return plan

    def record_round(
        self,
        run: str,
        server_round: int,
        history_entry: HistoryEntry,
        limit: float | None = None,
    ) -> LedgerEntry:
        """Charge one round; returns the entry once it is safely on disk.

        With ``limit``, a round that would take ε past it (because another process
        charged rounds meanwhile) is not recorded and raises: its update must not leave.
        """
        sigma, rate, steps = history_entry
        with self._exclusive():
            epsilon_after = self.epsilon([history_entry])
            if limit is not None and not epsilon_after <= limit + 1e-6:  # NaN fails too
                raise LedgerError(
                    f"round {server_round} would bring ε to {epsilon_after:.2f}, past "
                    f"{limit:.2f}: rounds were charged elsewhere meanwhile; update withheld"
                )
            entry = LedgerEntry(
                run=run,
                round=server_round,
                noise_multiplier=float(sigma),
                sample_rate=float(rate),
                steps=int(steps),
                epsilon_after=epsilon_after,
                recorded_at=_now(),
            )
            self.state.entries.append(entry)
            self._save()
        return entry

    def _save(self) -> None:
        # The index first: if the process dies between the two writes, the dataset is
        # listed without a file, which refuses (safe) rather than restarts the budget.
        known = read_index(self.index)
        if self.state.dataset not in known:
            write_atomically(self.index, json.dumps(sorted([*known, self.state.dataset])))
        document = {
            "version": LEDGER_VERSION,
            "dataset": self.state.dataset,
            "accountant": self.state.accountant,
            "delta": self.state.delta,
            "entries": [asdict(entry) for entry in self.state.entries],
            "plans": [asdict(plan) for plan in self.state.plans],
        }
        document["checksum"] = _checksum(document)
        write_atomically(self.path, json.dumps(document, indent=1))


def run_summaries(entries: Sequence[LedgerEntry]) -> list[dict[str, Any]]:
    """Per run: rounds trained and ε after its last round, in order of first use."""
    summary: dict[str, dict[str, Any]] = {}
    for entry in entries:
        item = summary.setdefault(entry.run, {"run": entry.run, "rounds": 0})
        item["rounds"] += 1
        item["epsilon_after"] = entry.epsilon_after
    return list(summary.values())


def _why(exc: Exception) -> str:
    """The reason without the path an OSError carries: refusals are audited and sent."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__ if isinstance(exc, UnicodeDecodeError) else str(exc)


def read_index(index: Path) -> list[str]:
    if not index.exists():
        return []
    try:
        value = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"the ledger index {index.name} is unreadable ({_why(exc)})") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise LedgerError(f"the ledger index {index.name} is not a list of dataset ids")
    return value


def read_ledger(path: Path) -> LedgerState:
    """Parse and verify one ledger file; any damage is a LedgerError."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"the privacy ledger {path.name} is unreadable ({_why(exc)})") from None
    if not isinstance(document, dict) or "checksum" not in document:
        raise LedgerError(f"the privacy ledger {path.name} is not a fedlora ledger")
    claimed = document.pop("checksum")
    if _checksum(document) != claimed:
        raise LedgerError(f"the privacy ledger {path.name} fails its checksum (edited or damaged)")
    if document.get("version") != LEDGER_VERSION:
        raise LedgerError(f"the privacy ledger {path.name} has unknown version")
    try:
        return LedgerState(
            dataset=str(document["dataset"]),
            accountant=str(document["accountant"]),
            delta=float(document["delta"]),
            entries=[LedgerEntry(**entry) for entry in document["entries"]],
            plans=[RunPlan(**plan) for plan in document["plans"]],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerError(f"the privacy ledger {path.name} is malformed ({exc})") from None


def ledgers_of(state_dir: Path) -> list[LedgerState]:
    """Every dataset ledger a site holds (for ``fedlora site budget``)."""
    folder = state_dir / LEDGER_DIR
    states = []
    for dataset in read_index(folder / INDEX_FILE):
        path = folder / f"{dataset}.json"
        if not path.exists():
            raise LedgerError(f"the privacy ledger of dataset {dataset[:12]}… is missing")
        states.append(read_ledger(path))
    return states
