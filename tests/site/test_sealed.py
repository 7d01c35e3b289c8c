"""The sealed journal: confidentiality, integrity, order, torn-line recovery."""

from __future__ import annotations

import json
import os

import pytest

from cleanroom.errors import LedgerError
from cleanroom.site_agent.sealed import SealedJournal, atomic_write, seal_blob, unseal_blob

KEY = b"k" * 32


def test_records_roundtrip_and_are_not_plaintext(tmp_path):
    j = SealedJournal(tmp_path / "j.jsonl", KEY, "test")
    j.append({"secret": "epsilon 0.42 for cleveland"})
    j.append({"n": 2})
    raw = (tmp_path / "j.jsonl").read_bytes()
    assert b"cleveland" not in raw and b"0.42" not in raw
    again = SealedJournal(tmp_path / "j.jsonl", KEY, "test")
    assert again.records() == [{"secret": "epsilon 0.42 for cleveland"}, {"n": 2}]
    assert oct(os.stat(tmp_path / "j.jsonl").st_mode & 0o777) == "0o600"


def test_other_key_or_label_cannot_open(tmp_path):
    SealedJournal(tmp_path / "j.jsonl", KEY, "test").append({"a": 1})
    with pytest.raises(LedgerError, match="does not open"):
        SealedJournal(tmp_path / "j.jsonl", b"x" * 32, "test")
    with pytest.raises(LedgerError, match="does not open"):
        SealedJournal(tmp_path / "j.jsonl", KEY, "other")


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_removed_middle_record_detected(tmp_path):
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    for i in range(3):
        j.append({"i": i})
    lines = _lines(path)
    path.write_bytes(lines[0] + lines[2])
    with pytest.raises(LedgerError, match="record 1"):
        SealedJournal(path, KEY, "test")


def test_reordered_records_detected(tmp_path):
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    for i in range(3):
        j.append({"i": i})
    lines = _lines(path)
    path.write_bytes(lines[0] + lines[2] + lines[1])
    with pytest.raises(LedgerError):
        SealedJournal(path, KEY, "test")


def test_modified_ciphertext_detected(tmp_path):
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    j.append({"i": 0})
    j.append({"i": 1})
    lines = _lines(path)
    entry = json.loads(lines[0])
    entry["ct"] = entry["ct"][:-4] + ("AAAA" if entry["ct"][-4:] != "AAAA" else "BBBB")
    path.write_bytes(json.dumps(entry).encode() + b"\n" + lines[1])
    with pytest.raises(LedgerError):
        SealedJournal(path, KEY, "test")


def test_torn_last_line_recovered_and_the_recovery_recorded(tmp_path):
    """A crash in the middle of an append leaves a partial line that its head record never
    acknowledged: dropped on open, and the journal says so."""
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    j.append({"i": 0})
    j.append({"i": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"seq":2,"prev":"3f2a","nonce":"AAAA","ct":"Zm9v')  # killed mid-write
    again = SealedJournal(path, KEY, "test")
    assert again.recovered_torn_line
    records = again.records()
    assert records[:2] == [{"i": 0}, {"i": 1}]
    assert records[2]["kind"] == "recovered-torn-write" and records[2]["records"] == 2
    again.append({"i": 2})
    assert SealedJournal(path, KEY, "test").records()[3] == {"i": 2}


@pytest.mark.parametrize("cut", ["partial", "whole-line"])
def test_removing_an_acknowledged_record_is_a_rollback_not_a_torn_write(tmp_path, cut):
    """A host that strips the end of the ledger (to refund budget) is refused every time,
    whether it leaves a partial line behind or removes whole lines."""
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    for i in range(3):
        j.append({"i": i})
    data = path.read_bytes()
    path.write_bytes(data[:-20] if cut == "partial" else b"".join(_lines(path)[:-1]))
    with pytest.raises(LedgerError, match="holds 2 complete records but its sealed head record "
                       "names 3: acknowledged records were removed"):
        SealedJournal(path, KEY, "test")


def test_a_journal_without_its_head_record_is_refused(tmp_path):
    path = tmp_path / "j.jsonl"
    SealedJournal(path, KEY, "test").append({"i": 0})
    (tmp_path / "j.jsonl.head").unlink()
    with pytest.raises(LedgerError, match=r"head record j\.jsonl\.head is missing"):
        SealedJournal(path, KEY, "test")
    SealedJournal(tmp_path / "fresh.jsonl", KEY, "test")  # a journal never written: fine


def test_a_removed_journal_is_refused_when_its_head_remains(tmp_path):
    path = tmp_path / "j.jsonl"
    SealedJournal(path, KEY, "test").append({"i": 0})
    path.unlink()
    with pytest.raises(LedgerError, match="was removed"):
        SealedJournal(path, KEY, "test")


def test_a_crash_between_append_and_head_record_keeps_the_record(tmp_path):
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    j.append({"i": 0})
    head = (tmp_path / "j.jsonl.head").read_bytes()
    j.append({"i": 1})
    (tmp_path / "j.jsonl.head").write_bytes(head)  # the head write never happened
    again = SealedJournal(path, KEY, "test")
    assert again.records() == [{"i": 0}, {"i": 1}] and not again.recovered_torn_line


def test_an_append_without_head_is_durable_and_covered_by_the_next(tmp_path):
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    j.append({"i": 0})
    head = (tmp_path / "j.jsonl.head").read_bytes()
    j.append({"i": 1}, head=False)
    assert (tmp_path / "j.jsonl.head").read_bytes() == head  # deferred
    assert SealedJournal(path, KEY, "test").records() == [{"i": 0}, {"i": 1}]
    j.append({"i": 2})  # advances the head record over both
    path.write_bytes(b"".join(_lines(path)[:2]))
    with pytest.raises(LedgerError, match="names 3: acknowledged records were removed"):
        SealedJournal(path, KEY, "test")


def test_two_writers_share_a_journal(tmp_path):
    a = SealedJournal(tmp_path / "j.jsonl", KEY, "test")
    b = SealedJournal(tmp_path / "j.jsonl", KEY, "test")
    a.append({"w": "a"})
    b.append({"w": "b"})
    assert a.records() == [{"w": "a"}, {"w": "b"}]


def test_blob_seal(tmp_path):
    blob = seal_blob(KEY, b"private key", b"label")
    assert b"private key" not in blob
    assert unseal_blob(KEY, blob, b"label") == b"private key"
    with pytest.raises(LedgerError):
        unseal_blob(KEY, blob, b"other")


def test_atomic_write(tmp_path):
    atomic_write(tmp_path / "f", b"one")
    atomic_write(tmp_path / "f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_same_size_swap_is_noticed(tmp_path):
    """A file replaced by another of exactly the same size (an older fork) is re-read, not
    served from memory."""
    a = SealedJournal(tmp_path / "a.jsonl", KEY, "l")
    b = SealedJournal(tmp_path / "b.jsonl", KEY, "l")
    a.append({"v": "aaaa"})
    b.append({"v": "bbbb"})
    assert a.records() == [{"v": "aaaa"}]
    (tmp_path / "a.jsonl").write_bytes((tmp_path / "b.jsonl").read_bytes())  # same size
    with pytest.raises(LedgerError, match="replaced by another"):  # its head record disagrees
        a.records()
    (tmp_path / "a.jsonl.head").write_bytes((tmp_path / "b.jsonl.head").read_bytes())
    assert a.records() == [{"v": "bbbb"}]
    assert a.head == b.head
