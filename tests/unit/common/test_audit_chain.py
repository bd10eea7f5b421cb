"""The audit chain's mathematics: encoding, hashing, sealing and, above all, that every
kind of tampering with a log's lines (or its head) is found and pointed at."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.audit.chain import (
    BODY_FIELDS,
    LOG_OPENED,
    Finding,
    Verification,
    canonical,
    entry_digest,
    json_safe,
    opening_data,
    seal,
    sign_head,
    verify_lines,
)
from common.audit.log import AuditLog, head_path, read_head, read_lines
from common.signing import fingerprint, public_key_text, sign
from tests.audit_runs import reseal_all

KEY = Ed25519PrivateKey.generate()
ATTACKER = Ed25519PrivateKey.generate()
ACTOR = "hospital-a"

Lines = list[str]
Head = dict[str, Any] | None


def _dump(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, sort_keys=True)


def _entry(line: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def _build(directory: Path, entries: int, key: Ed25519PrivateKey = KEY) -> tuple[Lines, Head]:
    """A real log of ``entries`` entries (the opening one included) and its head."""
    log = AuditLog(directory / "audit.jsonl", ACTOR, key)
    for n in range(entries - 1):
        log.append("round-finished", round=n, loss=1.0 / (n + 1), note=f"round {n} ✓")
    return read_lines(log.path), read_head(head_path(log.path))


@pytest.fixture(scope="module")
def log8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lines, Head]:
    return _build(tmp_path_factory.mktemp("log8"), 8)


@pytest.fixture(scope="module")
def log10(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lines, Head]:
    return _build(tmp_path_factory.mktemp("log10"), 10)


def _rehash(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "hash": entry_digest(entry)}


def _resign(entry: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    entry = _rehash(entry)
    return {**entry, "signature": sign(key, entry["hash"].encode("ascii"))}


def _reseal_all(
    entries: list[dict[str, Any]], key: Ed25519PrivateKey
) -> tuple[Lines, dict[str, Any]]:
    sealed, head = reseal_all(entries, key)
    return [_dump(e) for e in sealed], head


# -------------------------------------------------------------------- encoding ---


def test_canonical_is_independent_of_key_order() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": "é"}, "c": None}
    b = {"c": None, "a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert canonical(a) == canonical(b)
    assert canonical(a) == '{"a":{"x":"é","y":[1,2]},"b":1,"c":null}'.encode()


def test_canonical_distinguishes_values() -> None:
    assert canonical({"a": 1}) != canonical({"a": 2})
    assert canonical({"a": [1, 2]}) != canonical({"a": [2, 1]})


def test_canonical_refuses_non_finite_floats() -> None:
    with pytest.raises(ValueError):
        canonical({"a": math.nan})


def test_json_safe_converts_numpy_scalars() -> None:
    converted = json_safe(
        {"f32": np.float32(1.5), "f64": np.float64(2.25), "i": np.int64(7), "b": np.bool_(True)}
    )
    assert converted == {"f32": 1.5, "f64": 2.25, "i": 7, "b": True}
    assert type(converted["f32"]) is float
    assert type(converted["f64"]) is float
    assert type(converted["i"]) is int
    assert type(converted["b"]) is bool
    json.dumps(converted, allow_nan=False)  # plain JSON now


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, np.float64("nan"), np.float32("inf"), np.float32("-inf")],
)
def test_json_safe_turns_non_finite_into_none(value: Any) -> None:
    assert json_safe(value) is None
    assert json_safe({"v": [value, 1.0]}) == {"v": [None, 1.0]}


def test_json_safe_keeps_plain_values_and_normalises_containers() -> None:
    assert json_safe({1: (1, "a", None, False, [2.5])}) == {"1": [1, "a", None, False, [2.5]]}
    assert json_safe(True) is True


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes"])
def test_json_safe_refuses_other_types(value: Any) -> None:
    with pytest.raises(TypeError, match="audit data must be JSON values"):
        json_safe({"v": value})


def test_seal_makes_data_json_safe_and_signs_the_hash() -> None:
    entry = seal(
        KEY,
        seq=1,
        time="t",
        actor=ACTOR,
        event="e",
        data={"loss": np.float32(math.nan), "n": np.int32(3)},
        prev="ab" * 32,
    )
    assert entry["data"] == {"loss": None, "n": 3}
    assert entry["hash"] == entry_digest(entry)
    assert set(entry) == {*BODY_FIELDS, "hash", "signature"}


@pytest.mark.parametrize("name", BODY_FIELDS)
def test_entry_digest_commits_to_every_body_field(name: str) -> None:
    entry = seal(KEY, seq=1, time="t", actor=ACTOR, event="e", data={"x": 1}, prev="0" * 64)
    changed = {**entry, name: {"seq": 2, "data": {"x": 2}}.get(name, "other")}
    assert entry_digest(changed) != entry_digest(entry)


def test_entry_digest_ignores_hash_and_signature() -> None:
    entry = seal(KEY, seq=1, time="t", actor=ACTOR, event="e", data={}, prev="0" * 64)
    assert entry_digest({**entry, "hash": "x", "signature": "y"}) == entry["hash"]


def test_opening_data_names_the_key() -> None:
    data = opening_data(KEY)
    assert data["public_key"] == public_key_text(KEY.public_key())
    assert data["key"] == fingerprint(KEY.public_key())
    assert data["format"] == 1


def test_finding_text() -> None:
    assert str(Finding(3, "bad")) == "line 3: bad"
    assert str(Finding(0, "bad")) == "bad"
    result = Verification()
    assert result.ok
    assert result.first_problem is None
    result.add(2, "x")
    result.add(1, "y")
    assert not result.ok
    assert result.first_problem == Finding(2, "x")


# --------------------------------------------------------------- an honest log ---


@pytest.mark.parametrize("pinned", [True, False])
def test_untampered_log_verifies(log8: tuple[Lines, Head], pinned: bool) -> None:
    lines, head = log8
    result = verify_lines(lines, KEY.public_key() if pinned else None, head)
    assert result.ok, result.findings
    assert result.first_problem is None
    assert result.entries == 8
    assert result.actor == ACTOR
    assert result.key == fingerprint(KEY.public_key())
    assert result.key_pinned is pinned
    assert result.head_seq == 7
    assert _entry(lines[0])["event"] == LOG_OPENED


def test_json_layout_is_not_part_of_the_seal(log8: tuple[Lines, Head]) -> None:
    """Re-serialising lines (other key order, spacing, escaping) changes nothing."""
    lines, head = log8
    relaid = [json.dumps(dict(reversed(_entry(line).items())), indent=None) for line in lines]
    assert relaid != lines
    assert verify_lines([*relaid, "", "   "], KEY.public_key(), head).ok


def test_an_older_head_still_verifies(tmp_path: Path) -> None:
    """A head recorded earlier (say in an artifact manifest) fits a log that grew since."""
    log = AuditLog(tmp_path / "audit.jsonl", ACTOR, KEY)
    log.append("a")
    early = read_head(log.head_path)
    log.append("b")
    log.append("c")
    result = verify_lines(read_lines(log.path), KEY.public_key(), early)
    assert result.ok, result.findings
    assert result.head_seq == 1


# ------------------------------------------------------------------- tampering ---


def _edit_data(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    entry["data"]["loss"] = 0.0001
    return [*lines[:3], _dump(entry), *lines[4:]], head


def _edit_and_rehash(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    entry["data"]["loss"] = 0.0001
    return [*lines[:3], _dump(_rehash(entry)), *lines[4:]], head


def _edit_rehash_resign(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    entry["data"]["loss"] = 0.0001
    return [*lines[:3], _dump(_resign(entry, ATTACKER)), *lines[4:]], head


def _edit_time_only(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    entry["time"] = "1999-01-01T00:00:00.000Z"
    return [*lines[:3], _dump(entry), *lines[4:]], head


def _edit_signature(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    entry["signature"] = _entry(lines[4])["signature"]
    return [*lines[:3], _dump(entry), *lines[4:]], head


def _add_field(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    entry["comment"] = "approved"
    return [*lines[:3], _dump(entry), *lines[4:]], head


def _drop_field(lines: Lines, head: Head) -> tuple[Lines, Head]:
    entry = _entry(lines[3])
    del entry["signature"]
    return [*lines[:3], _dump(entry), *lines[4:]], head


def _drop_middle(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return [*lines[:3], *lines[4:]], head


def _drop_first(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return lines[1:], head


def _insert_copy(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return [*lines[:6], lines[2], *lines[6:]], head


def _insert_adjacent_copy(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return [*lines[:5], lines[4], *lines[5:]], head


def _insert_forged(lines: Lines, head: Head) -> tuple[Lines, Head]:
    before = _entry(lines[3])
    forged = seal(
        ATTACKER,
        seq=4,
        time=before["time"],
        actor=ACTOR,
        event="round-finished",
        data={"round": 99, "loss": 0.0},
        prev=before["hash"],
    )
    return [*lines[:4], _dump(forged), *lines[4:]], head


def _append_forged(lines: Lines, head: Head) -> tuple[Lines, Head]:
    last = _entry(lines[-1])
    forged = seal(
        ATTACKER,
        seq=8,
        time=last["time"],
        actor=ACTOR,
        event="round-finished",
        data={"round": 99},
        prev=last["hash"],
    )
    return [*lines, _dump(forged)], head


def _swap(lines: Lines, head: Head) -> tuple[Lines, Head]:
    swapped = list(lines)
    swapped[2], swapped[5] = swapped[5], swapped[2]
    return swapped, head


def _not_an_object(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return [*lines[:3], "[1, 2, 3]", *lines[4:]], head


def _cut_tail_1(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return lines[:-1], head


def _cut_tail_3(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return lines[:-3], head


def _cut_half_last_line(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return [*lines[:-1], lines[-1][: len(lines[-1]) // 2]], head


def _head_by_another_key(lines: Lines, head: Head) -> tuple[Lines, Head]:
    assert head is not None
    forged = sign_head(ATTACKER, log=head["log"], seq=head["seq"], digest=head["hash"], time="t")
    return lines, forged


def _head_edited(lines: Lines, head: Head) -> tuple[Lines, Head]:
    assert head is not None
    return lines, {**head, "seq": head["seq"] + 2}


def _head_missing(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return lines, None


def _head_incomplete(lines: Lines, head: Head) -> tuple[Lines, Head]:
    assert head is not None
    return lines, {k: v for k, v in head.items() if k != "signature"}


def _head_empty(lines: Lines, head: Head) -> tuple[Lines, Head]:
    return lines, {}


TAMPERING: list[tuple[Callable[[Lines, Head], tuple[Lines, Head]], int, str]] = [
    (_edit_data, 4, "entry 3 was edited: its content no longer matches its hash"),
    (_edit_time_only, 4, "entry 3 was edited"),
    (_edit_and_rehash, 4, "entry 3's signature is not by key"),
    (_edit_rehash_resign, 4, "entry 3's signature is not by key"),
    (_edit_signature, 4, "entry 3's signature is not by key"),
    (_add_field, 4, "fields changed: unexpected comment"),
    (_drop_field, 4, "fields changed: missing signature"),
    (_not_an_object, 4, "not a JSON object"),
    (_drop_middle, 4, "sequence number 4 where 3 belongs"),
    (_drop_first, 1, "the first entry must be 'log-opened'"),
    (_insert_copy, 7, "sequence number 2 where 6 belongs"),
    (_insert_adjacent_copy, 6, "sequence number 4 where 5 belongs"),
    (_insert_forged, 5, "entry 4's signature is not by key"),
    (_append_forged, 9, "entry 8's signature is not by key"),
    (_swap, 3, "sequence number 5 where 2 belongs"),
    (_cut_tail_1, 8, "the log ends at entry 6 but its signed head records entry 7"),
    (_cut_tail_3, 6, "the log ends at entry 4 but its signed head records entry 7"),
    (_cut_half_last_line, 8, "not valid JSON"),
    (_head_by_another_key, 0, "the head's signature is not by key"),
    (_head_edited, 0, "the head's signature is not by key"),
    (_head_missing, 0, "a cut tail could not be detected"),
    (_head_incomplete, 0, "the signed head lacks 'signature'"),
    (_head_empty, 0, "the signed head lacks 'log'"),
]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
@pytest.mark.parametrize(
    ("tamper", "line", "message"),
    TAMPERING,
    ids=[tamper.__name__.strip("_") for tamper, _, _ in TAMPERING],
)
def test_tampering_is_detected_where_it_happened(
    log8: tuple[Lines, Head],
    tamper: Callable[[Lines, Head], tuple[Lines, Head]],
    line: int,
    message: str,
    pinned: bool,
) -> None:
    lines, head = log8
    assert verify_lines(lines, KEY.public_key(), head).ok  # the untouched log is fine
    lines, head = tamper(list(lines), None if head is None else dict(head))
    result = verify_lines(lines, KEY.public_key() if pinned else None, head)
    assert not result.ok
    problem = result.first_problem
    assert problem is not None
    assert problem.line == line, result.findings
    assert message in problem.problem, result.findings


def test_a_broken_chain_is_reported_on_the_following_line(log8: tuple[Lines, Head]) -> None:
    """A re-hashed entry changes its hash, so the next entry no longer follows it."""
    lines, head = log8
    lines, head = _edit_rehash_resign(list(lines), head)
    result = verify_lines(lines, KEY.public_key(), head)
    assert [f.line for f in result.findings] == [4, 5]
    assert "entry 4 does not follow the entry before it" in result.findings[1].problem


@pytest.mark.parametrize(("cut", "text"), [(1, "1 entry was"), (3, "3 entries were")])
def test_a_cut_tail_is_detected_only_through_the_head(
    log8: tuple[Lines, Head], cut: int, text: str
) -> None:
    lines, head = log8
    shortened = lines[:-cut]
    without_head = verify_lines(shortened, KEY.public_key(), None)
    assert [f.problem for f in without_head.findings] == [
        "no signed head to compare with: a cut tail could not be detected"
    ]
    with_head = verify_lines(shortened, KEY.public_key(), head)
    assert len(with_head.findings) == 1
    assert with_head.first_problem is not None
    assert f"{text} cut from the end" in with_head.first_problem.problem
    assert with_head.first_problem.line == len(shortened) + 1
    assert with_head.head_seq == 7


def test_a_log_resigned_whole_by_another_key_passes_only_without_pinning(
    log8: tuple[Lines, Head],
) -> None:
    lines, _ = log8
    forged_lines, forged_head = _reseal_all([_entry(line) for line in lines], ATTACKER)
    assert forged_lines != lines

    unpinned = verify_lines(forged_lines, None, forged_head)
    assert unpinned.ok, unpinned.findings  # integrity holds; authorship is not proven
    assert unpinned.key == fingerprint(ATTACKER.public_key())
    assert not unpinned.key_pinned

    pinned = verify_lines(forged_lines, KEY.public_key(), forged_head)
    assert not pinned.ok
    assert pinned.first_problem is not None
    assert pinned.first_problem.line == 1
    assert "re-signed by another party" in pinned.first_problem.problem
    assert fingerprint(ATTACKER.public_key()) in pinned.first_problem.problem
    assert fingerprint(KEY.public_key()) in pinned.first_problem.problem


def test_a_resigned_log_does_not_fit_the_true_head(log8: tuple[Lines, Head]) -> None:
    lines, head = log8
    forged_lines, _ = _reseal_all([_entry(line) for line in lines], ATTACKER)
    result = verify_lines(forged_lines, None, head)
    assert [(f.line, f.problem) for f in result.findings] == [
        (0, f"the head's signature is not by key {fingerprint(ATTACKER.public_key())}")
    ]


def test_pinning_another_key_fails_on_the_first_line(log8: tuple[Lines, Head]) -> None:
    lines, head = log8
    result = verify_lines(lines, ATTACKER.public_key(), head)
    assert result.first_problem is not None
    assert result.first_problem.line == 1
    assert "re-signed by another party" in result.first_problem.problem


def test_the_head_of_another_log_is_refused(tmp_path: Path, log8: tuple[Lines, Head]) -> None:
    lines, _ = log8
    _, other_head = _build(tmp_path, 8)  # same key, same actor, another log
    result = verify_lines(lines, KEY.public_key(), other_head)
    assert [(f.line, f.problem) for f in result.findings] == [
        (0, "the head belongs to another log (its first entry differs)")
    ]


def test_history_rewritten_by_the_key_holder_is_caught_by_an_earlier_head(
    log8: tuple[Lines, Head],
) -> None:
    """The signer itself rewrites entries 5..7 after a head naming entry 7 was recorded."""
    lines, head = log8
    entries = [_entry(line) for line in lines]
    for entry in entries[5:]:
        entry["data"]["loss"] = 0.0
    prev = entries[4]["hash"]
    for entry in entries[5:]:
        entry["prev"] = prev
        entry.update(_resign(entry, KEY))
        prev = entry["hash"]
    rewritten = [*lines[:5], *(_dump(e) for e in entries[5:])]
    result = verify_lines(rewritten, KEY.public_key(), head)
    assert [(f.line, f.problem) for f in result.findings] == [
        (8, "entry 7 differs from the one the signed head records: history was rewritten")
    ]


def test_an_entry_naming_another_actor_is_reported(log8: tuple[Lines, Head]) -> None:
    lines, head = log8
    entry = _entry(lines[3])
    entry["actor"] = "bank-b"
    tampered = [*lines[:3], _dump(_resign(entry, KEY)), *lines[4:]]
    result = verify_lines(tampered, KEY.public_key(), head)
    assert [(f.line, f.problem) for f in result.findings] == [
        (4, "entry 3 names another actor ('bank-b')"),
        (
            5,
            "entry 4 does not follow the entry before it (its 'prev' hash differs): "
            "the chain is broken here",
        ),
    ]


def test_an_opening_entry_without_a_usable_key_is_reported(log8: tuple[Lines, Head]) -> None:
    lines, head = log8
    entry = _entry(lines[0])
    entry["data"]["public_key"] = "garbage"
    result = verify_lines([_dump(_rehash(entry)), *lines[1:]], None, head)
    assert result.first_problem is not None
    assert result.first_problem.line == 1
    assert "the opening entry's public key is unusable" in result.first_problem.problem


@pytest.mark.parametrize("lines", [[], [""], ["", "  ", "\t"]])
def test_an_empty_log_is_a_finding(lines: Lines, log8: tuple[Lines, Head]) -> None:
    _, head = log8
    for key in (None, KEY.public_key()):
        result = verify_lines(lines, key, head)
        assert not result.ok
        assert result.entries == 0
        assert [(f.line, f.problem) for f in result.findings] == [(0, "the log is empty")]


# ------------------------------------------------------------- property style ---


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_deleting_any_line_is_detected(log10: tuple[Lines, Head], pinned: bool) -> None:
    lines, head = log10
    key = KEY.public_key() if pinned else None
    assert len(lines) == 10
    assert verify_lines(lines, key, head).ok
    for index in range(len(lines)):
        result = verify_lines([*lines[:index], *lines[index + 1 :]], key, head)
        assert not result.ok, f"deleting line {index + 1} went unnoticed"
        assert result.first_problem is not None
        # the first problem is at the line that took the deleted one's place (for the
        # last line: just past the end, where the head says an entry should be)
        assert result.first_problem.line == index + 1, (index, result.findings)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_swapping_any_adjacent_pair_is_detected(log10: tuple[Lines, Head], pinned: bool) -> None:
    lines, head = log10
    key = KEY.public_key() if pinned else None
    for index in range(len(lines) - 1):
        swapped = list(lines)
        swapped[index], swapped[index + 1] = swapped[index + 1], swapped[index]
        result = verify_lines(swapped, key, head)
        assert not result.ok, f"swapping lines {index + 1} and {index + 2} went unnoticed"
        assert result.first_problem is not None
        assert result.first_problem.line == index + 1, (index, result.findings)


def test_changing_any_single_entry_field_is_detected(log10: tuple[Lines, Head]) -> None:
    lines, head = log10
    for index in range(len(lines)):
        for name in (*BODY_FIELDS, "hash", "signature"):
            entry = _entry(lines[index])
            value = entry[name]
            entry[name] = value + 1 if isinstance(value, int) else {"tampered": True}
            tampered = [*lines[:index], _dump(entry), *lines[index + 1 :]]
            result = verify_lines(tampered, KEY.public_key(), head)
            assert not result.ok, (index, name)
            assert result.first_problem is not None
            assert result.first_problem.line == index + 1, (index, name, result.findings)
