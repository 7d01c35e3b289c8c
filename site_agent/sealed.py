"""The site's sealed store: AES-256-GCM under a key from the enclave provider, atomic on disk.

Two shapes:

* :func:`seal_blob` / :func:`unseal_blob` - one sealed value (session keys in Flower's context).
* :class:`SealedJournal` - an append-only journal of sealed records, one per line, each line's
  AEAD bound to its sequence number and to the hash of the previous line, so a record cannot be
  changed, removed from the middle, reordered or moved to another journal without detection.
  Each durable append is written and fsync'd, then the journal's sealed *head record*
  (``<journal>.head``: record count and head hash) is replaced atomically. On open, a journal
  holding fewer complete records than its head record names lost a record that was
  acknowledged: that is a rollback, refused, never a torn write. An append may leave the head
  record behind (``head=False``: the line is fsync'd, the head record catches up at the next
  append that advances it, or at the next open); the privacy ledger does so for a
  reservation, whose commit follows within the round (see :mod:`.ledger`), which saves two of
  the three fsyncs of every other append. Only a partial last line
  beyond the head record's count (a crash in the middle of an append) is recovered, and the
  recovery is itself appended as a record (``kind: recovered-torn-write``). Restoring *both*
  files from an old copy is a whole-state rollback, which the coordinator's ledger watermarks
  catch.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cleanroom.errors import LedgerError
from cleanroom.fsutil import atomic_write, exclusive_lock, fsync_dir

NONCE_SIZE = 12
BLOB_MAGIC = b"CRSEAL1"
GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
RECOVERED = "recovered-torn-write"


def seal_blob(key: bytes, plaintext: bytes, label: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_SIZE)
    return BLOB_MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, BLOB_MAGIC + label)


def unseal_blob(key: bytes, blob: bytes, label: bytes) -> bytes:
    if not blob.startswith(BLOB_MAGIC) or len(blob) < len(BLOB_MAGIC) + NONCE_SIZE + 16:
        raise LedgerError("sealed blob is malformed")
    nonce = blob[len(BLOB_MAGIC):len(BLOB_MAGIC) + NONCE_SIZE]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(BLOB_MAGIC) + NONCE_SIZE:],
                                   BLOB_MAGIC + label)
    except InvalidTag:
        raise LedgerError("sealed blob does not open: wrong sealing key (other enclave or "
                          "other code) or tampered data") from None


class SealedJournal:
    """Append-only, hash-chained, sealed JSON records in one file."""

    def __init__(self, path: Path, key: bytes, label: str, *, durable: bool = True) -> None:
        """``durable=False`` skips fsync (informational logs only; never for the ledger)."""
        self.durable = durable
        if len(key) != 32:
            raise LedgerError("sealing key must be 32 bytes")
        self.path = Path(path)
        self._aead = AESGCM(key)
        self._label = label.encode()
        self._lock = threading.RLock()
        self._flock_depth = 0
        self._records: list[dict[str, Any]] = []
        self._heads: list[str] = [GENESIS]  # head after k records, k = 0..n
        self._size: object = -1
        self.recovered_torn_line = False
        self._head_path = self.path.with_name(self.path.name + HEAD_SUFFIX)
        self._head_label = b"journal-head/" + self._label
        with self._file_lock():
            self._refresh()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise writers across processes (simulation workers share a site's journal).
        Re-entrant within a thread holding ``self._lock`` (see :meth:`locked`)."""
        if self._flock_depth:
            self._flock_depth += 1
            try:
                yield
            finally:
                self._flock_depth -= 1
            return
        with exclusive_lock(self.path):
            self._flock_depth = 1
            try:
                yield
            finally:
                self._flock_depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal (threads and processes) across several reads and appends: a
        check-then-append done inside cannot interleave with another writer."""
        with self._lock, self._file_lock():
            self._refresh()
            yield

    def _refresh(self) -> None:
        """Re-read the file if another process appended since we last looked."""
        if self._identity() == self._size:
            return
        self._records, self._heads = [], [GENESIS]
        self._load()
        self._size = self._identity()

    def _identity(self) -> object:
        """Size, inode and mtime: a file swapped for another of the same size is re-read."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        return (st.st_size, st.st_ino, st.st_mtime_ns)

    def _aad(self, seq: int, prev: str) -> bytes:
        return b"cleanroom-fl/journal/v1\0" + self._label + b"\0" + \
            str(seq).encode() + b"\0" + prev.encode()

    def _read_head(self) -> tuple[int, str] | None:
        """The sealed head record: (records, head) the journal had after its last durable
        append; None if there is none."""
        try:
            blob = self._head_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            head = json.loads(self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:],
                                                 self._head_label))
            return int(head["records"]), str(head["head"])
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise LedgerError(f"{self._head_path}: the journal's head record does not open "
                              "(tampered, or sealed under another enclave's key)") from None

    def _write_head(self) -> None:
        nonce = secrets.token_bytes(NONCE_SIZE)
        plain = json.dumps({"records": len(self._records), "head": self._heads[-1]}).encode()
        atomic_write(self._head_path, nonce + self._aead.encrypt(nonce, plain,
                                                                   self._head_label))

    def _load(self) -> None:
        committed = self._read_head()
        if not self.path.exists():
            if committed is not None and committed[0] > 0:
                raise LedgerError(f"{self.path} is missing but its head record names "
                                  f"{committed[0]} records: the journal was removed (rollback)")
            return
        if committed is None:
            raise LedgerError(f"{self.path}: its head record {self._head_path.name} is missing "
                              "(removed, or the journal was copied without it): refusing a "
                              "journal whose length cannot be checked")
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete = raw.endswith(b"\n")
        if complete:
            lines = lines[:-1]
        torn: int | None = None  # bytes of a partial last line
        for index, line in enumerate(lines):
            last = index == len(lines) - 1
            try:
                entry = json.loads(line)
                seq, prev = int(entry["seq"]), str(entry["prev"])
                nonce = base64.b64decode(entry["nonce"], validate=True)
                ct = base64.b64decode(entry["ct"], validate=True)
            except (ValueError, KeyError, TypeError):
                if last and not complete:
                    torn = len(line)
                    break
                raise LedgerError(f"{self.path}: record {index} is malformed") from None
            if seq != index or prev != self._heads[-1]:
                raise LedgerError(f"{self.path}: record {index} is out of order or a record "
                                  "before it was removed")
            try:
                plain = self._aead.decrypt(nonce, ct, self._aad(seq, prev))
            except InvalidTag:
                if last and not complete:
                    torn = len(line)
                    break
                raise LedgerError(f"{self.path}: record {index} does not open (tampered, or "
                                  "sealed under another enclave's key)") from None
            self._records.append(json.loads(plain))
            self._heads.append(hashlib.sha256(line).hexdigest())
        count, head = committed
        if len(self._records) < count:
            what = "a partial last line" if torn is not None else "no partial line"
            raise LedgerError(
                f"{self.path} holds {len(self._records)} complete records but its sealed head "
                f"record names {count}: acknowledged records were removed ({what} left), a "
                "rollback, not a torn write")
        if self._heads[count] != head:
            raise LedgerError(f"{self.path}: record {count - 1} is not the one its head record "
                              "names (the journal was replaced by another)")
        if torn is not None:
            self._truncate_torn(len(raw) - torn)
            self._records_recovery(torn)
        elif not complete and lines and lines[-1]:
            # A final line that parsed and opened but lacks its newline: keep it, finish it.
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        if len(self._records) > count:  # a crash after an append, before its head record
            self._write_head()

    def _records_recovery(self, dropped: int) -> None:
        """Drop a torn last line (never acknowledged) and say so in the journal itself."""
        self._size = self._identity()
        self._append_locked({"kind": RECOVERED, "dropped_bytes": dropped,
                             "records": len(self._records), "at": time.time()}, durable=True)

    def _truncate_torn(self, keep: int) -> None:
        self.recovered_torn_line = True
        with open(self.path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())

    def records(self) -> list[dict[str, Any]]:
        """Every record, re-read from disk if another process appended meanwhile."""
        with self.locked():
            return list(self._records)

    @property
    def head(self) -> str:
        return self._heads[-1]

    def state(self) -> tuple[int, str]:
        """(records, head), read together."""
        with self.locked():
            return len(self._records), self._heads[-1]

    def head_at(self, records: int) -> str | None:
        """The chain's head when it held ``records`` records (None if it never had so many)."""
        with self.locked():
            return self._heads[records] if 0 <= records < len(self._heads) else None

    def append(self, record: dict[str, Any], *, durable: bool | None = None,
               head: bool = True) -> None:
        """Seal and append ``record``. With ``durable`` (default: the journal's setting) it
        returns only after the bytes and (with ``head``, the default) the journal's head
        record are on disk; without, they are visible to every other process at once but may
        be lost in a power cut (and the head record is not advanced, so such a loss is never
        taken for a rollback).

        ``head=False`` with ``durable``: the record is on disk when this returns (a crash
        cannot lose it), but the head record still names the records before it until the next
        append with ``head`` (or the next open) advances it; until then, removing the record
        together with everything after it is not detected by this journal itself (removing a
        record the head record names still is). Use it for a record that is followed within
        the same operation by one that advances the head."""
        durable = self.durable if durable is None else durable
        with self.locked():
            self._append_locked(record, durable=durable, head=head)

    def _append_locked(self, record: dict[str, Any], *, durable: bool,
                       head: bool = True) -> None:
        seq, prev = len(self._records), self._heads[-1]
        nonce = secrets.token_bytes(NONCE_SIZE)
        plain = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        ct = self._aead.encrypt(nonce, plain, self._aad(seq, prev))
        line = json.dumps({"seq": seq, "prev": prev,
                           "nonce": base64.b64encode(nonce).decode(),
                           "ct": base64.b64encode(ct).decode()},
                          separators=(",", ":")).encode()
        new_file = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new_file:
            self._write_head()  # (0 records) before the journal exists, never after
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as fh:
            fh.write(line + b"\n")
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if new_file and durable:
            fsync_dir(self.path.parent)
        self._records.append(record)
        self._heads.append(hashlib.sha256(line).hexdigest())
        if durable and head:
            self._write_head()
        self._size = self._identity()
