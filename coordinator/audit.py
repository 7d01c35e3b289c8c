"""The coordinator's tamper-evident audit chain.

An append-only file of JSON lines. Every entry carries its sequence number, the SHA-256 of the
previous line (hash chain), a timestamp, a kind, a body (digests, ids, verdicts, epsilon: never
payloads or keys) and an Ed25519 signature by the coordinator's key over all of that. Changing
any byte breaks a signature or the chain; removing, reordering or inserting an entry breaks the
sequence or the chain. Removing entries at the *end* is caught by comparing the head hash with
an anchor kept elsewhere (the MLflow run tag ``audit_head``; ``cleanroom audit verify --head``).

Appends are atomic in practice: one ``write`` of a full line, then ``fsync``. A crash can leave
only a torn last line, which :class:`AuditLog` detects and cuts on restart (it was never
acknowledged).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.errors import AuditChainError

GENESIS = "0" * 64
FORMAT = "cleanroom-fl/audit/v1"


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def signed_part(entry: dict[str, Any]) -> bytes:
    return canonical({k: entry[k] for k in ("format", "seq", "prev", "time", "kind", "body")})


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise AuditChainError(None, f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AuditChainError(None, f"{path} is not an Ed25519 private key")
    return key


def public_key_hex(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key(text_or_path: str | Path) -> ed25519.Ed25519PublicKey:
    """Public key from a PEM file, a raw 32-byte hex string, or a file holding that hex."""
    raw = str(text_or_path)
    path = Path(raw)
    data = path.read_bytes() if path.exists() else raw.encode()
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise ValueError("not Ed25519")
            return key
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode().strip()))
    except ValueError as exc:
        raise AuditChainError(None, f"cannot load audit public key {raw[:64]}: {exc}") from None


class AuditLog:
    """Appends signed, hash-chained entries to ``path`` (recovering a torn last line)."""

    def __init__(self, path: Path, signing_key: ed25519.Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self.key = signing_key
        self._lock = threading.Lock()
        self.recovered_torn_line = False
        self.seq, self.head = 0, GENESIS
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            cut = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
            self.recovered_torn_line = True
            raw = raw[:cut]
        result = verify_chain(self.path, public_key=self.key.public_key())
        if not result.ok:
            raise AuditChainError(result.first_bad, f"refusing to append to a broken audit "
                                  f"log: {result.reason}")
        self.seq, self.head = result.entries, result.head

    def append(self, kind: str, body: dict[str, Any]) -> str:
        """Sign and append one entry; returns the new head hash once it is on disk."""
        with self._lock:
            entry: dict[str, Any] = {"format": FORMAT, "seq": self.seq, "prev": self.head,
                                     "time": round(time.time(), 6), "kind": kind, "body": body}
            entry["sig"] = base64.b64encode(self.key.sign(signed_part(entry))).decode()
            line = canonical(entry)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            with os.fdopen(fd, "ab") as fh:
                fh.write(line + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.seq += 1
            self.head = line_hash(line)
            return self.head


@dataclass(frozen=True)
class ChainResult:
    ok: bool
    entries: int
    head: str
    first_bad: int | None = None
    reason: str = ""
    public_key: str = ""


def iter_entries(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        yield from enumerate(fh)


def verify_chain(path: Path, public_key: ed25519.Ed25519PublicKey | None = None,
                 expected_head: str | None = None) -> ChainResult:
    """Verify every entry; the first bad one is named. Without ``public_key`` the key recorded
    in the first entry (``run-start``) is used, which proves integrity, not authorship."""
    path = Path(path)
    try:
        lines = list(iter_entries(path))
    except OSError as exc:
        raise AuditChainError(None, f"cannot read {path}: {exc.strerror}") from None
    head, key = GENESIS, public_key
    key_hex = public_key_hex(key) if key else ""

    def bad(index: int, reason: str) -> ChainResult:
        return ChainResult(False, index, head, index, reason, key_hex)

    for index, line in lines:
        if not line.endswith(b"\n"):
            return bad(index, "torn last line (incomplete write)")
        try:
            entry = json.loads(line)
            sig = base64.b64decode(entry["sig"], validate=True)
            seq, prev = entry["seq"], entry["prev"]
            message = signed_part(entry)
        except (ValueError, KeyError, TypeError):
            return bad(index, "not a well-formed audit entry")
        if entry.get("format") != FORMAT:
            return bad(index, f"unknown format {entry.get('format')!r}")
        if seq != index:
            return bad(index, f"sequence number is {seq}, expect {index} (entry inserted, "
                       "removed or reordered)")
        if prev != head:
            return bad(index, "previous-hash link broken (an earlier entry was changed, "
                       "removed or reordered)")
        if key is None:
            if index != 0 or "coordinator_public_key" not in entry.get("body", {}):
                return bad(index, "no public key given and the first entry does not name one")
            try:
                key = ed25519.Ed25519PublicKey.from_public_bytes(
                    bytes.fromhex(entry["body"]["coordinator_public_key"]))
            except ValueError:
                return bad(index, "the first entry's public key is malformed")
            key_hex = public_key_hex(key)
        try:
            key.verify(sig, message)
        except InvalidSignature:
            return bad(index, "signature does not verify (entry changed or signed by another "
                       "key)")
        head = line_hash(line)
    if expected_head is not None and expected_head != head:
        return ChainResult(False, len(lines), head, len(lines),
                           f"head {head[:16]}... differs from the anchor {expected_head[:16]}..."
                           " (entries removed from the end?)", key_hex)
    return ChainResult(True, len(lines), head, None, "intact", key_hex)


def read_entries(path: Path) -> list[dict[str, Any]]:
    out = []
    for index, line in iter_entries(Path(path)):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AuditChainError(index, "not JSON") from None
    return out
