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
from cleanroom.fsutil import atomic_write, exclusive_lock


@dataclass(frozen=True)
class Watermark:
    records: int  # the highest count seen (attestations and train replies)
    head: str | None  # head at ``anchor_records`` (None: nothing attested yet)
    anchor_records: int = 0  # the last attested count, whose head is ``head``


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
                self._marks = {site: Watermark(
                    int(v["records"]), None if v["head"] is None else str(v["head"]),
                    int(v.get("anchor_records", v["records"]))) for site, v in raw.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{self.path}: not a ledger watermark file ({exc}); "
                                  "restore it from backup rather than delete it") from None

    def get(self, site: str) -> Watermark | None:
        return self._marks.get(site)

    def anchor(self, site: str | None) -> tuple[int, str] | None:
        """(count, head) the site's ledger must still pass through, if one was attested."""
        mark = self._marks.get(site) if site else None
        if mark is None or mark.head is None:
            return None
        return mark.anchor_records, mark.head

    def check(self, site: str, records: int, head: str) -> str | None:
        """Why (records, head) cannot follow what was seen before, or None."""
        mark = self._marks.get(site)
        if mark is None:
            return None
        if records < mark.records:
            return (f"privacy ledger rollback: the site's ledger holds {records} records, "
                    f"this coordinator already saw {mark.records}")
        if records == mark.anchor_records and mark.head is not None and head != mark.head:
            return (f"privacy ledger rollback: the site's ledger forked at {records} records "
                    f"(head {head[:16]}..., seen {mark.head[:16]}...)")
        return None

    def advance(self, site: str, records: int, head: str | None) -> None:
        """Raise the mark (never lower it). A claimed count can only make the site's own
        later attestations fail, so counts from train replies are safe to take."""
        with self._lock:
            mark = self._marks.get(site) or Watermark(0, None, 0)
            new = Watermark(max(mark.records, records), mark.head, mark.anchor_records)
            if head is not None and (mark.head is None or records >= mark.anchor_records):
                new = Watermark(new.records, head, records)
            if new != mark or site not in self._marks:
                self._marks[site] = new
                self._dirty = True

    def flush(self) -> None:
        """Persist (atomically) if anything advanced, merged with what other runs of this
        coordinator wrote meanwhile (never lowering a mark), under a file lock."""
        with self._lock:
            if self.path is None or not self._dirty:
                return
            with exclusive_lock(self.path):
                if self.path.exists():
                    for site, theirs in LedgerWatermarks(self.path)._marks.items():
                        self._marks[site] = _merge(self._marks.get(site), theirs)
                atomic_write(self.path, json.dumps(
                    {s: {"records": m.records, "head": m.head,
                         "anchor_records": m.anchor_records}
                     for s, m in sorted(self._marks.items())}, indent=1).encode())
                self._dirty = False


def _merge(ours: Watermark | None, theirs: Watermark) -> Watermark:
    if ours is None:
        return theirs
    anchor = ours if (ours.head is not None and ours.anchor_records >= theirs.anchor_records) \
        or theirs.head is None else theirs
    return Watermark(max(ours.records, theirs.records), anchor.head, anchor.anchor_records)
