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
MAX_KEY_FILE = 16 * 1024
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
    if path.exists():
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_KEY_FILE + 1)
        except IsADirectoryError:
            raise AuditChainError(None, f"audit public key {raw}: is a folder, expect a PEM "
                                  "or hex file") from None
        except OSError as exc:
            raise AuditChainError(None, f"audit public key {raw}: cannot read: "
                                  f"{exc.strerror}") from None
        if len(data) > MAX_KEY_FILE:
            raise AuditChainError(None, f"audit public key {raw}: larger than {MAX_KEY_FILE} "
                                  "bytes, not a key")
    else:
        data = raw.encode()
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise ValueError("not Ed25519")
            return key
        return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode().strip()))
    except (ValueError, UnicodeDecodeError) as exc:
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


ENTRY_FIELDS = {"format": str, "seq": int, "prev": str, "time": (int, float), "kind": str,
                "body": dict, "sig": str}


def _shape_problem(line: bytes) -> str | None:
    """Why ``line`` is not a well-formed entry (every field present with its type), or None."""
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not a well-formed audit entry (not JSON)"
    if not isinstance(entry, dict):
        return "not a well-formed audit entry (not a JSON object)"
    for name, kind in ENTRY_FIELDS.items():
        value = entry.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"not a well-formed audit entry (field {name!r} is missing or not " \
                   f"{getattr(kind, '__name__', 'a number')})"
    try:
        base64.b64decode(entry["sig"], validate=True)
    except ValueError:
        return "not a well-formed audit entry (signature is not base64)"
    return None


MAX_ENTRY_BYTES = 4 * 1024 * 1024  # one receipt of a 1000-site round is ~1 MB
MAX_ENTRIES = 10_000_000


def iter_entries(path: Path) -> Iterator[tuple[int, bytes]]:
    """The chain's lines, each read with a hard cap (an endless or garbage file costs at most
    one cap's worth of memory)."""
    with open(path, "rb") as fh:
        for index in range(MAX_ENTRIES + 1):
            line = fh.readline(MAX_ENTRY_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_ENTRY_BYTES or index == MAX_ENTRIES:
                raise AuditChainError(index, f"entry {index} is larger than {MAX_ENTRY_BYTES} "
                                      "bytes, or the chain has too many entries: not an audit "
                                      "chain")
            yield index, line


def verify_chain(path: Path, public_key: ed25519.Ed25519PublicKey | None = None,
                 expected_head: str | None = None) -> ChainResult:
    """Verify every entry; the first bad one is named. Without ``public_key`` the key recorded
    in the first entry (``run-start``) is used, which proves integrity, not authorship."""
    path = Path(path)
    if path.is_dir():
        raise AuditChainError(None, f"{path} is a folder, expect an audit chain file")
    head, key = GENESIS, public_key
    key_hex = public_key_hex(key) if key else ""

    def bad(index: int, reason: str) -> ChainResult:
        return ChainResult(False, index, head, index, reason, key_hex)

    count = 0
    try:
        lines = iter_entries(path)  # lazily: the first bad entry ends the walk
        for index, line in lines:
            count = index + 1
            result = _check_entry(index, line, head, key)
            if isinstance(result, str):
                return bad(index, result)
            head, key = result
            key_hex = public_key_hex(key)
    except OSError as exc:
        raise AuditChainError(None, f"cannot read {path}: {exc.strerror}") from None
    if expected_head is not None and expected_head != head:
        return ChainResult(False, count, head, count,
                           f"head {head[:16]}... differs from the anchor {expected_head[:16]}..."
                           " (entries removed from the end?)", key_hex)
    return ChainResult(True, count, head, None, "intact", key_hex)


def _check_entry(index: int, line: bytes, head: str, key: ed25519.Ed25519PublicKey | None,
                 ) -> tuple[str, ed25519.Ed25519PublicKey] | str:
    """(new head, key) after entry ``index``, or why it is bad."""
    if not line.endswith(b"\n"):
        return "torn last line (incomplete write)"
    problem = _shape_problem(line)
    if problem is not None:
        return problem
    entry = json.loads(line)
    sig = base64.b64decode(entry["sig"], validate=True)
    seq, prev = entry["seq"], entry["prev"]
    if entry["format"] != FORMAT:
        return f"unknown format {entry['format']!r}"
    if seq != index:
        return f"sequence number is {seq}, expect {index} (entry inserted, removed or reordered)"
    if prev != head:
        return "previous-hash link broken (an earlier entry was changed, removed or reordered)"
    if key is None:
        if index != 0 or "coordinator_public_key" not in entry["body"]:
            return "no public key given and the first entry does not name one"
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(
                bytes.fromhex(str(entry["body"]["coordinator_public_key"])))
        except ValueError:
            return "the first entry's public key is malformed"
    try:
        key.verify(sig, signed_part(entry))
    except InvalidSignature:
        return "signature does not verify (entry changed or signed by another key)"
    return line_hash(line), key


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every entry, each checked for its shape (not its signature: see :func:`verify_chain`)."""
    out = []
    if Path(path).is_dir():
        raise AuditChainError(None, f"{path} is a folder, expect an audit chain file")
    try:
        for index, line in iter_entries(Path(path)):
            problem = _shape_problem(line)
            if problem is not None:
                raise AuditChainError(index, problem)
            out.append(json.loads(line))
    except OSError as exc:
        raise AuditChainError(None, f"cannot read {path}: {exc.strerror}") from None
    return out
