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

    def chunk_span(self, index: int) -> tuple[int, int, int]:
        """(plaintext offset, plaintext length, sealed offset) of chunk ``index``."""
        start = index * self.chunk_size
        length = min(self.chunk_size, self.plaintext_len - start)
        return start, length, HEADER_SIZE + index * (self.chunk_size + TAG_SIZE)


def parse_header(sealed: memoryview, max_payload: int = MAX_PAYLOAD) -> StreamHeader:
    """Parse and bound-check the header; the sealed length must match it exactly."""
    if sealed.nbytes < HEADER_SIZE:
        raise EnvelopeError(f"sealed payload of {sealed.nbytes} bytes is shorter than its "
                            f"{HEADER_SIZE}-byte header")
    magic, suite, chunk_log2, pad, reserved, meta_len, payload_len, payload_id, commitment = \
        HEADER.unpack_from(sealed, 0)
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
    header = StreamHeader(chunk_log2, pad, meta_len, payload_len, payload_id, commitment)
    if sealed.nbytes != header.sealed_len:
        raise EnvelopeError(f"sealed payload is {sealed.nbytes} bytes, its header makes "
                            f"{header.sealed_len} (truncated or extended)")
    return header


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
    sealed: np.ndarray  # uint8: header || chunks
    header: StreamHeader
    chain: bytes  # SHA-256(header digest || every chunk tag in order)


def encrypt(parts: Sequence[memoryview], content_key: bytes, *, meta: bytes, pad_len: int,
            chunk_log2: int = DEFAULT_CHUNK_LOG2, workers: int = DEFAULT_WORKERS,
            ) -> SealedStream:
    """Encrypt ``meta || pad_len zero bytes || parts`` once, into one new buffer."""
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
    out = aligned_empty(header.sealed_len)
    view = memoryview(out)
    view[:HEADER_SIZE] = header.to_bytes()
    n = header.chunks

    def job(lo: int, hi: int) -> None:
        scratch = bytearray(header.chunk_size)
        for index in range(lo, hi):
            start, length, offset = header.chunk_span(index)
            keys.aead.encrypt_into(chunk_nonce(keys.nonce_prefix, index, index == n - 1),
                                   data.read(start, length, scratch), aad,
                                   view[offset:offset + length + TAG_SIZE])

    _run(n, job, workers)
    out.flags.writeable = False
    return SealedStream(out, header, tag_chain(view, header))


def tag_chain(sealed: memoryview, header: StreamHeader) -> bytes:
    """SHA-256(header digest || every chunk tag): names this exact ciphertext (computed from
    the tags alone, without decrypting); envelope signatures sign it."""
    chain = hashlib.sha256(header.digest())
    for index in range(header.chunks):
        _, length, offset = header.chunk_span(index)
        chain.update(sealed[offset + length:offset + length + TAG_SIZE])
    return chain.digest()


def check_commitment(keys: StreamKeys, header: StreamHeader) -> None:
    if not hmac.compare_digest(keys.commitment, header.key_commitment):
        raise EnvelopeError("content key does not match the payload's key commitment")


def decrypt(sealed: memoryview, header: StreamHeader, keys: StreamKeys, aad: bytes, *,
            workers: int = DEFAULT_WORKERS) -> np.ndarray:
    """Decrypt every chunk straight into one new aligned buffer (the plaintext stream)."""
    out = aligned_empty(header.plaintext_len)
    view = memoryview(out)
    n = header.chunks
    failed: list[int] = []

    def job(lo: int, hi: int) -> None:
        for index in range(lo, hi):
            start, length, offset = header.chunk_span(index)
            try:
                keys.aead.decrypt_into(chunk_nonce(keys.nonce_prefix, index, index == n - 1),
                                       sealed[offset:offset + length + TAG_SIZE], aad,
                                       view[start:start + length])
            except InvalidTag:
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
