"""The audit log on disk: appending, the head beside it, refusals, concurrency, reading."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import GENESIS_PREV, LOG_OPENED, canonical
from common.audit.log import (
    AuditLog,
    head_path,
    read_entries,
    read_head,
    read_lines,
    verify_log,
)
from common.errors import AuditError, FedloraError
from common.signing import (
    fingerprint,
    load_private_key,
    public_key_text,
    signature_valid,
    write_private_key,
)

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
ACTOR = "coordinator"


def _log(tmp_path: Path, key: Ed25519PrivateKey = KEY, actor: str = ACTOR) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl", actor, key)


def _lines(log: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.path.read_text(encoding="utf-8").splitlines()]


def test_head_path_sits_beside_the_log(tmp_path: Path) -> None:
    assert head_path(Path("/runs/x.jsonl")) == Path("/runs/x.head.json")
    assert head_path(Path("site/audit.jsonl")) == Path("site/audit.head.json")
    assert _log(tmp_path).head_path == tmp_path / "audit.head.json"


def test_first_append_opens_the_log_with_the_public_key(tmp_path: Path) -> None:
    log = _log(tmp_path / "new" / "dir")
    entry = log.append("run-started", rounds=3)
    entries = _lines(log)
    assert [e["seq"] for e in entries] == [0, 1]
    opening = entries[0]
    assert opening["event"] == LOG_OPENED
    assert opening["prev"] == GENESIS_PREV
    assert opening["actor"] == ACTOR
    assert opening["data"]["party"] == ACTOR
    assert opening["data"]["public_key"] == public_key_text(KEY.public_key())
    assert opening["data"]["key"] == fingerprint(KEY.public_key())
    assert entry == entries[1]
    assert entry["event"] == "run-started"
    assert entry["data"] == {"rounds": 3}
    assert log.path.read_bytes().endswith(b"\n")


def test_seq_increases_and_prev_links_each_entry_to_the_one_before(tmp_path: Path) -> None:
    log = _log(tmp_path)
    returned = [log.append("round-finished", round=n) for n in range(5)]
    entries = _lines(log)
    assert [e["seq"] for e in entries] == list(range(6))
    assert [e["event"] for e in entries] == [LOG_OPENED] + ["round-finished"] * 5
    assert entries[1:] == returned
    assert entries[0]["prev"] == GENESIS_PREV
    for before, after in itertools.pairwise(entries):
        assert after["prev"] == before["hash"]
    assert len({e["hash"] for e in entries}) == len(entries)
    for entry in entries:
        assert signature_valid(KEY.public_key(), entry["hash"].encode(), entry["signature"])


def test_head_tracks_the_last_entry_after_every_append(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for n in range(4):
        entry = log.append("tick", n=n)
        head = read_head(log.head_path)
        assert head is not None
        assert head["seq"] == entry["seq"] == n + 1
        assert head["hash"] == entry["hash"]
        assert head["time"] == entry["time"]
        assert head["log"] == _lines(log)[0]["hash"]
        assert head["key"] == fingerprint(KEY.public_key())
        statement = {name: head[name] for name in ("log", "seq", "hash", "time")}
        assert signature_valid(KEY.public_key(), canonical(statement), head["signature"])
        assert verify_log(log.path, KEY.public_key()).ok
    # the temporary file used to replace the head is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.head.json", "audit.jsonl"]


def test_append_makes_numpy_values_plain(tmp_path: Path) -> None:
    log = _log(tmp_path)
    entry = log.append("metrics", loss=np.float32(0.5), n=np.int64(4), bad=float("nan"))
    assert entry["data"] == {"loss": 0.5, "n": 4, "bad": None}
    assert verify_log(log.path, KEY.public_key()).ok


def test_a_refused_value_leaves_an_existing_log_untouched(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("a")
    before = log.path.read_bytes(), log.head_path.read_bytes()
    with pytest.raises(TypeError):
        log.append("b", thing=object())
    assert (log.path.read_bytes(), log.head_path.read_bytes()) == before


def test_an_empty_file_is_opened_like_a_new_log(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.path.touch()
    log.append("a")
    assert [e["seq"] for e in _lines(log)] == [0, 1]


def test_another_key_cannot_append(tmp_path: Path) -> None:
    _log(tmp_path).append("a")
    path = tmp_path / "audit.jsonl"
    before = path.read_bytes(), head_path(path).read_bytes()
    with pytest.raises(AuditError, match="belongs to 'coordinator'") as caught:
        _log(tmp_path, key=OTHER).append("b")
    assert fingerprint(OTHER.public_key()) in str(caught.value)
    assert (path.read_bytes(), head_path(path).read_bytes()) == before


def test_another_actor_cannot_append(tmp_path: Path) -> None:
    _log(tmp_path).append("a")
    path = tmp_path / "audit.jsonl"
    before = path.read_bytes()
    with pytest.raises(AuditError, match="not to 'hospital-a'"):
        _log(tmp_path, actor="hospital-a").append("b")
    assert path.read_bytes() == before


def test_the_same_party_can_reopen_and_continue(tmp_path: Path) -> None:
    _log(tmp_path).append("a")
    _log(tmp_path).append("b")
    assert [e["seq"] for e in _lines(_log(tmp_path))] == [0, 1, 2]
    assert verify_log(tmp_path / "audit.jsonl", KEY.public_key()).ok


def test_an_incomplete_last_line_refuses_appends_and_is_left_alone(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for n in range(3):
        log.append("tick", n=n)
    content = log.path.read_bytes()
    cut = content[: len(content) - 20]  # the last line lost its end (and its newline)
    log.path.write_bytes(cut)
    head = log.head_path.read_bytes()
    with pytest.raises(AuditError, match="does not end with a complete entry"):
        log.append("tick", n=99)
    assert log.path.read_bytes() == cut
    assert log.head_path.read_bytes() == head
    assert issubclass(AuditError, FedloraError)


def test_a_damaged_last_line_refuses_appends(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("tick")
    with log.path.open("ab") as handle:
        handle.write(b"{not json\n")
    content = log.path.read_bytes()
    with pytest.raises(AuditError, match=r"last entry of audit log audit\.jsonl is damaged"):
        log.append("tick")
    assert log.path.read_bytes() == content


def test_a_damaged_first_line_refuses_appends(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.path.write_bytes(b"garbage\n")
    with pytest.raises(AuditError, match=r"first entry of audit log audit\.jsonl is damaged"):
        log.append("tick")
    assert log.path.read_bytes() == b"garbage\n"


def test_a_long_last_line_is_read_from_the_end(tmp_path: Path) -> None:
    """The tail is read in 4 KiB chunks; an entry longer than that still chains."""
    log = _log(tmp_path)
    log.append("big", blob="x" * 10_000)
    log.append("big", blob="y" * 9_000)
    log.append("small")
    assert [e["seq"] for e in _lines(log)] == [0, 1, 2, 3]
    assert verify_log(log.path, KEY.public_key()).ok


# -------------------------------------------------------------------- concurrency ---

PROCESSES = 4
APPENDS = 25


def _append_in_child(key_path: str, log_path: str, worker: int, barrier: Any) -> None:
    log = AuditLog(Path(log_path), ACTOR, load_private_key(Path(key_path)))
    barrier.wait(timeout=30)
    for n in range(APPENDS):
        log.append("tick", worker=worker, n=n)


def test_concurrent_appends_from_several_processes_make_one_chain(tmp_path: Path) -> None:
    key_path = tmp_path / "coordinator.key"
    write_private_key(key_path, KEY)
    log_path = tmp_path / "logs" / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    processes = [
        context.Process(
            target=_append_in_child, args=(str(key_path), str(log_path), worker, barrier)
        )
        for worker in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * PROCESSES

    entries = read_entries(log_path)
    total = 1 + PROCESSES * APPENDS
    assert len(read_lines(log_path)) == total
    assert [e["seq"] for e in entries] == list(range(total))
    assert sum(e["event"] == LOG_OPENED for e in entries) == 1
    ticks = [(e["data"]["worker"], e["data"]["n"]) for e in entries[1:]]
    assert sorted(ticks) == [(w, n) for w in range(PROCESSES) for n in range(APPENDS)]
    for worker in range(PROCESSES):  # each process's entries stay in its own order
        assert [n for w, n in ticks if w == worker] == list(range(APPENDS))

    result = verify_log(log_path, KEY.public_key())
    assert result.ok, result.findings
    assert result.entries == total
    assert result.head_seq == total - 1
    head = read_head(head_path(log_path))
    assert head is not None
    assert head["hash"] == entries[-1]["hash"]


# ------------------------------------------------------------------------ reading ---


def test_read_entries_skips_lines_that_do_not_parse(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("a")
    with log.path.open("a", encoding="utf-8") as handle:
        handle.write('not json\n[1, 2]\n"text"\n')
    log_lines = log.path.read_text(encoding="utf-8").splitlines()
    with log.path.open("a", encoding="utf-8") as handle:
        handle.write(log_lines[1][:30])  # half an entry, no newline
    entries = read_entries(log.path)
    assert [e["seq"] for e in entries] == [0, 1]
    assert len(read_lines(log.path)) == 6


def test_read_lines_of_a_missing_log_is_an_audit_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log at"):
        read_lines(tmp_path / "absent.jsonl")
    with pytest.raises(AuditError):
        read_entries(tmp_path / "absent.jsonl")


def test_read_lines_of_a_binary_file_is_an_audit_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary\n")
    with pytest.raises(AuditError, match="is not a text log"):
        read_lines(path)


def test_read_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.head.json"
    assert read_head(path) is None
    path.write_text("{broken")
    assert read_head(path) == {}
    path.write_text("[1, 2]")
    assert read_head(path) == {}
    path.write_bytes(b"\xff\xfe")
    assert read_head(path) == {}
    path.write_text('{"seq": 1}')
    assert read_head(path) == {"seq": 1}


# ------------------------------------------------------------------ verify_log ---


def _cut_last_entry(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]), encoding="utf-8")


def test_verify_log_uses_the_head_beside_the_log(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for n in range(4):
        log.append("tick", n=n)
    assert verify_log(log.path).ok
    assert verify_log(log.path, KEY.public_key()).ok

    _cut_last_entry(log.path)
    result = verify_log(log.path)
    assert not result.ok
    assert result.first_problem is not None
    assert "1 entry was cut from the end" in result.first_problem.problem
    assert result.first_problem.line == 5


def test_verify_log_without_a_head_file_says_a_cut_is_undetectable(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("tick")
    log.head_path.unlink()
    result = verify_log(log.path, KEY.public_key())
    assert [(f.line, f.problem) for f in result.findings] == [
        (0, "no signed head to compare with: a cut tail could not be detected")
    ]


def test_verify_log_with_a_damaged_head_file(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("tick")
    log.head_path.write_text("{broken")
    result = verify_log(log.path)
    assert result.first_problem is not None
    assert result.first_problem.problem == "the signed head lacks 'log'"


def test_verify_log_prefers_an_explicit_head(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("a")
    early = read_head(log.head_path)
    log.append("b")
    log.append("c")
    assert early is not None
    assert verify_log(log.path, KEY.public_key(), head=early).head_seq == 1
    assert verify_log(log.path, KEY.public_key()).head_seq == 3

    # a head from the file is ignored when one is given: a cut tail hides from an old head
    _cut_last_entry(log.path)
    assert not verify_log(log.path, KEY.public_key()).ok
    assert verify_log(log.path, KEY.public_key(), head=early).ok


def test_verify_log_pinned_to_another_key_fails(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("a")
    result = verify_log(log.path, OTHER.public_key())
    assert result.first_problem is not None
    assert result.first_problem.line == 1
    assert "re-signed by another party" in result.first_problem.problem


def test_verify_log_catches_an_edit_on_disk(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append("decision", accepted=True)
    log.append("tick")
    text = log.path.read_text(encoding="utf-8")
    assert '"accepted": true' in text
    log.path.write_text(text.replace('"accepted": true', '"accepted": false'), encoding="utf-8")
    result = verify_log(log.path, KEY.public_key())
    assert result.first_problem is not None
    assert result.first_problem.line == 2
    assert "entry 1 was edited" in result.first_problem.problem
