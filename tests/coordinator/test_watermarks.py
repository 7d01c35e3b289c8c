"""Ledger watermarks: rollback and fork refused, progress accepted, persistence, bad files."""

from __future__ import annotations

import pytest

from cleanroom.errors import ConfigError
from cleanroom.protocol.binding import Binding
from coordinator.watermarks import LedgerWatermarks

A, B = "a" * 64, "b" * 64


def test_progress_accepted_rollback_and_fork_refused(tmp_path):
    marks = LedgerWatermarks(tmp_path / "w.json")
    assert marks.check("va", 0, "0" * 64) is None  # first sight
    marks.advance("va", 4, A)
    assert marks.check("va", 4, A) is None  # same state (a site attests twice)
    assert marks.check("va", 6, B) is None  # grew
    assert "holds 2 records, this coordinator already saw 4" in marks.check("va", 2, B)
    assert "forked at 4 records" in marks.check("va", 4, B)
    assert marks.check("hungary", 0, "0" * 64) is None  # per site
    marks.advance("va", 3, B)  # never moves backwards
    assert marks.get("va").records == 4


def test_persisted_across_restarts_and_only_when_changed(tmp_path):
    path = tmp_path / "w.json"
    marks = LedgerWatermarks(path)
    marks.flush()
    assert not path.exists()
    marks.advance("va", 4, A)
    marks.flush()
    again = LedgerWatermarks(path)
    assert again.get("va").records == 4 and again.get("va").head == A
    assert again.check("va", 1, A) is not None


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{"va": {"records": "x"}}')
    with pytest.raises(ConfigError, match="not a ledger watermark file"):
        LedgerWatermarks(path)


def test_ledger_state_is_bound_in_report_data():
    base = dict(run_id="1", round=1, site="va", nonce=bytes(32), site_public_key=bytes(32),
                model_digest="c" * 64)
    bound = Binding(**base, ledger_records=4, ledger_head=A).report_data()
    assert bound != Binding(**base, ledger_records=3, ledger_head=A).report_data()
    assert bound != Binding(**base, ledger_records=4, ledger_head=B).report_data()


def test_count_from_a_train_reply_then_head_from_the_next_attestation(tmp_path):
    marks = LedgerWatermarks(tmp_path / "w.json")
    marks.advance("va", 2, A)
    marks.advance("va", 4, None)  # train reply: the ledger after the charge, no head
    assert marks.check("va", 4, B) is None  # head unknown at 4: nothing to compare
    assert marks.check("va", 2, A) is not None  # but 2 < 4 is a rollback
    marks.advance("va", 4, B)  # the next attestation fills the head in
    assert marks.get("va").head == B
    assert "forked" in marks.check("va", 4, A)
    marks.flush()
    assert LedgerWatermarks(tmp_path / "w.json").get("va").head == B
