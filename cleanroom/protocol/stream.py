"""Chunked AEAD for large payloads: the symmetric half of envelope v2.

A payload (a model, an update) is encrypted once under a fresh 256-bit content key with
AES-256-GCM in fixed-size chunks, a STREAM-like construction (Hoang, Reyhanitabar, Rogaway and
Vizár, "Online authenticated-encryption and its nonce-reuse misuse-resistance", CRYPTO 2015):

* keys: ``HKDF-SHA256(content key, salt = payload id, info = KEY_INFO)`` gives the AES key, a
  7-byte nonce prefix and a 32-byte key commitment; the commitment is in the header, so one
  ciphertext opens under one content key only (AES-GCM alone is not key-committing);
* chunk ``i`` of ``n``: nonce = ``prefix || u32-BE(i) || last`` (``last`` = 1 for ``i = n - 1``,
  else 0), associated data = SHA-256 of the 88-byte header. Reordered, duplicated, dropped or
  appended chunks, a chunk from another payload, or any changed header field all fail;
* the header also fixes every length, so a sealed payload of the wrong size is refused before
  any decryption, and the receiver allocates exactly one output buffer, bounded by named limits.

The plaintext stream is ``metadata || zero padding || payload``; the padding puts the payload
(or, for arrays, the first array's data) at a multiple of :data:`ALIGN` in the output buffer.

Layout of a sealed payload (integers big-endian)::

    offset  size  field
    0       8     magic "CRFLENV2"
    8       1     suite: 1 = AES-256-GCM chunks, HKDF-SHA256 (HPKE X25519 key wrap, Ed25519)
    9       1     log2(chunk size), 12..24
    10      1     padding length, < ALIGN
    11      1     reserved, 0
    12      4     metadata length, <= MAX_METADATA
    16      8     payload length, <= MAX_PAYLOAD
    24      32    payload id (random; HKDF salt)
    56      32    key commitment
    88      ...   n chunks: ciphertext (chunk size bytes, the last one shorter) || 16-byte tag

with ``n = max(1, ceil((metadata + padding + payload) / chunk size))``.

This module knows nothing of recipients or signatures: see :mod:`cleanroom.protocol.envelope`.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import itertools
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cleanroom.errors import EnvelopeError

MAGIC = b"CRFLENV2"
SUITE_ID = 1
HEADER = struct.Struct(">8sBBBBIQ32s32s")
HEADER_SIZE = HEADER.size  # 88
KEY_SIZE = 32  # content key, AES-256 key
TAG_SIZE = 16  # AES-GCM tag
NONCE_PREFIX_SIZE = 7  # + 4-byte counter + 1-byte last flag = 12-byte GCM nonce
PAYLOAD_ID_SIZE = 32
COMMITMENT_SIZE = 32
DEFAULT_CHUNK_LOG2 = 20  # 1 MiB chunks: AES-GCM runs at full speed, little memory per chunk
MIN_CHUNK_LOG2 = 12
MAX_CHUNK_LOG2 = 24
ALIGN = 64  # payload alignment in the output buffer (cache line; any numpy dtype)
MAX_PAYLOAD = 1 << 30  # bytes of payload an envelope may carry (a 250M-parameter float32 model)
MAX_METADATA = 64 * 1024  # bytes of authenticated metadata (metrics, counts)
MAX_CHUNKS = (MAX_PAYLOAD + MAX_METADATA + ALIGN) // (1 << MIN_CHUNK_LOG2) + 1
KEY_INFO = b"cleanroom-fl/envelope/v2/stream-keys"
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)  # threads per payload (AES-GCM drops the GIL)
assert HEADER_SIZE == 88 and MAX_CHUNKS < 2**32


@dataclass(frozen=True)
class StreamHeader:
    """The cleartext header of a sealed payload: every length, the id, the key commitment."""

    chunk_log2: int
    pad_len: int
    meta_len: int
    payload_len: int
    payload_id: bytes
    key_commitment: bytes

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_log2

    @property
    def plaintext_len(self) -> int:
        return self.meta_len + self.pad_len + self.payload_len

    @property
    def chunks(self) -> int:
        return max(1, -(-self.plaintext_len // self.chunk_size))

    @property
    def sealed_len(self) -> int:
        return HEADER_SIZE + self.plaintext_len + TAG_SIZE * self.chunks

    def to_bytes(self) -> bytes:
        return HEADER.pack(MAGIC, SUITE_ID, self.chunk_log2, self.pad_len, 0, self.meta_len,
                           self.payload_len, self.payload_id, self.key_commitment)

    def digest(self) -> bytes:
        """SHA-256 of the header: every chunk's associated data, and what a key wrap names."""
        return hashlib.sha256(self.to_bytes()).digest()

    def chunk_len(self, index: int) -> int:
        """Plaintext bytes of chunk ``index`` (every chunk is full but the last)."""
        return min(self.chunk_size, self.plaintext_len - index * self.chunk_size)


def parse_header(head: memoryview, max_payload: int = MAX_PAYLOAD) -> StreamHeader:
    """Parse and bound-check the 88-byte header (what follows it is not looked at)."""
    if head.nbytes < HEADER_SIZE:
        raise EnvelopeError(f"sealed payload of {head.nbytes} bytes is shorter than its "
                            f"{HEADER_SIZE}-byte header")
    magic, suite, chunk_log2, pad, reserved, meta_len, payload_len, payload_id, commitment = \
        HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise EnvelopeError("sealed payload: bad magic (not an envelope v2)")
    if suite != SUITE_ID:
        raise EnvelopeError(f"sealed payload: suite {suite}, expect {SUITE_ID}")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise EnvelopeError(f"sealed payload: chunk size 2^{chunk_log2} outside "
                            f"2^{MIN_CHUNK_LOG2}..2^{MAX_CHUNK_LOG2}")
    if pad >= ALIGN or reserved != 0:
        raise EnvelopeError(f"sealed payload: padding {pad} or reserved byte {reserved} invalid")
    if meta_len > MAX_METADATA:
        raise EnvelopeError(f"sealed payload: metadata of {meta_len} bytes exceeds "
                            f"{MAX_METADATA}")
    if payload_len > min(max_payload, MAX_PAYLOAD):
        raise EnvelopeError(f"sealed payload: payload of {payload_len} bytes exceeds "
                            f"{min(max_payload, MAX_PAYLOAD)}")
    return StreamHeader(chunk_log2, pad, meta_len, payload_len, payload_id, commitment)


Sealed = bytes | bytearray | memoryview | np.ndarray
SealedParts = Sealed | Sequence[Sealed]


def as_view(buf: object, what: str) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer; EnvelopeError otherwise."""
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise EnvelopeError(f"{what} must be bytes-like, not {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise EnvelopeError(f"{what} must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def split(sealed: SealedParts, max_payload: int = MAX_PAYLOAD,
          ) -> tuple[StreamHeader, list[memoryview]]:
    """The header and one view per chunk (ciphertext || tag) of a sealed payload given either
    as one buffer or as its parts (the header, then one buffer per chunk, as
    :func:`encrypt` makes them). Every size must be exactly what the header says."""
    if isinstance(sealed, list | tuple):
        if not sealed:
            raise EnvelopeError("sealed payload has no parts")
        head = as_view(sealed[0], "sealed payload header")
        header = parse_header(head, max_payload)
        if head.nbytes != HEADER_SIZE or len(sealed) != 1 + header.chunks:
            raise EnvelopeError(f"sealed payload has {len(sealed)} parts and a "
                                f"{head.nbytes}-byte header, its header makes "
                                f"{1 + header.chunks} parts and {HEADER_SIZE} bytes "
                                "(truncated or extended)")
        views = []
        for index, part in enumerate(sealed[1:]):
            view = as_view(part, "sealed payload chunk")
            if view.nbytes != header.chunk_len(index) + TAG_SIZE:
                raise EnvelopeError(f"chunk {index} is {view.nbytes} bytes, the header makes "
                                    f"{header.chunk_len(index) + TAG_SIZE}")
            views.append(view)
        return header, views
    whole = as_view(sealed, "sealed payload")
    header = parse_header(whole, max_payload)
    if whole.nbytes != header.sealed_len:
        raise EnvelopeError(f"sealed payload is {whole.nbytes} bytes, its header makes "
                            f"{header.sealed_len} (truncated or extended)")
    views = []
    offset = HEADER_SIZE
    for index in range(header.chunks):
        end = offset + header.chunk_len(index) + TAG_SIZE
        views.append(whole[offset:end])
        offset = end
    return header, views


@dataclass(frozen=True)
class StreamKeys:
    """Keys derived from one content key for one payload id."""

    aead: AESGCM
    nonce_prefix: bytes
    commitment: bytes


def derive_keys(content_key: bytes, payload_id: bytes) -> StreamKeys:
    if len(content_key) != KEY_SIZE:
        raise EnvelopeError(f"content key is {len(content_key)} bytes, expect {KEY_SIZE}")
    okm = HKDF(hashes.SHA256(), KEY_SIZE + NONCE_PREFIX_SIZE + COMMITMENT_SIZE, payload_id,
               KEY_INFO).derive(content_key)
    return StreamKeys(AESGCM(okm[:KEY_SIZE]), okm[KEY_SIZE:KEY_SIZE + NONCE_PREFIX_SIZE],
                      okm[KEY_SIZE + NONCE_PREFIX_SIZE:])


def chunk_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 buffer whose first byte sits at a multiple of ``align``."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


class _Stream:
    """The concatenation of some buffers, read chunk by chunk without joining them."""

    def __init__(self, parts: Sequence[memoryview]) -> None:
        self.parts = [p for p in parts if p.nbytes]
        self.starts = list(itertools.accumulate((p.nbytes for p in self.parts), initial=0))

    @property
    def nbytes(self) -> int:
        return self.starts[-1]

    def read(self, start: int, length: int, scratch: bytearray) -> memoryview:
        """Bytes ``[start, start + length)``: a view when they lie in one part, else gathered
        into ``scratch`` (the caller's, at least ``length`` long)."""
        k = bisect.bisect_right(self.starts, start) - 1
        if length == 0:
            return memoryview(scratch)[:0]
        offset = start - self.starts[k]
        part = self.parts[k]
        if offset + length <= part.nbytes:
            return part[offset:offset + length]
        view, fill = memoryview(scratch), 0
        while fill < length:
            take = min(length - fill, self.parts[k].nbytes - offset)
            view[fill:fill + take] = self.parts[k][offset:offset + take]
            fill += take
            k, offset = k + 1, 0
        return view[:length]


def _run(count: int, job: Callable[[int, int], None], workers: int) -> None:
    """Call ``job(lo, hi)`` over ``range(count)`` split into contiguous ranges, on up to
    ``workers`` threads (AES-GCM and SHA-256 release the GIL on large buffers)."""
    workers = max(1, min(workers, count // 2))
    if workers == 1:
        job(0, count)
        return
    bounds = [count * w // workers for w in range(workers + 1)]
    with ThreadPoolExecutor(workers, thread_name_prefix="cleanroom-aead") as pool:
        for future in [pool.submit(job, bounds[w], bounds[w + 1]) for w in range(workers)]:
            future.result()


@dataclass(frozen=True)
class SealedStream:
    header: StreamHeader
    chunks: tuple[bytes, ...]  # per chunk: ciphertext || tag
    chain: bytes  # SHA-256(header digest || every chunk tag in order)

    def parts(self) -> tuple[bytes, ...]:
        """The sealed payload as the header then one ``bytes`` per chunk; their
        concatenation is the contiguous form."""
        return (self.header.to_bytes(), *self.chunks)


def encrypt(parts: Sequence[memoryview], content_key: bytes, *, meta: bytes, pad_len: int,
            chunk_log2: int = DEFAULT_CHUNK_LOG2, workers: int = DEFAULT_WORKERS,
            ) -> SealedStream:
    """Encrypt ``meta || pad_len zero bytes || parts`` once, one ``bytes`` per chunk (no
    full-size buffer: chunks go to the wire as they are, or are joined once)."""
    data = _Stream([memoryview(meta), memoryview(bytes(pad_len)), *parts])
    payload_len = data.nbytes - len(meta) - pad_len
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise EnvelopeError(f"chunk size 2^{chunk_log2} outside "
                            f"2^{MIN_CHUNK_LOG2}..2^{MAX_CHUNK_LOG2}")
    if len(meta) > MAX_METADATA or payload_len > MAX_PAYLOAD or not 0 <= pad_len < ALIGN:
        raise EnvelopeError(f"metadata ({len(meta)} B), payload ({payload_len} B) or padding "
                            f"({pad_len}) beyond the envelope's limits")
    payload_id = os.urandom(PAYLOAD_ID_SIZE)
    keys = derive_keys(content_key, payload_id)
    header = StreamHeader(chunk_log2, pad_len, len(meta), payload_len, payload_id,
                          keys.commitment)
    aad = header.digest()
    n = header.chunks
    chunks: list[bytes] = [b""] * n

    def job(lo: int, hi: int) -> None:
        scratch = bytearray(header.chunk_size)
        for index in range(lo, hi):
            chunks[index] = keys.aead.encrypt(
                chunk_nonce(keys.nonce_prefix, index, index == n - 1),
                data.read(index * header.chunk_size, header.chunk_len(index), scratch), aad)

    _run(n, job, workers)
    return SealedStream(header, tuple(chunks), tag_chain(header, chunks))


def tag_chain(header: StreamHeader, chunks: Sequence[memoryview | bytes]) -> bytes:
    """SHA-256(header digest || every chunk tag): names this exact ciphertext (computed from
    the tags alone, without decrypting); envelope signatures sign it."""
    chain = hashlib.sha256(header.digest())
    for chunk in chunks:
        chain.update(memoryview(chunk)[-TAG_SIZE:])
    return chain.digest()


def check_commitment(keys: StreamKeys, header: StreamHeader) -> None:
    if not hmac.compare_digest(keys.commitment, header.key_commitment):
        raise EnvelopeError("content key does not match the payload's key commitment")


def output_buffer(out: np.ndarray | None, nbytes: int) -> np.ndarray:
    """``out[:nbytes]`` if the caller gave a buffer (reused across rounds: no page faults),
    else a new aligned one."""
    if out is None:
        return aligned_empty(nbytes)
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 1
            and out.flags.c_contiguous and out.flags.writeable):
        raise EnvelopeError("out must be a writable, contiguous 1-D uint8 numpy array")
    if out.nbytes < nbytes:
        raise EnvelopeError(f"out holds {out.nbytes} bytes, this envelope needs {nbytes}")
    return out[:nbytes]


def decrypt(chunks: Sequence[memoryview], header: StreamHeader, keys: StreamKeys, aad: bytes,
            *, workers: int = DEFAULT_WORKERS, out: np.ndarray | None = None) -> np.ndarray:
    """Decrypt every chunk (views from :func:`split`) straight into one aligned buffer (new,
    or the start of ``out``): the plaintext stream; no other full-size buffer."""
    if len(chunks) != header.chunks:
        raise EnvelopeError(f"{len(chunks)} chunks, the header makes {header.chunks}")
    out = output_buffer(out, header.plaintext_len)
    view = memoryview(out)
    n = header.chunks
    failed: list[int] = []

    def job(lo: int, hi: int) -> None:
        for index in range(lo, hi):
            start, length = index * header.chunk_size, header.chunk_len(index)
            try:
                keys.aead.decrypt_into(chunk_nonce(keys.nonce_prefix, index, index == n - 1),
                                       chunks[index], aad, view[start:start + length])
            except (InvalidTag, ValueError):  # ValueError: a chunk of the wrong size
                failed.append(index)
                return

    _run(n, job, workers)
    if failed:
        raise EnvelopeError(f"chunk {min(failed)} of {n} fails authentication (tampered, "
                            "reordered, duplicated, truncated or from another payload)")
    return out


def padding_is_zero(plain: np.ndarray, header: StreamHeader) -> bool:
    pad = plain[header.meta_len:header.meta_len + header.pad_len]
    return not pad.any()
