"""Privacy-ledger watermarks: the coordinator's memory of how far each site's ledger has got.

A site's sealed ledger is append-only, but a site's host can replace the file with an older
copy (a backup, a snapshot of the VM disk) and so "refund" privacy budget the site already
spent: the enclave alone cannot tell an old copy from the current one without a monotonic
counter. Every attestation binds the ledger's record count and head hash into report_data, so
the coordinator learns them from the enclave itself; it keeps the highest count it has seen per
site (persisted, across runs) and quarantines a site whose ledger went backwards, or forked
(same count, other head). It learns the count from every attestation (bound in the evidence)
and from every train reply (the ledger after that round's charge), so the last round of a run
counts too. What it cannot see: a rollback between two coordinators that share no
state, or one undone before the coordinator ever saw the newer state.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from cleanroom.errors import ConfigError
from cleanroom.fsutil import atomic_write


@dataclass(frozen=True)
class Watermark:
    records: int
    head: str | None  # None: learnt from a train reply, which carries the count only


class LedgerWatermarks:
    """Highest (records, head) seen per site; ``path`` makes it survive restarts."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._marks: dict[str, Watermark] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self._marks = {site: Watermark(int(v["records"]), None if v["head"] is None
                                               else str(v["head"]))
                               for site, v in raw.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{self.path}: not a ledger watermark file ({exc}); "
                                  "restore it from backup rather than delete it") from None

    def get(self, site: str) -> Watermark | None:
        return self._marks.get(site)

    def check(self, site: str, records: int, head: str) -> str | None:
        """Why (records, head) cannot follow what was seen before, or None."""
        mark = self._marks.get(site)
        if mark is None:
            return None
        if records < mark.records:
            return (f"privacy ledger rollback: the site's ledger holds {records} records, "
                    f"this coordinator already saw {mark.records}")
        if records == mark.records and mark.head is not None and head != mark.head:
            return (f"privacy ledger rollback: the site's ledger forked at {records} records "
                    f"(head {head[:16]}..., seen {mark.head[:16]}...)")
        return None

    def advance(self, site: str, records: int, head: str | None) -> None:
        """Raise the mark (never lower it). A claimed count can only make the site's own
        later attestations fail, so counts from train replies are safe to take."""
        with self._lock:
            mark = self._marks.get(site)
            if mark is None or records > mark.records or (
                    records == mark.records and mark.head is None and head is not None):
                self._marks[site] = Watermark(records, head)
                self._dirty = True

    def flush(self) -> None:
        """Persist (atomically) if anything advanced."""
        with self._lock:
            if self.path is None or not self._dirty:
                return
            atomic_write(self.path, json.dumps(
                {s: {"records": m.records, "head": m.head} for s, m in sorted(
                    self._marks.items())}, indent=1).encode())
            self._dirty = False
