"""The privacy ledger: budgets, two-phase charges, persistence, and surviving a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cleanroom.errors import LedgerError, PrivacyBudgetExceeded
from cleanroom.site_agent.ledger import PrivacyLedger, epsilon_of

KEY = b"L" * 32
SIGMA, RATE, STEPS = 3.0, 1.0, 2


def ledger(path, **kw) -> PrivacyLedger:
    args = {"delta": 1e-5, "lifetime_epsilon": 5.0, "run_epsilon": 3.0}
    args.update(kw)
    return PrivacyLedger(path, KEY, **args)


def test_charges_accumulate_and_persist(tmp_path):
    path = tmp_path / "ledger.jsonl"
    first = ledger(path)
    first.reserve("run1", 1, SIGMA, RATE, STEPS)
    p1 = first.commit("run1", 1, STEPS)
    first.reserve("run1", 2, SIGMA, RATE, STEPS)
    p2 = first.commit("run1", 2, STEPS)
    assert 0 < p1.epsilon_run < p2.epsilon_run
    again = ledger(path)  # a restart: same numbers from disk
    assert again.spent("run1") == pytest.approx(p2.epsilon_run)
    assert again.spent() == pytest.approx(epsilon_of([(SIGMA, RATE, STEPS)] * 2, 1e-5))


def test_lifetime_budget_refuses_with_typed_error(tmp_path):
    small = ledger(tmp_path / "l.jsonl", lifetime_epsilon=0.5, run_epsilon=None)
    with pytest.raises(PrivacyBudgetExceeded, match="lifetime epsilon") as info:
        small.check("run", 1, SIGMA, RATE, 50)
    assert info.value.code == "privacy-budget"


def test_run_budget_refuses(tmp_path):
    led = ledger(tmp_path / "l.jsonl", lifetime_epsilon=100.0, run_epsilon=0.8)
    with pytest.raises(PrivacyBudgetExceeded, match="per-run budget"):
        led.check("run", 1, SIGMA, RATE, 50)


def test_budget_spans_runs(tmp_path):
    led = ledger(tmp_path / "l.jsonl", lifetime_epsilon=3.5, run_epsilon=None)
    for run in ("a", "b"):
        led.reserve(run, 1, SIGMA, RATE, STEPS)
        led.commit(run, 1, STEPS)
    with pytest.raises(PrivacyBudgetExceeded):
        for round_ in range(1, 20):
            led.reserve("c", round_, SIGMA, RATE, STEPS)
            led.commit("c", round_, STEPS)
    assert led.spent() <= 3.5


def test_no_double_count_and_reservation_counts(tmp_path):
    led = ledger(tmp_path / "l.jsonl")
    led.reserve("r", 1, SIGMA, RATE, STEPS)
    reserved_only = led.spent()
    assert reserved_only > 0  # a reservation (crash before commit) still counts
    led.reserve("r", 1, SIGMA, RATE, STEPS)  # retried round: same key, not added twice
    assert led.spent() == pytest.approx(reserved_only)
    led.commit("r", 1, 1)  # fewer steps actually taken: charge shrinks to what happened
    assert led.spent() < reserved_only


def test_commit_guards(tmp_path):
    led = ledger(tmp_path / "l.jsonl")
    with pytest.raises(LedgerError, match="no reservation"):
        led.commit("r", 9, 1)
    led.reserve("r", 1, SIGMA, RATE, STEPS)
    with pytest.raises(LedgerError, match="reserved only"):
        led.commit("r", 1, STEPS + 1)
    with pytest.raises(PrivacyBudgetExceeded, match="without noise"):
        led.check("r", 2, 0.0, RATE, STEPS)


def test_wrong_key_cannot_read_or_write(tmp_path):
    led = ledger(tmp_path / "l.jsonl")
    led.reserve("r", 1, SIGMA, RATE, STEPS)
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path / "l.jsonl", b"X" * 32, delta=1e-5, lifetime_epsilon=5.0)


WRITER = r"""
import sys
from cleanroom.site_agent.ledger import PrivacyLedger
led = PrivacyLedger(sys.argv[1], b"L" * 32, delta=1e-5, lifetime_epsilon=1e9, run_epsilon=None)
round_ = len(led.charges()) + 1
while True:
    led.reserve("run", round_, 3.0, 1.0, 2)
    led.commit("run", round_, 2)
    print(f"reported {round_}", flush=True)
    round_ += 1
"""


def test_kill_during_writes_loses_nothing_reported(tmp_path):
    """SIGKILL a process in the middle of charging; everything it reported is on disk, the
    torn tail (if any) is dropped, and nothing is counted twice."""
    path = tmp_path / "ledger.jsonl"
    reported: set[int] = set()
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        while len(lines) < 3 + attempt and time.monotonic() < deadline:
            lines.append(proc.stdout.readline().strip())
        time.sleep(0.003 * attempt)  # land the kill at different points of a write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read().split()
        proc.stdout.close()
        reported |= {int(x.split()[-1]) for x in lines if x}
        reported |= {int(x) for x in rest if x.isdigit()}
        led = ledger(path, lifetime_epsilon=1e9, run_epsilon=None)
        committed = {c.round for c in led.charges() if c.status == "committed"}
        assert reported <= committed, "a reported charge was lost"
        charges = led.charges()
        assert len({c.key for c in charges}) == len(charges), "a charge counted twice"
        assert led.spent() == pytest.approx(epsilon_of(
            [c.history_entry() for c in charges], 1e-5))


RESERVER = r"""
import sys, time
from cleanroom.site_agent.ledger import PrivacyLedger
led = PrivacyLedger(sys.argv[1], b"L" * 32, delta=1e-5, lifetime_epsilon=1e9, run_epsilon=None)
led.reserve("run", 1, 3.0, 1.0, 2)
led.commit("run", 1, 2)
led.reserve("run", 2, 3.0, 1.0, 2)
print("reserved", flush=True)
time.sleep(60)  # killed here: after the reservation, before its commit
"""


def test_kill_between_reservation_and_commit_keeps_the_reservation(tmp_path):
    """The reservation's head record is deferred to its commit: a SIGKILL between the two
    loses nothing (the reservation's line was fsync'd), the next open advances the head
    record to it, and from then on removing it is a refused rollback."""
    path = tmp_path / "ledger.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", RESERVER, str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "reserved"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    led = ledger(path, lifetime_epsilon=1e9, run_epsilon=None)
    assert [(c.round, c.status) for c in led.charges()] == [(1, "committed"), (2, "reserved")]
    assert led.state()[0] == 3
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the host drops the reservation afterwards
    with pytest.raises(LedgerError, match="acknowledged records were removed"):
        ledger(path)


def test_a_commit_advances_the_head_record_over_its_reservation(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = ledger(path)
    led.reserve("run", 1, SIGMA, RATE, STEPS)
    head = (tmp_path / "ledger.jsonl.head").read_bytes()
    led.commit("run", 1, STEPS)
    assert (tmp_path / "ledger.jsonl.head").read_bytes() != head
    lines = path.read_bytes().splitlines(keepends=True)
    for keep in (1, 0):  # dropping the commit, or the reservation and the commit
        path.write_bytes(b"".join(lines[:keep]))
        with pytest.raises(LedgerError, match=r"acknowledged records were removed|was removed"):
            ledger(path)


def _no_accountant(monkeypatch):
    import cleanroom.site_agent.ledger as ledger_module
    import cleanroom.site_agent.training as training

    ledger_module._epsilon_cached.cache_clear()

    def refuse(*_a, **_k):
        raise AssertionError("the accountant ran: the memo was not used")

    monkeypatch.setattr(training, "epsilon_spent", refuse)


def test_memo_answers_the_next_check_without_the_accountant(tmp_path, monkeypatch):
    """What lets an attestation (a fresh process in deployment) skip importing Opacus: the
    train step answers the next round's budget check ahead into the node's context."""
    from cleanroom.site_agent.ledger import EpsilonMemo

    store: dict[str, object] = {}
    first = ledger(tmp_path / "l.jsonl")
    first.memo = EpsilonMemo(store, b"M" * 32)
    first.reserve("r", 1, SIGMA, RATE, STEPS)
    committed = first.commit("r", 1, STEPS)
    ahead = first.project("r", 2, SIGMA, RATE, STEPS)
    _no_accountant(monkeypatch)
    second = ledger(tmp_path / "l.jsonl")  # another process, same context store
    second.memo = EpsilonMemo(store, b"M" * 32)
    assert second.check("r", 2, SIGMA, RATE, STEPS) == ahead
    assert ahead.epsilon_run > committed.epsilon_run


def test_tampered_or_foreign_memo_entries_are_not_believed(tmp_path, monkeypatch):
    from cleanroom.site_agent.ledger import EpsilonMemo

    store: dict[str, object] = {}
    led = ledger(tmp_path / "l.jsonl")
    led.memo = EpsilonMemo(store, b"M" * 32)
    led.reserve("r", 1, SIGMA, RATE, STEPS)
    led.project("r", 2, SIGMA, RATE, STEPS)
    honest = {k: v for k, v in store.items()}
    for name, entry in store.items():  # an attacker lowers every cached epsilon
        _value, mac = str(entry).rsplit("|", 1)
        store[name] = f"0.001|{mac}"
    assert led.memo.get(next(iter(store))) is None
    other_key = EpsilonMemo(honest, b"X" * 32)  # entries MACed by another enclave
    assert other_key.get(next(iter(honest))) is None
    _no_accountant(monkeypatch)
    with pytest.raises(AssertionError, match="accountant ran"):
        led.check("r", 2, SIGMA, RATE, STEPS)  # forced to recompute, not to trust 0.001


def test_released_round_is_never_trained_again(tmp_path):
    """A coordinator that asks for the same round again (fresh nonce, same run and round) would
    get a second noisy answer under one charge and could average the noise away: refused."""
    from cleanroom.errors import SiteRefusal

    led = ledger(tmp_path / "l.jsonl")
    led.reserve("r", 1, SIGMA, RATE, STEPS)
    led.commit("r", 1, STEPS)
    spent = led.spent()
    with pytest.raises(SiteRefusal, match="already trained and its update released") as exc:
        led.check("r", 1, SIGMA, RATE, STEPS)
    assert exc.value.code == "round-replayed"
    with pytest.raises(SiteRefusal):
        led.reserve("r", 1, SIGMA, RATE, STEPS)
    with pytest.raises(LedgerError, match="already committed"):
        led.commit("r", 1, STEPS)
    assert led.spent() == pytest.approx(spent)
    led.reserve("r", 2, SIGMA, RATE, STEPS)  # the next round is fine
    assert led.check("other-run", 1, SIGMA, RATE, STEPS).epsilon_run > 0  # and other runs


def test_context_cache_of_the_mod_is_macd(tmp_path):
    """The noise multiplier and architecture digest cached in the node's Flower context are
    MACed too: an edited value is recomputed, not used."""
    from cleanroom.site_agent.ledger import EpsilonMemo
    from cleanroom.site_agent.settings import _cached

    store: dict[str, object] = {}
    memo = EpsilonMemo(store, b"M" * 32)
    assert _cached(memo, "sigma:x", lambda: 9.06) == 9.06
    assert _cached(memo, "sigma:x", lambda: 1 / 0) == 9.06  # cached: not recomputed
    _value, mac = str(store["sigma:x"]).rsplit("|", 1)
    store["sigma:x"] = f"0.01|{mac}"  # an attacker lowers the noise
    assert _cached(memo, "sigma:x", lambda: 9.06) == 9.06
