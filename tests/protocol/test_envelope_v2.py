"""Envelope v2: encrypt once, wrap per recipient, sign for the attested sender.

Every attack on the framing (reorder, truncate, duplicate, extend, splice, flipped bits in any
field), on the wrap (another site's key, another context, another round) and on the sender
(unsigned, signed by another key, a relay's own envelope) is refused with an EnvelopeError.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections import OrderedDict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.errors import EnvelopeError, ProtocolError
from cleanroom.protocol import stream
from cleanroom.protocol.arrays import arrays_digest, encode_arrays, encode_arrays_view
from cleanroom.protocol.envelope import (
    MAX_METADATA_DEPTH,
    WRAP_SIZE,
    WRAP_SIZE_SIGNED,
    EnvelopeContext,
    KeyPair,
    Recipient,
    envelope_ciphertext_id,
    envelope_plaintext_size,
    load_signer_public_key,
    open_arrays_envelope,
    open_envelope,
    seal_arrays_envelope,
    seal_envelope,
    signer_public_bytes,
)

SMALL = 12  # 4 KiB chunks: many chunks from little data
CHUNK = 1 << SMALL
MODEL = OrderedDict(w=np.arange(3000, dtype=np.float32).reshape(100, 30),
                    b=np.linspace(0, 1, 7, dtype=np.float64))
DIGEST = arrays_digest(MODEL)


def ctx(**kw) -> EnvelopeContext:
    base = dict(direction="update", run_id="run-1", round=3, site="va", model_digest=DIGEST)
    base.update(kw)
    return EnvelopeContext(**base)


@pytest.fixture(scope="module")
def coordinator() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="module")
def site_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def seal_update(coordinator: KeyPair, payload: bytes, signer=None, context=None, **kw):
    context = context or ctx()
    return seal_envelope(payload, [Recipient(coordinator.public_bytes, context)],
                         signer=signer, chunk_log2=SMALL, **kw)


def open_update(coordinator: KeyPair, payload, wrapped: bytes, signer=None, context=None,
                **kw):
    return open_envelope(payload, wrapped, coordinator, context or ctx(),
                         expected_signer=signer.public_key() if signer else None, **kw)


def chunks_of(sealed: bytes) -> tuple[bytes, list[bytes]]:
    _, views = stream.split(sealed)
    return sealed[:stream.HEADER_SIZE], [bytes(v) for v in views]


def with_header(sealed: bytes, **fields) -> bytes:
    values = dict(zip(("magic", "suite", "chunk_log2", "pad", "reserved", "meta_len",
                       "payload_len", "payload_id", "commitment"),
                      stream.HEADER.unpack_from(sealed, 0), strict=True))
    values.update(fields)
    return stream.HEADER.pack(*values.values()) + sealed[stream.HEADER_SIZE:]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
@pytest.mark.parametrize("signed", [False, True])
def test_roundtrip_sizes(coordinator, site_key, size, signed):
    payload = np.random.default_rng(size).bytes(size)
    signer = site_key if signed else None
    sealed = seal_update(coordinator, payload, signer)
    assert len(sealed.wrapped_keys[0]) == (WRAP_SIZE_SIGNED if signed else WRAP_SIZE)
    assert sealed.header.chunks == max(1, -(-size // CHUNK))
    opened = open_update(coordinator, sealed.parts, sealed.wrapped_keys[0], signer)
    assert bytes(opened.payload) == payload
    assert opened.signer == (signer_public_bytes(site_key) if signed else None)
    assert opened.ciphertext_id == sealed.ciphertext_id
    assert envelope_ciphertext_id(sealed.to_bytes()) == sealed.ciphertext_id


@pytest.mark.parametrize("size", [1 << 20, (1 << 20) + 1])
def test_roundtrip_default_chunk_boundaries(coordinator, size):
    payload = np.random.default_rng(1).bytes(size)
    sealed = seal_envelope(payload, [Recipient(coordinator.public_bytes, ctx())])
    assert sealed.header.chunks == (1 if size == 1 << 20 else 2)
    assert bytes(open_envelope(sealed.parts, sealed.wrapped_keys[0], coordinator,
                               ctx()).payload) == payload


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_chunks_give_the_same_plaintext(coordinator, workers):
    payload = np.random.default_rng(2).bytes(9 * CHUNK + 5)
    sealed = seal_update(coordinator, payload, workers=workers)
    opened = open_update(coordinator, sealed.parts, sealed.wrapped_keys[0],
                         workers=4 - workers)
    assert bytes(opened.payload) == payload


def test_sealed_payload_hides_plaintext_and_is_read_only(coordinator):
    payload = b"secret model bytes " * 1000
    sealed = seal_update(coordinator, payload)
    assert b"secret model" not in sealed.to_bytes()
    assert all(isinstance(part, bytes) for part in sealed.parts)
    assert len(sealed.parts) == 1 + sealed.header.chunks
    assert sealed.to_bytes() != seal_update(coordinator, payload).to_bytes()


def test_metadata_travels_authenticated(coordinator, site_key):
    metrics = {"num-examples": 120, "loss": 0.25, "tags": ["a", "b"], "dp": {"eps": 0.5}}
    sealed = seal_update(coordinator, b"update", site_key, metadata=metrics)
    opened = open_update(coordinator, sealed.parts, sealed.wrapped_keys[0], site_key)
    assert opened.metadata == metrics and bytes(opened.payload) == b"update"
    assert b"num-examples" not in sealed.to_bytes()  # encrypted, not only authenticated


def test_arrays_roundtrip_views_one_aligned_writable_buffer(coordinator, site_key):
    sealed = seal_arrays_envelope(MODEL, [Recipient(coordinator.public_bytes, ctx())],
                                  signer=site_key, metadata={"num-examples": 5})
    opened = open_arrays_envelope(sealed.parts, sealed.wrapped_keys[0], coordinator, ctx(),
                                  expected_signer=site_key.public_key())
    assert list(opened.arrays) == list(MODEL) and opened.metadata == {"num-examples": 5}
    for name, arr in MODEL.items():
        got = opened.arrays[name]
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
        assert got.flags.writeable and got.flags.aligned
    assert opened.arrays["w"].ctypes.data % stream.ALIGN == 0  # first array cache-aligned
    w, b = opened.arrays["w"], opened.arrays["b"]
    assert b.ctypes.data == w.ctypes.data + w.nbytes  # both view one buffer: no copies
    assert opened.digest is None  # updates are not the context's model: nothing to check


def test_open_into_a_reused_buffer(coordinator, site_key):
    first = seal_arrays_envelope(MODEL, [Recipient(coordinator.public_bytes, ctx())],
                                 signer=site_key, metadata={"n": 1})
    other = OrderedDict((k, v + 1) for k, v in MODEL.items())
    second = seal_arrays_envelope(other, [Recipient(coordinator.public_bytes, ctx())],
                                  signer=site_key)
    need = envelope_plaintext_size(first.parts)
    assert need == first.header.plaintext_len
    out = stream.aligned_empty(need + 100)
    opened = open_arrays_envelope(first.parts, first.wrapped_keys[0], coordinator, ctx(),
                                  expected_signer=site_key.public_key(), out=out)
    assert np.array_equal(opened.arrays["w"], MODEL["w"])
    assert np.shares_memory(opened.arrays["w"], out)
    again = open_arrays_envelope(second.parts, second.wrapped_keys[0], coordinator, ctx(),
                                 expected_signer=site_key.public_key(), out=out)
    assert np.array_equal(again.arrays["w"], other["w"])
    assert np.array_equal(opened.arrays["w"], other["w"])  # documented: out is overwritten
    for bad in (stream.aligned_empty(need - 1), np.zeros(need, np.float32),
                np.zeros((need, 1), np.uint8), np.zeros(2 * need, np.uint8)[::2],
                bytearray(need)):
        with pytest.raises(EnvelopeError, match="out "):
            open_arrays_envelope(first.parts, first.wrapped_keys[0], coordinator, ctx(),
                                 out=bad)  # type: ignore[arg-type]
    readonly = np.zeros(need, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(EnvelopeError, match="writable"):
        open_envelope(first.parts, first.wrapped_keys[0], coordinator, ctx(), out=readonly)


def test_one_model_ciphertext_many_sites(coordinator):
    sites = {f"site{i}": KeyPair.generate() for i in range(20)}
    encoded = encode_arrays_view(MODEL)
    recipients = [Recipient(kp.public_bytes, ctx(direction="model", site=name))
                  for name, kp in sites.items()]
    sealed = seal_arrays_envelope(encoded, recipients)
    assert len(sealed.wrapped_keys) == 20 and len(set(sealed.wrapped_keys)) == 20
    for (name, kp), wrapped in zip(sites.items(), sealed.wrapped_keys, strict=True):
        opened = open_arrays_envelope(sealed.parts, wrapped, kp,
                                      ctx(direction="model", site=name))
        assert opened.digest == DIGEST == encoded.digest
        assert opened.ciphertext_id == sealed.ciphertext_id
        assert np.array_equal(opened.arrays["w"], MODEL["w"])


# ----------------------------------------------------------------------------- chunk framing


@pytest.fixture(scope="module")
def four_chunks(coordinator):
    payload = np.random.default_rng(4).bytes(4 * CHUNK)
    sealed = seal_update(coordinator, payload)
    return sealed.to_bytes(), sealed.wrapped_keys[0]


def refused(coordinator, payload: bytes, wrapped: bytes, match: str | None = None,
            **kw) -> None:
    with pytest.raises(EnvelopeError, match=match):
        open_update(coordinator, payload, wrapped, **kw)


def test_reordered_chunks_refused(coordinator, four_chunks):
    payload, wrapped = four_chunks
    head, chunks = chunks_of(payload)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    refused(coordinator, head + b"".join(chunks), wrapped, "chunk 1 of 4 fails")


def test_duplicated_chunk_refused(coordinator, four_chunks):
    payload, wrapped = four_chunks
    head, chunks = chunks_of(payload)
    chunks[2] = chunks[1]
    refused(coordinator, head + b"".join(chunks), wrapped, "chunk 2 of 4 fails")


def test_truncated_envelope_refused(coordinator, four_chunks):
    payload, wrapped = four_chunks
    head, chunks = chunks_of(payload)
    refused(coordinator, head + b"".join(chunks[:3]), wrapped, "truncated or extended")
    refused(coordinator, payload[:-1], wrapped, "truncated or extended")
    # and with the header's length changed to match: the header is authenticated
    shorter = with_header(head + b"".join(chunks[:3]), payload_len=3 * CHUNK)
    refused(coordinator, shorter, wrapped, "belongs to another payload")


def test_extended_envelope_refused(coordinator, four_chunks):
    payload, wrapped = four_chunks
    _, chunks = chunks_of(payload)
    refused(coordinator, payload + chunks[3], wrapped, "truncated or extended")
    longer = with_header(payload + chunks[3], payload_len=5 * CHUNK)
    refused(coordinator, longer, wrapped, "belongs to another payload")


def test_last_chunk_flag_stops_truncation_even_with_the_header_bypassed(coordinator):
    """Below the header check: chunk nonces carry a last-chunk flag, so a stream cut at a
    chunk boundary fails even if its (authenticated) length were forged."""
    key = bytes(range(32))
    data = np.random.default_rng(5).bytes(3 * CHUNK)
    sealed = stream.encrypt([memoryview(data)], key, meta=b"", pad_len=0, chunk_log2=SMALL)
    keys = stream.derive_keys(key, sealed.header.payload_id)
    aad = sealed.header.digest()
    chunks = [memoryview(c) for c in sealed.chunks]
    assert bytes(stream.decrypt(chunks, sealed.header, keys, aad)) == data
    cut = stream.StreamHeader(SMALL, 0, 0, 2 * CHUNK, sealed.header.payload_id,
                              sealed.header.key_commitment)
    with pytest.raises(EnvelopeError, match="chunk 1 of 2 fails"):
        stream.decrypt(chunks[:2], cut, keys, aad)
    grown = stream.StreamHeader(SMALL, 0, 0, 4 * CHUNK, sealed.header.payload_id,
                                sealed.header.key_commitment)
    with pytest.raises(EnvelopeError, match="chunk 2 of 4 fails"):
        stream.decrypt([*chunks, chunks[-1]], grown, keys, aad)


def test_chunk_spliced_from_another_payload_refused(coordinator, four_chunks):
    payload, wrapped = four_chunks
    other = seal_update(coordinator, np.random.default_rng(6).bytes(4 * CHUNK)).to_bytes()
    head, chunks = chunks_of(payload)
    chunks[2] = chunks_of(other)[1][2]
    refused(coordinator, head + b"".join(chunks), wrapped, "chunk 2 of 4 fails")
    # another payload's header (its own id and key commitment) under this wrap
    refused(coordinator, other[:stream.HEADER_SIZE] + payload[stream.HEADER_SIZE:], wrapped,
            "belongs to another payload")
    # this payload under the other's wrap
    refused(coordinator, payload, seal_update(coordinator, b"x").wrapped_keys[0],
            "belongs to another payload")


def test_parts_form_opens_like_the_contiguous_form_and_is_as_strict(coordinator, site_key):
    sealed = seal_update(coordinator, np.random.default_rng(10).bytes(3 * CHUNK + 1), site_key)
    parts, wrapped = list(sealed.parts), sealed.wrapped_keys[0]
    for form in (parts, tuple(parts), sealed.to_bytes(), bytearray(sealed.to_bytes()),
                 [bytearray(p) for p in parts], [memoryview(p) for p in parts]):
        assert open_update(coordinator, form, wrapped, site_key).ciphertext_id == \
            sealed.ciphertext_id
    head, c = parts[0], parts[1:]
    refused(coordinator, [], wrapped, "no parts")
    refused(coordinator, [head, *c[:-1]], wrapped, "truncated or extended")  # dropped
    refused(coordinator, [head, *c, c[-1]], wrapped, "truncated or extended")  # appended
    refused(coordinator, [head + c[0], *c[1:]], wrapped, "truncated or extended")
    refused(coordinator, [head, c[0] + b"\0", *c[1:]], wrapped, "chunk 0 is")
    refused(coordinator, [head, c[0], c[0], *c[2:]], wrapped, signer=site_key)  # duplicated
    refused(coordinator, [head, c[1], c[0], *c[2:]], wrapped, "fails authentication")
    refused(coordinator, [head, "text", *c[1:]], wrapped, "bytes-like")
    refused(coordinator, [head, None, *c[1:]], wrapped, "bytes-like")
    refused(coordinator, 42, wrapped, "bytes-like")  # type: ignore[arg-type]


HEADER_FIELDS = {"magic": (0, 8), "suite": (8, 9), "chunk size": (9, 10), "padding": (10, 11),
                 "reserved": (11, 12), "metadata length": (12, 16),
                 "payload length": (16, 24), "payload id": (24, 56),
                 "key commitment": (56, 88)}


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_bit_flip_in_every_header_field_refused(coordinator, site_key, field):
    sealed = seal_update(coordinator, np.random.default_rng(7).bytes(2 * CHUNK + 3), site_key,
                         metadata={"n": 1})
    payload, wrapped = sealed.to_bytes(), sealed.wrapped_keys[0]
    lo, hi = HEADER_FIELDS[field]
    for pos in range(lo, hi):
        for bit in (0, 7):
            bad = bytearray(payload)
            bad[pos] ^= 1 << bit
            refused(coordinator, bytes(bad), wrapped, signer=site_key)


def test_bit_flip_in_every_chunk_and_tag_refused(coordinator, site_key):
    sealed = seal_update(coordinator, np.random.default_rng(8).bytes(2 * CHUNK + 3), site_key,
                         metadata={"n": 1})
    payload, wrapped = sealed.to_bytes(), sealed.wrapped_keys[0]
    header = sealed.header
    offset = stream.HEADER_SIZE
    for index in range(header.chunks):
        length = header.chunk_len(index)
        for pos in (offset, offset + length // 2, offset + length - 1,  # ciphertext
                    offset + length, offset + length + 15):  # tag
            bad = bytearray(payload)
            bad[pos] ^= 0x10
            # the tag chain changes with a tag: the signature check catches it first
            refused(coordinator, bytes(bad), wrapped, signer=site_key)
            refused(coordinator, bytes(bad), wrapped, "fails authentication")
        offset += length + stream.TAG_SIZE


@pytest.mark.parametrize("signed", [False, True])
def test_bit_flip_anywhere_in_the_wrapped_key_refused(coordinator, site_key, signed):
    signer = site_key if signed else None
    sealed = seal_update(coordinator, b"payload", signer)
    wrapped = sealed.wrapped_keys[0]
    for pos in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[pos] ^= 0x01
        refused(coordinator, sealed.parts, bytes(bad), "wrong key, wrong context",
                signer=signer)


def test_wrapped_key_of_wrong_size_or_type_refused(coordinator):
    sealed = seal_update(coordinator, b"payload")
    for bad in (b"", sealed.wrapped_keys[0][:-1], sealed.wrapped_keys[0] + b"\0", b"\0" * 500):
        refused(coordinator, sealed.parts, bad, "wrapped key must be")
    refused(coordinator, sealed.parts, bytearray(sealed.wrapped_keys[0]),  # type: ignore[arg-type]
            "wrapped key must be")


# ----------------------------------------------------------------------------- binding


def test_swapped_wrapped_keys_between_sites_refused():
    a, b = KeyPair.generate(), KeyPair.generate()
    ca, cb = ctx(direction="model", site="a"), ctx(direction="model", site="b")
    sealed = seal_arrays_envelope(MODEL, [Recipient(a.public_bytes, ca),
                                          Recipient(b.public_bytes, cb)])
    wa, wb = sealed.wrapped_keys
    assert open_arrays_envelope(sealed.parts, wa, a, ca).digest == DIGEST
    with pytest.raises(EnvelopeError, match="wrong key, wrong context"):
        open_arrays_envelope(sealed.parts, wb, a, ca)  # b's wrap, a's key
    with pytest.raises(EnvelopeError, match="wrong key, wrong context"):
        open_arrays_envelope(sealed.parts, wa, a, cb)  # a's wrap and key, b's context


@pytest.mark.parametrize("other", [
    {"direction": "model"}, {"direction": "evaluate"}, {"run_id": "run-2"}, {"round": 4},
    {"site": "cleveland"}, {"model_digest": "cd" * 32},
])
def test_wrong_context_refused(coordinator, site_key, other):
    sealed = seal_update(coordinator, b"update", site_key)
    refused(coordinator, sealed.parts, sealed.wrapped_keys[0], "wrong key, wrong context",
            signer=site_key, context=ctx(**other))


def test_wrong_recipient_key_refused(coordinator):
    sealed = seal_update(coordinator, b"update")
    refused(KeyPair.generate(), sealed.parts, sealed.wrapped_keys[0],
            "wrong key, wrong context")


def test_replay_of_another_rounds_update_refused(coordinator, site_key):
    """Round 3's envelope offered as round 4's: the context differs (and so would the key,
    the coordinator's round key is fresh every round)."""
    round3 = seal_update(coordinator, b"update of round 3", site_key, context=ctx(round=3))
    for key in (coordinator, KeyPair.generate()):
        refused(key, round3.parts, round3.wrapped_keys[0], signer=site_key,
                context=ctx(round=4))


def test_v1_ciphertext_is_not_a_v2_wrap(coordinator):
    from cleanroom.protocol.envelope import seal

    v1 = seal(b"\x02\x00" + bytes(64), coordinator.public_bytes, ctx())
    sealed = seal_update(coordinator, b"x")
    refused(coordinator, sealed.parts, v1, "wrong key, wrong context")


# ----------------------------------------------------------------------------- sender


def test_unsigned_update_refused_when_a_signer_is_expected(coordinator, site_key):
    sealed = seal_update(coordinator, b"update")
    refused(coordinator, sealed.parts, sealed.wrapped_keys[0],
            r"not signed by the attested key \(no signature\)", signer=site_key)


def test_update_signed_by_another_key_refused(coordinator, site_key):
    sealed = seal_update(coordinator, b"update", ed25519.Ed25519PrivateKey.generate())
    refused(coordinator, sealed.parts, sealed.wrapped_keys[0],
            "not signed by the attested key", signer=site_key)


def test_relay_cannot_pass_its_own_update_as_the_sites(coordinator, site_key):
    """The coordinator's round key is public: a relay can seal to it, but not sign as the
    attested site, and it cannot reuse the site's signed wrap for its own payload."""
    genuine = seal_update(coordinator, b"honest update", site_key)
    relay_key = ed25519.Ed25519PrivateKey.generate()
    forged = seal_update(coordinator, b"poisoned update", relay_key)
    refused(coordinator, forged.parts, forged.wrapped_keys[0],
            "not signed by the attested key", signer=site_key)
    unsigned = seal_update(coordinator, b"poisoned update")
    refused(coordinator, unsigned.parts, unsigned.wrapped_keys[0],
            "not signed by the attested key", signer=site_key)
    refused(coordinator, forged.parts, genuine.wrapped_keys[0],
            "belongs to another payload", signer=site_key)
    assert bytes(open_update(coordinator, genuine.parts, genuine.wrapped_keys[0],
                             site_key).payload) == b"honest update"


def test_signature_binds_the_recipient_context(coordinator, site_key):
    """A signed envelope for two recipients carries two signatures, each over its own
    context: one cannot stand in for the other."""
    other = KeyPair.generate()
    c1, c2 = ctx(site="va"), ctx(site="va", run_id="other-run")
    sealed = seal_envelope(b"update", [Recipient(coordinator.public_bytes, c1),
                                       Recipient(other.public_bytes, c2)], signer=site_key)
    assert open_envelope(sealed.parts, sealed.wrapped_keys[0], coordinator, c1,
                         expected_signer=site_key.public_key()).signer
    assert open_envelope(sealed.parts, sealed.wrapped_keys[1], other, c2,
                         expected_signer=site_key.public_key()).signer


def test_signer_key_helpers():
    key = ed25519.Ed25519PrivateKey.generate()
    raw = signer_public_bytes(key)
    assert len(raw) == 32 and signer_public_bytes(load_signer_public_key(raw)) == raw
    for bad in (b"", raw[:-1], raw + b"\0"):
        with pytest.raises(EnvelopeError):
            load_signer_public_key(bad)


# ----------------------------------------------------------------------------- models


def test_model_envelope_must_carry_the_bound_model(coordinator):
    other = OrderedDict(MODEL, b=np.zeros(7))
    with pytest.raises(ProtocolError, match="not the model its context names"):
        seal_arrays_envelope(other, [Recipient(coordinator.public_bytes,
                                               ctx(direction="model"))])
    # a sender that bypasses the check (raw seal) is caught when the site opens
    site = KeyPair.generate()
    context = ctx(direction="model")
    sealed = seal_envelope(encode_arrays(other), [Recipient(site.public_bytes, context)])
    with pytest.raises(ProtocolError, match="differs from the model digest"):
        open_arrays_envelope(sealed.parts, sealed.wrapped_keys[0], site, context)


def test_hostile_arrays_inside_an_authentic_envelope_are_a_protocol_error(coordinator):
    head = b'[{"dtype":"float32","name":"w","nbytes":0,"shape":[4294967296,4294967296]}]'
    blob = b"CRFLARR1" + struct.pack("<I", len(head)) + head
    sealed = seal_update(coordinator, blob)
    with pytest.raises(ProtocolError, match="too large"):
        open_arrays_envelope(sealed.parts, sealed.wrapped_keys[0], coordinator, ctx())


# ----------------------------------------------------------------------------- limits


def test_limits_checked_before_allocation(coordinator, four_chunks):
    payload, wrapped = four_chunks
    huge = stream.MAX_PAYLOAD + 1
    refused(coordinator, with_header(payload, payload_len=huge), wrapped, "exceeds")
    refused(coordinator, with_header(payload, payload_len=2**64 - 1), wrapped, "exceeds")
    refused(coordinator, payload, wrapped, "exceeds", max_payload=CHUNK)
    refused(coordinator, with_header(payload, meta_len=stream.MAX_METADATA + 1), wrapped,
            "metadata of")
    refused(coordinator, with_header(payload, meta_len=2**32 - 1), wrapped, "metadata of")
    for log2 in (0, stream.MIN_CHUNK_LOG2 - 1, stream.MAX_CHUNK_LOG2 + 1, 255):
        refused(coordinator, with_header(payload, chunk_log2=log2), wrapped, "chunk size")
    refused(coordinator, with_header(payload, pad=stream.ALIGN), wrapped, "padding")
    refused(coordinator, with_header(payload, reserved=1), wrapped, "reserved")
    refused(coordinator, with_header(payload, suite=2), wrapped, "suite")
    refused(coordinator, b"CRFLENV1" + payload[8:], wrapped, "bad magic")
    refused(coordinator, payload[:stream.HEADER_SIZE - 1], wrapped, "shorter than")
    refused(coordinator, "not bytes", wrapped, "bytes-like")  # type: ignore[arg-type]


def test_seal_limits(coordinator):
    r = [Recipient(coordinator.public_bytes, ctx())]
    with pytest.raises(EnvelopeError, match="exceeds"):
        seal_envelope(b"x", r, metadata={"k": "v" * stream.MAX_METADATA})
    with pytest.raises(EnvelopeError, match="must be JSON"):
        seal_envelope(b"x", r, metadata={"loss": float("nan")})
    with pytest.raises(EnvelopeError, match="must be JSON"):
        seal_envelope(b"x", r, metadata={"k": object()})
    with pytest.raises(EnvelopeError, match="nested deeper"):
        seal_envelope(b"x", r, metadata=json.loads("{\"a\":" * MAX_METADATA_DEPTH + "1"
                                                   + "}" * MAX_METADATA_DEPTH))
    with pytest.raises(EnvelopeError, match="at least one recipient"):
        seal_envelope(b"x", [])
    with pytest.raises(EnvelopeError, match="public key"):
        seal_envelope(b"x", [Recipient(b"short", ctx())])
    with pytest.raises(EnvelopeError, match="chunk size"):
        seal_envelope(b"x", r, chunk_log2=30)
    with pytest.raises(EnvelopeError, match="bytes-like"):
        seal_envelope("text", r)  # type: ignore[arg-type]


def test_metadata_parser_refuses_hostile_json():
    from cleanroom.protocol.envelope import _parse_metadata

    for raw in (b"[1]", b"nope", b"\xff", b"{\"a\": NaN}", b"[" * 60000,
                json.dumps({"a": [[[[[[[[[[1]]]]]]]]]]}).encode()):
        with pytest.raises(EnvelopeError):
            _parse_metadata(raw)
    assert _parse_metadata(b"") == {}


# ----------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def signed_update(coordinator, site_key):
    return seal_update(coordinator, np.random.default_rng(9).bytes(2 * CHUNK + 7), site_key,
                       metadata={"n": 1})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=200))
def test_fuzz_open_random_bytes_only_envelope_errors(coordinator, payload, wrapped):
    with contextlib.suppress(EnvelopeError):
        open_update(coordinator, payload, wrapped)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=5))
def test_fuzz_open_random_parts_only_envelope_errors(coordinator, signed_update, parts):
    with contextlib.suppress(EnvelopeError):
        open_update(coordinator, [signed_update.parts[0], *parts],
                    signed_update.wrapped_keys[0])
    with contextlib.suppress(EnvelopeError):
        open_update(coordinator, parts, signed_update.wrapped_keys[0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1,
                max_size=4), st.booleans())
def test_fuzz_mutated_envelopes_refused(coordinator, site_key, signed_update, mutations,
                                        in_wrap):
    sealed = signed_update
    payload, wrapped = bytearray(sealed.to_bytes()), bytearray(sealed.wrapped_keys[0])
    target = wrapped if in_wrap else payload
    for pos, xor in {pos % len(target): xor for pos, xor in mutations}.items():
        target[pos] ^= xor
    with pytest.raises(EnvelopeError):
        open_update(coordinator, bytes(payload), bytes(wrapped), site_key)

