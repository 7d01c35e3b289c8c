"""Ledger watermarks: rollback and fork refused, progress accepted, persistence, bad files."""

from __future__ import annotations

import pytest

from cleanroom.coordinator.watermarks import LedgerWatermarks
from cleanroom.errors import ConfigError
from cleanroom.protocol.binding import Binding

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


def test_two_runs_flushing_never_lower_each_others_marks(tmp_path):
    path = tmp_path / "w.json"
    long_run, short_run = LedgerWatermarks(path), LedgerWatermarks(path)
    short_run.advance("va", 8, B)
    short_run.advance("hungary", 3, A)
    short_run.flush()
    long_run.advance("va", 4, A)  # loaded before the short run wrote: knows less
    long_run.flush()
    merged = LedgerWatermarks(path)
    assert merged.get("va").records == 8 and merged.get("va").head == B
    assert merged.get("hungary").records == 3


def test_strategy_state_round_trips_lists_dicts_and_arrays(tmp_path):
    """FedAvgM keeps its momentum as a list of arrays, FedAdam as dicts: both survive."""
    from collections import OrderedDict

    import numpy as np
    from flwr.serverapp.strategy import FedAvgM

    from cleanroom.coordinator.checkpoint import (
        Checkpoint,
        append_round,
        load_checkpoint,
        restore_strategy_state,
        strategy_state,
        write_checkpoint,
    )

    inner = FedAvgM(server_momentum=0.5)
    inner.momentum_vector = [np.ones(3), np.zeros((2, 2))]
    append_round(tmp_path, {"round": 1})
    write_checkpoint(tmp_path, Checkpoint("1", 1, 2, OrderedDict(w=np.zeros(1)),
                                          strategy_state(inner)))
    fresh = FedAvgM(server_momentum=0.5)
    restore_strategy_state(fresh, load_checkpoint(tmp_path).state)
    assert [v.tolist() for v in fresh.momentum_vector] == [[1, 1, 1], [[0, 0], [0, 0]]]
