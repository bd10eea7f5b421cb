"""The site's privacy ledger on disk: persistence, exact replay by Opacus, atomic writes,
and corruption that is always an error, never a fresh budget."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from client.ledger import (
    INDEX_FILE,
    LEDGER_DIR,
    LOCK_FILE,
    LedgerError,
    PrivacyLedger,
    RunPlan,
    ledgers_of,
)
from common.errors import PolicyError

DATASET = "a1" * 32
OTHER_DATASET = "b2" * 32
DELTA = 1e-5

# (σ, q, steps) of a few rounds over two runs; a run repeats its (σ, q), as at a site.
ROUNDS = [
    (1.1, 0.08, 13),
    (1.1, 0.08, 13),
    (0.9, 0.05, 20),
    (0.9, 0.05, 20),
    (1.7, 0.125, 8),
]
RUN_ROUNDS = [("run-1", 1), ("run-1", 2), ("run-2", 1), ("run-2", 2), ("run-2", 3)]

ACCOUNTANTS = {"prv": (PRVAccountant, 1e-6), "rdp": (RDPAccountant, 1e-9)}


def _open(state_dir: Path, dataset: str = DATASET, accountant: str = "rdp") -> PrivacyLedger:
    return PrivacyLedger.open(state_dir, dataset, accountant=accountant, delta=DELTA)


def _ledger_file(state_dir: Path, dataset: str = DATASET) -> Path:
    return state_dir / LEDGER_DIR / f"{dataset}.json"


def _index_file(state_dir: Path) -> Path:
    return state_dir / LEDGER_DIR / INDEX_FILE


def _filled(state_dir: Path, accountant: str = "rdp") -> PrivacyLedger:
    """A ledger with one plan and the rounds above, split over two runs."""
    ledger = _open(state_dir, accountant=accountant)
    ledger.record_plan(
        RunPlan(run="run-1", noise_multiplier=1.1, epsilon_target=3.0, planned_rounds=2)
    )
    for (run, server_round), entry in zip(RUN_ROUNDS, ROUNDS, strict=True):
        ledger.record_round(run, server_round, entry)
    return ledger


def _fresh_epsilon(accountant: str, history: list[tuple[float, float, int]]) -> float:
    engine = ACCOUNTANTS[accountant][0]()
    engine.history = list(history)
    return float(engine.get_epsilon(delta=DELTA))


# ---------------------------------------------------------------- persistence ---


def test_recorded_rounds_and_plans_survive_reopening(tmp_path: Path) -> None:
    ledger = _filled(tmp_path)
    reopened = _open(tmp_path)
    assert reopened.state.entries == ledger.state.entries
    assert reopened.state.plans == ledger.state.plans
    assert [(e.run, e.round) for e in reopened.state.entries] == RUN_ROUNDS
    assert reopened.history == ROUNDS
    assert reopened.plan_for("run-1") == RunPlan("run-1", 1.1, 3.0, 2)
    assert reopened.plan_for("run-2") is None
    assert reopened.epsilon() == ledger.epsilon()
    assert reopened.epsilon() > 0
    # The file on disk lists the dataset in the site's index.
    assert json.loads(_index_file(tmp_path).read_text()) == [DATASET]


def test_a_new_ledger_is_empty_and_nothing_is_written_until_a_record(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    assert ledger.state.entries == [] and ledger.state.plans == []
    assert ledger.epsilon() == 0.0
    assert not (tmp_path / LEDGER_DIR).exists()
    assert ledgers_of(tmp_path) == []


# ------------------------------------------------------- (c) replay by Opacus ---


@pytest.mark.slow  # full accountant replays (PRV: 4-6 s)
@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_ledger_epsilon_equals_a_fresh_opacus_accountant_replaying_the_file(
    tmp_path: Path, accountant: str
) -> None:
    ledger = _filled(tmp_path, accountant)
    # Read the history back from the JSON on disk, not through the ledger class.
    document = json.loads(_ledger_file(tmp_path).read_text(encoding="utf-8"))
    assert document["accountant"] == accountant
    assert document["delta"] == DELTA
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in document["entries"]]
    assert history == ROUNDS

    relative = ACCOUNTANTS[accountant][1]
    expected = _fresh_epsilon(accountant, history)
    assert expected > 0
    assert ledger.epsilon() == pytest.approx(expected, rel=relative)
    assert _open(tmp_path, accountant=accountant).epsilon() == pytest.approx(expected, rel=relative)
    # Each entry's ε is the fresh accountant's ε over the history up to and including it.
    prefixes = [_fresh_epsilon(accountant, history[: i + 1]) for i in range(len(history))]
    recorded = [e["epsilon_after"] for e in document["entries"]]
    assert recorded == pytest.approx(prefixes, rel=relative)
    assert recorded == sorted(recorded) and len(set(recorded)) == len(recorded)
    assert recorded[-1] == pytest.approx(expected, rel=relative)


def test_the_two_accountants_give_different_epsilons(tmp_path: Path) -> None:
    """The replay test above would be vacuous if the ledger ignored its accountant."""
    history = ROUNDS[1:3]
    prv = PrivacyLedger.open(tmp_path / "prv", DATASET, accountant="prv", delta=DELTA)
    rdp = PrivacyLedger.open(tmp_path / "rdp", DATASET, accountant="rdp", delta=DELTA)
    for ledger in (prv, rdp):
        for server_round, entry in enumerate(history, start=1):
            ledger.record_round("run-1", server_round, entry)
    assert prv.epsilon() == pytest.approx(_fresh_epsilon("prv", history), rel=1e-6)
    assert rdp.epsilon() == pytest.approx(_fresh_epsilon("rdp", history), rel=1e-9)
    prv, rdp = prv.epsilon(), rdp.epsilon()
    assert prv < rdp  # PRV is the tighter bound


# --------------------------------------------------------------- atomic writes ---


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    _filled(tmp_path)
    folder = tmp_path / LEDGER_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{DATASET}.json", INDEX_FILE, LOCK_FILE]
    )
    assert list(folder.glob(".*.tmp")) == []


def test_a_crash_before_the_rename_keeps_the_previous_ledger_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = _filled(tmp_path)
    path = _ledger_file(tmp_path)
    before = path.read_bytes()
    epsilon_before = ledger.epsilon()

    def crash(source: object, destination: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ledger.record_round("run-2", 4, (0.8, 0.1, 10))
    monkeypatch.undo()

    # The old file is untouched and still verifies; the new round is not in it.
    assert path.read_bytes() == before
    reopened = _open(tmp_path)
    assert len(reopened.state.entries) == len(ROUNDS)
    assert ("run-2", 4) not in [(e.run, e.round) for e in reopened.state.entries]
    assert reopened.epsilon() == epsilon_before


# ---------------------------------------------------------------- corruption ---


def test_ledger_error_is_a_policy_error() -> None:
    assert issubclass(LedgerError, PolicyError)


def test_an_edited_number_fails_the_checksum(tmp_path: Path) -> None:
    _filled(tmp_path)
    path = _ledger_file(tmp_path)
    document = json.loads(path.read_text())
    assert document["entries"][0]["noise_multiplier"] == 1.1
    document["entries"][0]["noise_multiplier"] = 11.0  # more noise: a smaller ε
    path.write_text(json.dumps(document, indent=1))
    with pytest.raises(LedgerError, match="checksum"):
        _open(tmp_path)
    with pytest.raises(LedgerError, match="checksum"):
        ledgers_of(tmp_path)


def test_a_removed_entry_fails_the_checksum(tmp_path: Path) -> None:
    _filled(tmp_path)
    path = _ledger_file(tmp_path)
    document = json.loads(path.read_text())
    del document["entries"][-1]
    path.write_text(json.dumps(document, indent=1))
    with pytest.raises(LedgerError, match="checksum"):
        _open(tmp_path)


def test_a_truncated_ledger_is_unreadable(tmp_path: Path) -> None:
    _filled(tmp_path)
    path = _ledger_file(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(LedgerError, match="unreadable"):
        _open(tmp_path)
    path.write_text("")
    with pytest.raises(LedgerError, match="unreadable"):
        _open(tmp_path)


def test_a_ledger_without_checksum_is_refused(tmp_path: Path) -> None:
    _filled(tmp_path)
    path = _ledger_file(tmp_path)
    document = json.loads(path.read_text())
    del document["checksum"]
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerError, match="not a fedlora ledger"):
        _open(tmp_path)


def test_a_missing_ledger_that_the_index_lists_is_an_error(tmp_path: Path) -> None:
    _filled(tmp_path)
    _ledger_file(tmp_path).unlink()
    with pytest.raises(LedgerError, match="missing"):
        _open(tmp_path)
    with pytest.raises(LedgerError, match="missing"):
        ledgers_of(tmp_path)


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        ("{not json", "unreadable"),
        ('{"a": 1}', "not a list"),
        ("[1, 2]", "not a list"),
    ],
)
def test_a_garbage_index_is_an_error(tmp_path: Path, garbage: str, message: str) -> None:
    _filled(tmp_path)
    _index_file(tmp_path).write_text(garbage)
    with pytest.raises(LedgerError, match=message):
        _open(tmp_path)
    with pytest.raises(LedgerError, match=message):
        _open(tmp_path, OTHER_DATASET)  # even a dataset without history
    with pytest.raises(LedgerError, match=message):
        ledgers_of(tmp_path)


def test_the_accountant_or_delta_of_a_dataset_cannot_change(tmp_path: Path) -> None:
    _filled(tmp_path, "rdp")
    with pytest.raises(LedgerError, match=r"rdp accountant at δ=1e-05.*prv"):
        _open(tmp_path, accountant="prv")
    with pytest.raises(LedgerError, match="cannot change"):
        PrivacyLedger.open(tmp_path, DATASET, accountant="rdp", delta=1e-6)
    # The same settings still open it, with its history.
    assert len(_open(tmp_path).state.entries) == len(ROUNDS)


def test_a_ledger_file_of_another_dataset_is_refused(tmp_path: Path) -> None:
    _filled(tmp_path)
    _ledger_file(tmp_path).rename(_ledger_file(tmp_path, OTHER_DATASET))
    with pytest.raises(LedgerError, match="another dataset"):
        _open(tmp_path, OTHER_DATASET)


# ------------------------------------------------------------ several datasets ---


def test_each_dataset_has_its_own_ledger(tmp_path: Path) -> None:
    first = _filled(tmp_path)
    epsilon_first = first.epsilon()
    second = _open(tmp_path, OTHER_DATASET)
    assert second.state.entries == [] and second.epsilon() == 0.0
    second.record_round("run-3", 1, (1.0, 0.1, 10))
    assert second.epsilon() == pytest.approx(_fresh_epsilon("rdp", [(1.0, 0.1, 10)]), rel=1e-9)

    reopened_first = _open(tmp_path)
    assert reopened_first.history == ROUNDS
    assert reopened_first.epsilon() == epsilon_first
    assert json.loads(_index_file(tmp_path).read_text()) == sorted([DATASET, OTHER_DATASET])
    states = ledgers_of(tmp_path)
    assert [s.dataset for s in states] == sorted([DATASET, OTHER_DATASET])
    by_dataset = {s.dataset: s for s in states}
    assert len(by_dataset[DATASET].entries) == len(ROUNDS)
    assert [(e.run, e.round) for e in by_dataset[OTHER_DATASET].entries] == [("run-3", 1)]


def test_runs_summarise_rounds_and_epsilon_per_run(tmp_path: Path) -> None:
    ledger = _filled(tmp_path)
    entries = ledger.state.entries
    assert _open(tmp_path).runs() == [
        {"run": "run-1", "rounds": 2, "epsilon_after": entries[1].epsilon_after},
        {"run": "run-2", "rounds": 3, "epsilon_after": entries[4].epsilon_after},
    ]
    assert entries[1].epsilon_after < entries[4].epsilon_after == ledger.epsilon()


# ------------------------------------------------------------------- privacy ---


def test_written_files_hold_no_paths(tmp_path: Path) -> None:
    _filled(tmp_path)
    _open(tmp_path, OTHER_DATASET).record_round("run-3", 1, (1.0, 0.1, 10))
    files = sorted(p for p in (tmp_path / LEDGER_DIR).iterdir() if p.name != LOCK_FILE)
    assert len(files) == 3  # two ledgers and the index
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert str(tmp_path) not in text
        assert tmp_path.name not in text
        assert "/" not in text and "\\" not in text


# ------------------------------------------------------------- known gaps ---


def test_a_non_numeric_field_with_a_valid_checksum_is_a_ledger_error(tmp_path: Path) -> None:
    from client.ledger import _checksum

    _filled(tmp_path)
    path = _ledger_file(tmp_path)
    document = json.loads(path.read_text())
    document.pop("checksum")
    document["delta"] = "not a number"
    document["checksum"] = _checksum(document)
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerError, match="malformed"):
        _open(tmp_path)


def test_a_stale_handle_does_not_drop_another_handles_round(tmp_path: Path) -> None:
    first = _open(tmp_path)
    second = _open(tmp_path)
    first.record_round("run-1", 1, (1.0, 0.1, 10))
    try:
        second.record_round("run-2", 1, (1.0, 0.1, 10))
    except LedgerError:
        return  # refusing the stale write is as good as merging it
    assert [(e.run, e.round) for e in _open(tmp_path).state.entries] == [
        ("run-1", 1),
        ("run-2", 1),
    ]
