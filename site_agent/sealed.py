"""The site's sealed store: AES-256-GCM under a key from the enclave provider, atomic on disk.

Two shapes:

* :func:`seal_blob` / :func:`unseal_blob` - one sealed value (session keys in Flower's context).
* :class:`SealedJournal` - an append-only journal of sealed records, one per line, each line's
  AEAD bound to its sequence number and to the hash of the previous line, so a record cannot be
  changed, removed from the middle, reordered or moved to another journal without detection.
  Each append is written and fsync'd before it returns; a torn last line (a crash mid-write) is
  detected on open and dropped, which loses nothing that was acknowledged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cleanroom.errors import LedgerError
from cleanroom.fsutil import atomic_write, exclusive_lock, fsync_dir  # noqa: F401  (re-exported)

NONCE_SIZE = 12
BLOB_MAGIC = b"CRSEAL1"
GENESIS = "0" * 64


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

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete = raw.endswith(b"\n")
        if complete:
            lines = lines[:-1]
        for index, line in enumerate(lines):
            last = index == len(lines) - 1
            try:
                entry = json.loads(line)
                seq, prev = int(entry["seq"]), str(entry["prev"])
                nonce = base64.b64decode(entry["nonce"], validate=True)
                ct = base64.b64decode(entry["ct"], validate=True)
            except (ValueError, KeyError, TypeError):
                if last and not complete:
                    self._truncate_torn(len(raw) - len(line))
                    return
                raise LedgerError(f"{self.path}: record {index} is malformed") from None
            if seq != index or prev != self._heads[-1]:
                raise LedgerError(f"{self.path}: record {index} is out of order or a record "
                                  "before it was removed")
            try:
                plain = self._aead.decrypt(nonce, ct, self._aad(seq, prev))
            except InvalidTag:
                if last and not complete:
                    self._truncate_torn(len(raw) - len(line))
                    return
                raise LedgerError(f"{self.path}: record {index} does not open (tampered, or "
                                  "sealed under another enclave's key)") from None
            self._records.append(json.loads(plain))
            self._heads.append(hashlib.sha256(line).hexdigest())
        if not complete and lines and lines[-1]:
            # A final line that parsed and opened but lacks its newline: keep it, finish it.
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())

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

    def append(self, record: dict[str, Any], *, durable: bool | None = None) -> None:
        """Seal and append ``record``. With ``durable`` (default: the journal's setting) it
        returns only after the bytes are on disk; without, they are visible to every other
        process at once but may be lost in a power cut."""
        durable = self.durable if durable is None else durable
        with self.locked():
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
            self._size = self._identity()
