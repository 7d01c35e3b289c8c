"""End-to-end encryption of models and updates: HPKE (RFC 9180) from ``cryptography``.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, single-shot base mode. The HPKE
``info`` carries the full context (direction, run, round, site, model digest), so a ciphertext
opened in any other context fails authentication: a model for site A cannot be decrypted as a
model for site B, an update from round 3 cannot be replayed as round 4, and an update computed
from another global model is refused.

Two formats live here:

* v1 (:func:`seal` / :func:`open_sealed`): the whole plaintext in one HPKE single-shot
  encryption per recipient. Kept for the code that still calls it.
* v2 (:func:`seal_envelope` / :func:`open_envelope`, and :func:`seal_arrays_envelope` /
  :func:`open_arrays_envelope` for named arrays): the payload encrypted once in 1 MiB AES-GCM
  chunks (``cleanroom.protocol.stream``) under a fresh content key, that key HPKE-wrapped to
  each recipient with the same per-site context binding, an optional Ed25519 signature by the
  sender's attested key inside each wrap, and authenticated metadata beside the payload. The
  wire format and the reasons are in docs/envelope.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from cleanroom.errors import EnvelopeError, ProtocolError
from cleanroom.protocol import stream
from cleanroom.protocol.arrays import EncodedArrays, decode_arrays_view, encode_arrays_view

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
SUITE_NAME = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
SUITE_ENC_SIZE = 32  # HPKE encapsulated key (X25519 public key) at the front of a ciphertext
INFO_TAG = b"cleanroom-fl/envelope/v1"
PUBLIC_KEY_SIZE = 32
MAX_CIPHERTEXT = 512 * 1024 * 1024

Direction = Literal["model", "update", "evaluate", "metrics"]


@dataclass(frozen=True)
class EnvelopeContext:
    """What a ciphertext is bound to."""

    direction: Direction
    run_id: str
    round: int
    site: str
    model_digest: str  # hex SHA-256 of the global model of this round

    def info(self, tag: bytes = INFO_TAG) -> bytes:
        """The HPKE ``info``: ``tag`` (v1 or v2) and every field, each length-prefixed."""
        parts = (tag, self.direction.encode(), self.run_id.encode(),
                 struct.pack("<Q", self.round), self.site.encode(),
                 bytes.fromhex(self.model_digest))
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class KeyPair:
    """An ephemeral X25519 key pair (one per site per round, one per coordinator round)."""

    private_key: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        try:
            return cls(x25519.X25519PrivateKey.from_private_bytes(raw))
        except ValueError:
            raise EnvelopeError("not a 32-byte X25519 private key") from None

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        """Raw private key, for sealing into the site's store only; never log or send this."""
        return self.private_key.private_bytes(serialization.Encoding.Raw,
                                              serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())


def load_public_key(raw: bytes) -> x25519.X25519PublicKey:
    if len(raw) != PUBLIC_KEY_SIZE:
        raise EnvelopeError(f"public key is {len(raw)} bytes, expect {PUBLIC_KEY_SIZE}")
    try:
        return x25519.X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise EnvelopeError("not an X25519 public key") from None


def seal(plaintext: bytes, recipient_public_key: bytes, context: EnvelopeContext) -> bytes:
    """Encrypt to the recipient's raw X25519 public key, bound to ``context``."""
    return SUITE.encrypt(plaintext, load_public_key(recipient_public_key), info=context.info())


def open_sealed(ciphertext: bytes, recipient: KeyPair, context: EnvelopeContext) -> bytes:
    """Decrypt; EnvelopeError if the key, the context or any byte is wrong."""
    if len(ciphertext) > MAX_CIPHERTEXT:
        raise EnvelopeError(f"ciphertext of {len(ciphertext)} bytes exceeds the limit")
    try:
        return SUITE.decrypt(ciphertext, recipient.private_key, info=context.info())
    except (InvalidTag, ValueError):
        raise EnvelopeError(f"cannot open {context.direction} envelope for site "
                            f"{context.site!r} round {context.round}: wrong key, wrong context "
                            "or tampered ciphertext") from None


def ciphertext_digest(ciphertext: bytes) -> str:
    """What the audit chain records about a ciphertext: its SHA-256, never its bytes."""
    return hashlib.sha256(ciphertext).hexdigest()


# ============================================================================= envelope v2
#
# Encrypt once, wrap per recipient, sign for the attested sender. See docs/envelope.md.
#
# * the payload (arrays, bytes) plus a small authenticated metadata object (JSON) is encrypted
#   ONCE under a fresh content key with the chunked AEAD of ``cleanroom.protocol.stream``;
# * the content key is HPKE-wrapped (same suite as v1, base mode) to each recipient with
#   ``info = context.info(INFO_TAG_V2)``: the per-site context binding of v1 under a v2 tag;
# * a sender that holds an Ed25519 signing key (a site: its per-round key, bound into its
#   attestation report_data) signs, per recipient, ``SIGNATURE_TAG || info || tag chain``; the
#   signature travels inside the wrapped key, and a recipient that expects a signer refuses an
#   envelope without it or signed by another key. cryptography's HPKE offers base mode only
#   (``Suite.encrypt/decrypt``, no auth mode, no PSK), hence the signature.

INFO_TAG_V2 = b"cleanroom-fl/envelope/v2"
SIGNATURE_TAG = b"cleanroom-fl/envelope/v2/signature"
WRAP_VERSION = 2
WRAP_SIGNED = 0x01  # flag: an Ed25519 signature follows the content key and header digest
SIGNATURE_SIZE = 64
SIGNER_KEY_SIZE = 32
HEADER_DIGEST_SIZE = 32
WRAP_PLAIN_SIZE = 2 + stream.KEY_SIZE + HEADER_DIGEST_SIZE  # version, flags, key, header
WRAP_SIZE = SUITE_ENC_SIZE + WRAP_PLAIN_SIZE + stream.TAG_SIZE  # 114 bytes
WRAP_SIZE_SIGNED = WRAP_SIZE + SIGNATURE_SIZE  # 178 bytes
MAX_METADATA_DEPTH = 8
MODEL_DIRECTIONS = ("model", "evaluate")  # the payload is the model its context names

Buffer = bytes | bytearray | memoryview | np.ndarray
Sealed = stream.SealedParts  # one buffer, or the header then one buffer per chunk


def _context_info_v2(context: EnvelopeContext) -> bytes:
    return context.info(INFO_TAG_V2)


@dataclass(frozen=True)
class Recipient:
    """Who a v2 envelope is for: a raw X25519 public key and the context bound to it."""

    public_key: bytes
    context: EnvelopeContext


@dataclass(frozen=True)
class SealedEnvelope:
    """One ciphertext for everyone plus one small wrapped key per recipient (in order).

    The sealed payload is ``parts``: the 88-byte header, then one ``bytes`` per chunk. Send
    the parts as they are (e.g. a list of bytes in a Flower ConfigRecord: no copy), or
    :meth:`to_bytes` for the contiguous form (one copy). Both open alike."""

    parts: tuple[bytes, ...]
    wrapped_keys: tuple[bytes, ...]
    ciphertext_id: str  # hex SHA-256(header digest || chunk tags): what the audit records
    header: stream.StreamHeader

    @property
    def nbytes(self) -> int:
        return self.header.sealed_len

    def to_bytes(self) -> bytes:
        return b"".join(self.parts)


@dataclass(frozen=True)
class OpenedEnvelope:
    """An authenticated, decrypted envelope."""

    payload: memoryview  # writable, aligned view of the plaintext payload in one buffer
    metadata: dict[str, Any]
    ciphertext_id: str
    signer: bytes | None  # raw Ed25519 key the signature was verified against, if asked

    def digest(self) -> str:
        """SHA-256 (hex) of the payload (one pass; for arrays, the arrays digest)."""
        return hashlib.sha256(self.payload).hexdigest()


def signer_public_bytes(signer: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> bytes:
    """Raw 32-byte Ed25519 public key: what a site binds into its report_data."""
    public = signer.public_key() if isinstance(signer, ed25519.Ed25519PrivateKey) else signer
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signer_public_key(raw: bytes) -> ed25519.Ed25519PublicKey:
    if len(raw) != SIGNER_KEY_SIZE:
        raise EnvelopeError(f"signer key is {len(raw)} bytes, expect {SIGNER_KEY_SIZE}")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise EnvelopeError("not an Ed25519 public key") from None


def _signed_message(info: bytes, chain: bytes) -> bytes:
    return SIGNATURE_TAG + struct.pack("<I", len(info)) + info + chain


def _metadata_bytes(metadata: Mapping[str, Any] | None) -> bytes:
    if metadata is None:
        return b""
    if not isinstance(metadata, Mapping):
        raise EnvelopeError("envelope metadata must be a mapping")
    _check_depth(metadata)
    try:
        raw = json.dumps(dict(metadata), separators=(",", ":"), sort_keys=True,
                         allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError):
        raise EnvelopeError("envelope metadata must be JSON: string keys, finite numbers, "
                            "strings, booleans, null, lists and objects") from None
    if len(raw) > stream.MAX_METADATA:
        raise EnvelopeError(f"envelope metadata of {len(raw)} bytes exceeds "
                            f"{stream.MAX_METADATA}")
    return raw


def _reject_constant(token: str) -> object:
    raise ValueError(f"non-finite number {token}")


def _parse_metadata(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise EnvelopeError("envelope metadata is not JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError("envelope metadata must be a JSON object")
    _check_depth(value)
    return value


def _check_depth(value: object) -> None:
    todo: list[tuple[object, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_METADATA_DEPTH:
            raise EnvelopeError(f"envelope metadata nested deeper than {MAX_METADATA_DEPTH}")
        if isinstance(item, dict):
            todo.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            todo.extend((child, depth + 1) for child in item)


def _seal_parts(parts: Sequence[memoryview], recipients: Sequence[Recipient], *,
                metadata: Mapping[str, Any] | None, signer: ed25519.Ed25519PrivateKey | None,
                chunk_log2: int, align_offset: int, workers: int) -> SealedEnvelope:
    if not recipients:
        raise EnvelopeError("an envelope needs at least one recipient")
    publics = [load_public_key(r.public_key) for r in recipients]
    meta = _metadata_bytes(metadata)
    pad_len = (-(len(meta) + align_offset)) % stream.ALIGN
    content_key = os.urandom(stream.KEY_SIZE)
    sealed = stream.encrypt(parts, content_key, meta=meta, pad_len=pad_len,
                            chunk_log2=chunk_log2, workers=workers)
    header_digest = sealed.header.digest()
    wraps = []
    for recipient, public in zip(recipients, publics, strict=True):
        info = _context_info_v2(recipient.context)
        plain = bytes((WRAP_VERSION, WRAP_SIGNED if signer else 0)) + content_key + \
            header_digest
        if signer is not None:
            plain += signer.sign(_signed_message(info, sealed.chain))
        wraps.append(SUITE.encrypt(plain, public, info=info))
    return SealedEnvelope(sealed.parts(), tuple(wraps), sealed.chain.hex(), sealed.header)


def seal_envelope(payload: Buffer, recipients: Sequence[Recipient], *,
                  metadata: Mapping[str, Any] | None = None,
                  signer: ed25519.Ed25519PrivateKey | None = None,
                  chunk_log2: int = stream.DEFAULT_CHUNK_LOG2,
                  workers: int = stream.DEFAULT_WORKERS) -> SealedEnvelope:
    """Encrypt ``payload`` and ``metadata`` once; wrap the content key to every recipient,
    bound to its context; with ``signer``, sign each wrap for its recipient's context."""
    return _seal_parts([stream.as_view(payload, "payload")], recipients, metadata=metadata,
                       signer=signer, chunk_log2=chunk_log2, align_offset=0, workers=workers)


def envelope_ciphertext_id(sealed_payload: Sealed,
                           max_payload: int = stream.MAX_PAYLOAD) -> str:
    """The :attr:`SealedEnvelope.ciphertext_id` of a sealed payload, computed by anyone from
    its bytes alone (header and tags, no key): what audit records name."""
    return stream.tag_chain(*stream.split(sealed_payload, max_payload)).hex()


def envelope_plaintext_size(sealed_payload: Sealed,
                            max_payload: int = stream.MAX_PAYLOAD) -> int:
    """Bytes an ``out`` buffer needs to open this envelope (metadata, padding, payload)."""
    return stream.split(sealed_payload, max_payload)[0].plaintext_len


def _unwrap(header: stream.StreamHeader, chunks: list[memoryview], wrapped_key: bytes,
            recipient: KeyPair, context: EnvelopeContext,
            expected_signer: ed25519.Ed25519PublicKey | None,
            ) -> tuple[stream.StreamKeys, bytes]:
    """Check everything that can be checked before decrypting the payload."""
    what = f"{context.direction} envelope for site {context.site!r} round {context.round}"
    if not isinstance(wrapped_key, bytes) or len(wrapped_key) not in (WRAP_SIZE,
                                                                      WRAP_SIZE_SIGNED):
        raise EnvelopeError(f"{what}: wrapped key must be {WRAP_SIZE} or {WRAP_SIZE_SIGNED} "
                            "bytes")
    info = _context_info_v2(context)
    try:
        plain = SUITE.decrypt(wrapped_key, recipient.private_key, info=info)
    except (InvalidTag, ValueError):
        raise EnvelopeError(f"cannot open {what}: wrong key, wrong context or tampered key "
                            "wrap") from None
    version, flags = plain[0], plain[1]
    signed = flags == WRAP_SIGNED
    if version != WRAP_VERSION or flags not in (0, WRAP_SIGNED) or len(plain) != (
            WRAP_PLAIN_SIZE + (SIGNATURE_SIZE if signed else 0)):
        raise EnvelopeError(f"{what}: malformed key wrap (version {version}, flags {flags})")
    content_key = plain[2:2 + stream.KEY_SIZE]
    named = plain[2 + stream.KEY_SIZE:WRAP_PLAIN_SIZE]
    header_digest = header.digest()
    if not hmac.compare_digest(named, header_digest):
        raise EnvelopeError(f"{what}: the wrapped key belongs to another payload")
    keys = stream.derive_keys(content_key, header.payload_id)
    stream.check_commitment(keys, header)
    chain = stream.tag_chain(header, chunks)
    if expected_signer is not None:
        if not signed:
            raise EnvelopeError(f"{what} is not signed by the attested key (no signature)")
        try:
            expected_signer.verify(plain[WRAP_PLAIN_SIZE:], _signed_message(info, chain))
        except InvalidSignature:
            raise EnvelopeError(f"{what} is not signed by the attested key (signature by "
                                "another key, or over another envelope)") from None
    return keys, chain


def _open(sealed_payload: Sealed, wrapped_key: bytes, recipient: KeyPair,
          context: EnvelopeContext, expected_signer: ed25519.Ed25519PublicKey | None,
          max_payload: int, workers: int, out: np.ndarray | None,
          ) -> tuple[np.ndarray, stream.StreamHeader, dict[str, Any], str]:
    header, chunks = stream.split(sealed_payload, max_payload)
    keys, chain = _unwrap(header, chunks, wrapped_key, recipient, context, expected_signer)
    plain = stream.decrypt(chunks, header, keys, header.digest(), workers=workers, out=out)
    if not stream.padding_is_zero(plain, header):
        raise EnvelopeError("envelope padding is not zero")
    metadata = _parse_metadata(plain[:header.meta_len].tobytes())
    return plain, header, metadata, chain.hex()


def open_envelope(sealed_payload: Sealed, wrapped_key: bytes, recipient: KeyPair,
                  context: EnvelopeContext, *,
                  expected_signer: ed25519.Ed25519PublicKey | None = None,
                  max_payload: int = stream.MAX_PAYLOAD,
                  workers: int = stream.DEFAULT_WORKERS,
                  out: np.ndarray | None = None) -> OpenedEnvelope:
    """Unwrap, check the signature (when ``expected_signer`` is given: required), decrypt.

    EnvelopeError for a wrong key or context, a wrap for another payload, a missing or foreign
    signature, any tampered, reordered, dropped or added chunk, or a length beyond the limits.
    ``out`` (e.g. ``stream.aligned_empty(n)``, reused round after round to skip the page
    faults of a fresh buffer) receives the plaintext; the result views it, so the next open
    into the same ``out`` overwrites it. Size it with :func:`envelope_plaintext_size`.
    """
    plain, header, metadata, chain = _open(sealed_payload, wrapped_key, recipient, context,
                                           expected_signer, max_payload, workers, out)
    start = header.meta_len + header.pad_len
    return OpenedEnvelope(memoryview(plain)[start:], metadata, chain,
                          signer_public_bytes(expected_signer) if expected_signer else None)


# ----------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class OpenedArrays:
    """Arrays out of an authenticated envelope. They view one writable buffer (holding any of
    them keeps all of it alive); copy what must outlive the round."""

    arrays: OrderedDict[str, np.ndarray]
    metadata: dict[str, Any]
    ciphertext_id: str
    signer: bytes | None
    digest: str | None  # the model digest, checked, for model and evaluate envelopes


def seal_arrays_envelope(arrays: Mapping[str, np.ndarray] | EncodedArrays,
                         recipients: Sequence[Recipient], *,
                         metadata: Mapping[str, Any] | None = None,
                         signer: ed25519.Ed25519PrivateKey | None = None,
                         chunk_log2: int = stream.DEFAULT_CHUNK_LOG2,
                         workers: int = stream.DEFAULT_WORKERS) -> SealedEnvelope:
    """Seal named arrays once for every recipient (pass an :class:`EncodedArrays` to reuse
    its encoding and cached digest). For model and evaluate contexts the arrays must be the
    model the context names (its digest is checked: hashed here unless already cached)."""
    encoded = arrays if isinstance(arrays, EncodedArrays) else encode_arrays_view(arrays)
    for r in recipients:
        if r.context.direction in MODEL_DIRECTIONS and encoded.digest != r.context.model_digest:
            raise ProtocolError(f"{r.context.direction} for site {r.context.site!r}: the arrays "
                                "are not the model its context names")
    return _seal_parts(encoded.parts(), recipients, metadata=metadata, signer=signer,
                       chunk_log2=chunk_log2, align_offset=len(encoded.header),
                       workers=workers)


def open_arrays_envelope(sealed_payload: Sealed, wrapped_key: bytes, recipient: KeyPair,
                         context: EnvelopeContext, *,
                         expected_signer: ed25519.Ed25519PublicKey | None = None,
                         max_payload: int = stream.MAX_PAYLOAD,
                         workers: int = stream.DEFAULT_WORKERS,
                         out: np.ndarray | None = None) -> OpenedArrays:
    """Open, then decode the arrays without copying. For model and evaluate contexts the
    decrypted model must hash to ``context.model_digest`` (ProtocolError otherwise)."""
    opened = open_envelope(sealed_payload, wrapped_key, recipient, context,
                           expected_signer=expected_signer, max_payload=max_payload,
                           workers=workers, out=out)
    digest = None
    if context.direction in MODEL_DIRECTIONS:
        digest = opened.digest()
        if not hmac.compare_digest(digest, context.model_digest):
            raise ProtocolError(f"decrypted {context.direction} model for site "
                                f"{context.site!r} differs from the model digest its context "
                                "binds")
    arrays = decode_arrays_view(opened.payload)
    return OpenedArrays(arrays, opened.metadata, opened.ciphertext_id, opened.signer, digest)
