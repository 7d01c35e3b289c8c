"""The site's privacy ledger: every DP charge, sealed, persisted, and checked against budgets.

One ledger per site lives across rounds, runs and restarts (it is a :class:`SealedJournal`).
The accountant is never re-made per round: epsilon is always recomputed from the *whole* charge
history with the same RDP accountant that calibrated the noise. A charge is written in two
phases: ``reserve`` (before training, with the planned steps, after checking both budgets) and
``commit`` (after training, with the steps actually taken, before the update leaves the site).
A crash between the two leaves the reservation, which still counts: conservative, never lost,
never counted twice (charges are keyed by run and round). A retried round replaces only a
reservation (nothing was released); a round whose update was released (committed) is never
trained again: asking for it is refused as ``round-replayed``, else a coordinator could average
away the noise by asking for the same round again and again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cleanroom.errors import LedgerError, PrivacyBudgetExceeded, SiteRefusal
from cleanroom.site_agent.sealed import SealedJournal

log = logging.getLogger(__name__)

EPSILON_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Charge:
    """One DP charge: ``steps`` Gaussian steps at ``noise_multiplier`` and ``sample_rate``."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    status: str  # "reserved" | "committed"
    epsilon_after: float | None = None  # run-cumulative epsilon after this charge
    recorded_at: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.run_id}:{self.round}"

    def history_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Projection:
    """Epsilon after a planned charge: for this run and over the site's lifetime."""

    epsilon_round: float
    epsilon_run: float
    epsilon_lifetime: float


class EpsilonMemo:
    """Accountant answers (and the mod's other costly values: noise multiplier, architecture
    digest) kept across processes (Flower may start one process per message; with this the
    attestation query need not import torch or Opacus).

    Entries live in an untrusted store (the node's Flower context) and are MACed with a key
    from the enclave: a forged or edited entry is ignored and recomputed, never believed.
    """

    def __init__(self, store: MutableMapping[str, Any], key: bytes) -> None:
        self.store, self.key = store, key

    def _mac(self, name: str, value: str) -> str:
        return hmac.new(self.key, f"{name}={value}".encode(), hashlib.sha256).hexdigest()

    def get_text(self, name: str) -> str | None:
        entry = self.store.get(name) if name in self.store else None
        if not isinstance(entry, str) or "|" not in entry:
            return None
        value, mac = entry.rsplit("|", 1)
        if not hmac.compare_digest(mac, self._mac(name, value)):
            log.warning("ignoring a tampered memo entry %s", name[:24])
            return None
        return value

    def put_text(self, name: str, value: str) -> None:
        self.store[name] = f"{value}|{self._mac(name, value)}"

    def get(self, name: str) -> float | None:
        text = self.get_text(name)
        return None if text is None else float(text)

    def put(self, name: str, value: float) -> None:
        self.put_text(name, repr(float(value)))


def _memo_name(history: tuple[tuple[float, float, int], ...], delta: float) -> str:
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:  # order-free: the accountant composes additively
        merged[(float(sigma), float(rate))] = merged.get((float(sigma), float(rate)), 0) + \
            int(steps)
    canonical = repr((sorted(merged.items()), float(delta)))
    return "eps:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def epsilon_of(history: list[tuple[float, float, int]], delta: float,
               memo: EpsilonMemo | None = None) -> float:
    """Epsilon of a charge history (the accountant is pure: cache its answers)."""
    key = tuple(history)
    if memo is None or not key:
        return _epsilon_cached(key, delta)
    name = _memo_name(key, delta)
    value = memo.get(name)
    if value is None:
        value = _epsilon_cached(key, delta)
        memo.put(name, value)
    return value


@lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    from cleanroom.site_agent.training import epsilon_spent

    return float(epsilon_spent(list(history), delta))


class PrivacyLedger:
    """Sealed, persistent DP accounting for one site."""

    def __init__(self, path: Path, key: bytes, *, delta: float, lifetime_epsilon: float,
                 run_epsilon: float | None = None) -> None:
        if not 0 < delta < 1:
            raise LedgerError(f"delta must be in (0, 1), got {delta}")
        if lifetime_epsilon <= 0:
            raise LedgerError(f"lifetime epsilon must be > 0, got {lifetime_epsilon}")
        self.journal = SealedJournal(path, key, label="privacy-ledger")
        self.delta = delta
        self.lifetime_epsilon = lifetime_epsilon
        self.run_epsilon = run_epsilon
        self.memo: EpsilonMemo | None = None
        self._latest: dict[str, Charge] = {}
        self._parsed = 0
        self._last: dict[str, Any] | None = None

    def state(self) -> tuple[int, str]:
        """(records, head hash) of the sealed journal: grows with every charge, never shrinks
        unless the file is replaced by an older copy."""
        return self.journal.state()

    def head_at(self, records: int) -> str | None:
        """The journal's head when it held ``records`` records (the coordinator's anchor)."""
        return self.journal.head_at(records)

    def charges(self) -> list[Charge]:
        """Effective charges: the latest record per (run, round), in first-seen order.

        Parsed incrementally: only records appended since the last call (by this or another
        process) are decoded, so a long-lived ledger costs O(new records) per call."""
        with self.journal.locked():
            return self._charges_locked()

    def _charges_locked(self) -> list[Charge]:
        records = self.journal.records()
        if self._parsed and (len(records) < self._parsed
                             or records[self._parsed - 1] != self._last):
            self._latest, self._parsed = {}, 0  # the journal shrank or was replaced: re-read
        for rec in records[self._parsed:]:
            if rec.get("kind") != "charge":
                continue
            charge = Charge(run_id=rec["run_id"], round=int(rec["round"]),
                            noise_multiplier=float(rec["noise_multiplier"]),
                            sample_rate=float(rec["sample_rate"]), steps=int(rec["steps"]),
                            status=rec["status"], epsilon_after=rec.get("epsilon_after"),
                            recorded_at=float(rec.get("recorded_at", 0.0)))
            self._latest[charge.key] = charge
        self._parsed = len(records)
        self._last = records[-1] if records else None
        return list(self._latest.values())

    def spent(self, run_id: str | None = None) -> float:
        """Epsilon spent so far, over one run or (None) over the site's lifetime."""
        history = [c.history_entry() for c in self.charges()
                   if run_id is None or c.run_id == run_id]
        return epsilon_of(history, self.delta, self.memo)

    def project(self, run_id: str, round: int, noise_multiplier: float, sample_rate: float,
                steps: int) -> Projection:
        """Epsilon if this charge were added (replacing an earlier record of the same round)."""
        key = f"{run_id}:{round}"
        others = [c for c in self.charges() if c.key != key]
        planned = (noise_multiplier, sample_rate, steps)
        run_hist = [c.history_entry() for c in others if c.run_id == run_id]
        life_hist = [c.history_entry() for c in others]
        return Projection(epsilon_round=epsilon_of([planned], self.delta, self.memo),
                          epsilon_run=epsilon_of([*run_hist, planned], self.delta, self.memo),
                          epsilon_lifetime=epsilon_of([*life_hist, planned], self.delta,
                                                      self.memo))

    def check(self, run_id: str, round: int, noise_multiplier: float, sample_rate: float,
              steps: int) -> Projection:
        """Raise :class:`PrivacyBudgetExceeded` if the charge would pass either budget."""
        released = next((c for c in self.charges() if c.key == f"{run_id}:{round}"
                         and c.status == "committed"), None)
        if released is not None:
            raise SiteRefusal(
                "round-replayed", f"run {run_id} round {round} was already trained and its "
                f"update released ({released.steps} DP steps charged): training it again "
                "would release a second noisy answer for one charge")
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1 or steps < 0:
            raise PrivacyBudgetExceeded(
                f"invalid DP parameters (noise {noise_multiplier}, rate {sample_rate}, "
                f"steps {steps}): training without noise cannot be accounted")
        p = self.project(run_id, round, noise_multiplier, sample_rate, steps)
        if p.epsilon_lifetime > self.lifetime_epsilon + EPSILON_TOLERANCE:
            raise PrivacyBudgetExceeded(
                f"round {round} would bring lifetime epsilon to {p.epsilon_lifetime:.3f} > "
                f"budget {self.lifetime_epsilon:g} (delta {self.delta:g}); spent so far "
                f"{self.spent():.3f}")
        if self.run_epsilon is not None and p.epsilon_run > self.run_epsilon + EPSILON_TOLERANCE:
            raise PrivacyBudgetExceeded(
                f"round {round} would bring this run's epsilon to {p.epsilon_run:.3f} > "
                f"per-run budget {self.run_epsilon:g}")
        return p

    def _append(self, charge: Charge, *, head: bool) -> None:
        self.journal.append({
            "kind": "charge", "run_id": charge.run_id, "round": charge.round,
            "noise_multiplier": charge.noise_multiplier, "sample_rate": charge.sample_rate,
            "steps": charge.steps, "status": charge.status, "delta": self.delta,
            "epsilon_after": charge.epsilon_after, "recorded_at": charge.recorded_at,
        }, durable=True, head=head)

    def reserve(self, run_id: str, round: int, noise_multiplier: float, sample_rate: float,
                steps: int) -> Projection:
        """Check both budgets, then record the planned charge, atomically with respect to every
        other writer, and fsync'd: the next attestation reports the ledger's size, which must
        never shrink afterwards (the coordinator would take it for a rollback).

        The journal's head record is advanced by the :meth:`commit` that follows, not here
        (one head rewrite per round instead of two: 4 fsyncs per round instead of 6). Crash
        safety is unchanged: the reservation's line is fsync'd before this returns, so no crash
        loses it, and an open after a crash between the two advances the head record to it.
        What the deferral gives up, until the commit, is the journal's own detection of a host
        that deletes this last line on purpose; such a host gains nothing: the update of the
        round is released only after the commit (whose head record names the reservation
        too), so no noisy answer was released against the deleted reservation, and a host
        that can delete lines can as easily put back an older head record (a whole-state
        rollback, which the coordinator's ledger watermarks catch)."""
        with self.journal.locked():  # check-then-append, never interleaved with a writer
            p = self.check(run_id, round, noise_multiplier, sample_rate, steps)
            self._append(Charge(run_id, round, noise_multiplier, sample_rate, steps,
                                "reserved", p.epsilon_run, time.time()), head=False)
        return p

    def commit(self, run_id: str, round: int, steps_taken: int) -> Projection:
        """Record the steps actually taken (on disk before returning: call it before the
        update leaves the site)."""
        with self.journal.locked():
            return self._commit_locked(run_id, round, steps_taken)

    def _commit_locked(self, run_id: str, round: int, steps_taken: int) -> Projection:
        reserved = {c.key: c for c in self.charges()}.get(f"{run_id}:{round}")
        if reserved is None:
            raise LedgerError(f"no reservation for run {run_id} round {round}")
        if reserved.status != "reserved":
            raise LedgerError(f"run {run_id} round {round} is already committed")
        if steps_taken > reserved.steps:
            raise LedgerError(f"run {run_id} round {round}: took {steps_taken} steps, "
                              f"reserved only {reserved.steps}")
        p = self.project(run_id, round, reserved.noise_multiplier, reserved.sample_rate,
                         steps_taken)
        self._append(Charge(run_id, round, reserved.noise_multiplier, reserved.sample_rate,
                            steps_taken, "committed", p.epsilon_run, time.time()), head=True)
        return p
