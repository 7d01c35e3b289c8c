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


def test_torn_last_line_recovered(tmp_path):
    path = tmp_path / "j.jsonl"
    j = SealedJournal(path, KEY, "test")
    j.append({"i": 0})
    j.append({"i": 1})
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # crash in the middle of writing the last record
    again = SealedJournal(path, KEY, "test")
    assert again.recovered_torn_line
    assert again.records() == [{"i": 0}]
    again.append({"i": 2})
    assert SealedJournal(path, KEY, "test").records() == [{"i": 0}, {"i": 2}]


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
    assert a.records() == [{"v": "bbbb"}]
    assert a.head == b.head
