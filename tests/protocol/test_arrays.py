"""The canonical array encoding: zero-copy paths, digests, and every hostile header refused
with a ProtocolError (never ValueError, OverflowError, MemoryError or RecursionError)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cleanroom.errors import ProtocolError
from cleanroom.protocol.arrays import (
    ALLOWED_DTYPES,
    MAGIC,
    MAX_ARRAYS,
    MAX_HEADER,
    MAX_NAME,
    MAX_NDIM,
    arrays_digest,
    decode_arrays,
    decode_arrays_view,
    encode_arrays,
    encode_arrays_view,
)


def blob_from(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    head = raw_header if raw_header is not None else json.dumps(
        header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + data


def entry(name="w", dtype="float32", shape=(2,), nbytes=8) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape), "nbytes": nbytes}


MODEL = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3),
                    b=np.array([1.5], dtype=np.float64), n=np.array(3, dtype=np.int64),
                    m=np.array([True, False]), e=np.zeros((0, 4), np.float16))


# ----------------------------------------------------------------------------- round trips


def test_view_encoding_equals_bytes_encoding_and_digest():
    enc = encode_arrays_view(MODEL)
    blob = encode_arrays(MODEL)
    assert enc.to_bytes() == blob and enc.nbytes == len(blob)
    assert enc.digest == hashlib.sha256(blob).hexdigest() == arrays_digest(MODEL)
    out = bytearray(enc.nbytes)
    assert enc.write_into(out) == len(blob) and bytes(out) == blob


def test_view_encoding_does_not_copy_contiguous_arrays():
    big = np.ones(1000, np.float32)
    enc = encode_arrays_view({"big": big})
    assert np.shares_memory(np.asarray(enc.buffers[0]), big)


def test_view_encoding_keeps_its_arrays_alive():
    import gc

    enc = encode_arrays_view({"w": np.arange(50_000, dtype=np.float64)})  # no other reference
    gc.collect()
    np.zeros(50_000)  # reuse freed memory, if any had been freed
    assert enc.to_bytes() == encode_arrays({"w": np.arange(50_000, dtype=np.float64)})


def test_non_contiguous_and_big_endian_arrays_encode_canonically():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    strided = base[:, ::2]
    swapped = base.astype(">f8")
    assert encode_arrays({"x": strided}) == encode_arrays({"x": np.ascontiguousarray(strided)})
    assert arrays_digest({"x": swapped}) == arrays_digest({"x": base})


@pytest.mark.parametrize("decode", [decode_arrays, decode_arrays_view])
def test_roundtrip_every_dtype(decode):
    out = decode(bytearray(encode_arrays(MODEL)))
    assert list(out) == list(MODEL)
    for name, arr in MODEL.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
        assert np.array_equal(out[name], arr)
    assert arrays_digest(out) == arrays_digest(MODEL)


def test_decode_view_shares_the_buffer_and_follows_its_writability():
    buf = bytearray(encode_arrays({"w": np.arange(4, dtype=np.uint8)}))  # bytes: aligned
    view = decode_arrays_view(buf)["w"]
    assert view.flags.writeable and np.shares_memory(view, np.frombuffer(buf, np.uint8))
    view[0] = 42
    assert decode_arrays(buf)["w"][0] == 42
    readonly = decode_arrays_view(bytes(buf))["w"]
    assert not readonly.flags.writeable


def test_decode_copy_is_independent_and_writable():
    blob = encode_arrays({"w": np.arange(4, dtype=np.float32)})
    out = decode_arrays(blob)["w"]
    assert out.flags.writeable and out.flags.owndata
    out[0] = 7
    assert decode_arrays(blob)["w"][0] == 0


def test_misaligned_array_is_copied_to_an_aligned_one():
    blob = bytearray(encode_arrays(OrderedDict(a=np.zeros(3, np.uint8),
                                               f=np.arange(4, dtype=np.float64))))
    f = decode_arrays_view(blob)["f"]
    assert f.flags.aligned and np.array_equal(f, np.arange(4))


def test_empty_model_roundtrips():
    assert decode_arrays(encode_arrays({})) == OrderedDict()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.text(max_size=8), hnp.arrays(
    st.sampled_from(ALLOWED_DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                      max_side=4))),
    max_size=4, unique_by=lambda t: t[0]))
def test_roundtrip_property(items):
    arrays = OrderedDict(items)
    blob = encode_arrays(arrays)
    for decode in (decode_arrays, decode_arrays_view):
        out = decode(blob)
        assert list(out) == list(arrays)
        for name, arr in arrays.items():
            assert out[name].tobytes() == np.ascontiguousarray(arr).tobytes()
        # the digest of an accepted blob is the digest of what it decodes to
        assert hashlib.sha256(blob).hexdigest() == arrays_digest(out)


# ----------------------------------------------------------------------------- hostile headers


HOSTILE = {  # case: (what the error must say, blob)
    "bad magic": ("bad magic", b"CRFLARR0" + bytes(4)),
    "too short": ("bad magic", MAGIC[:5]),
    "header length past the end": ("header length", MAGIC + struct.pack("<I", 100) + b"[]"),
    "header length over the limit": ("header length", MAGIC + struct.pack("<I", MAX_HEADER + 1)),
    "not JSON": ("not JSON", blob_from(None, raw_header=b"[{\"name\":")),
    "not UTF-8": ("not JSON", blob_from(None, raw_header=b"[\"\xff\"]")),
    "deep JSON": ("nested too deeply", blob_from(None, raw_header=b"[" * 100_000 + b"]" * 100_000)),
    "NaN constant": ("not JSON", blob_from(None, raw_header=b"[NaN]")),
    "Infinity as a dimension": ("not JSON", blob_from(None, raw_header=(
        b'[{"dtype":"float32","name":"w","nbytes":4,"shape":[Infinity]}]'))),
    "5000-digit integer": ("not JSON", blob_from(None, raw_header=(
        b'[{"dtype":"float32","name":"w","nbytes":4,"shape":[' + b"9" * 5000 + b"]}]"))),
    "header is an object": ("must be a list", blob_from({"w": 1})),
    "entry is a list": ("exactly the keys", blob_from([["w"]])),
    "missing key": ("exactly the keys", blob_from(
        [{"name": "w", "dtype": "float32", "shape": [2]}], bytes(8))),
    "extra key": ("exactly the keys", blob_from([{**entry(), "offset": 0}], bytes(8))),
    "name not a string": ("no valid name", blob_from([entry(name=5)], bytes(8))),
    "name too long": ("no valid name", blob_from([entry(name="n" * (MAX_NAME + 1))], bytes(8))),
    "lone surrogate name": ("not valid Unicode", blob_from([entry(name="\ud800")], bytes(8))),
    "duplicate names": ("duplicate", blob_from([entry(), entry()], bytes(16))),
    "unknown dtype": ("unsupported dtype", blob_from([entry(dtype="object")], bytes(8))),
    "dtype not a string": ("unsupported dtype", blob_from([entry(dtype=["float32"])], bytes(8))),
    "shape not a list": ("must be a list of", blob_from([{**entry(), "shape": 2}], bytes(8))),
    "too many dimensions": ("must be a list of", blob_from(
        [entry(shape=(1,) * (MAX_NDIM + 1), nbytes=4)], bytes(4))),
    "negative dimension": ("negative dimension", blob_from(
        [entry(shape=(-2, -1), nbytes=8)], bytes(8))),
    "float dimension": ("not an integer", blob_from([entry(shape=(2.0,), nbytes=8)], bytes(8))),
    "bool dimension": ("not an integer", blob_from([entry(shape=(True,), nbytes=4)], bytes(4))),
    "string dimension": ("not an integer", blob_from([entry(shape=("2",), nbytes=8)], bytes(8))),
    "shape overflows int64": ("too large", blob_from([entry(shape=(2**32, 2**32), nbytes=0)])),
    "product wraps to zero in int64": ("too large", blob_from([entry(shape=(2**62, 4), nbytes=0)])),
    "zero dim beside huge dims": ("too large", blob_from(
        [entry(shape=(0, 2**40, 2**40), nbytes=0)])),
    "dimension past 2**64": ("too large", blob_from([entry(shape=(2**70,), nbytes=2**72)])),
    "absurd nbytes": ("past the end", blob_from([entry(shape=(2**36,), nbytes=2**38)], bytes(8))),
    "nbytes not matching shape": ("declares 12 bytes", blob_from([entry(nbytes=12)], bytes(12))),
    "negative nbytes": ("declares -8", blob_from([entry(shape=(0,), nbytes=-8)])),
    "nbytes as a string": ("not an integer", blob_from([entry(nbytes="8")], bytes(8))),
    "data shorter than declared": ("past the end", blob_from([entry()], bytes(4))),
    "trailing bytes": ("trailing", blob_from([entry()], bytes(9))),
    "huge array count": ("exceed the limit", blob_from(None, raw_header=b"[" + b",".join(
        [b"0"] * (MAX_ARRAYS + 1)) + b"]")),
    "non-canonical spacing": ("canonical", blob_from(
        None, raw_header=json.dumps([entry()]).encode(), data=bytes(8))),
    "non-canonical key order": ("canonical", blob_from(None, raw_header=(
        b'[{"name":"w","dtype":"float32","shape":[2],"nbytes":8}]'), data=bytes(8))),
    "bool array holding 2": ("0/1", blob_from(
        [entry(dtype="bool", shape=(2,), nbytes=2)], b"\x00\x02")),
}


@pytest.mark.parametrize("decode", [decode_arrays, decode_arrays_view])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_refused_with_protocol_error(case, decode):
    reason, blob = HOSTILE[case]
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        decode(blob)


def test_non_buffer_input_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode_arrays("not bytes")  # type: ignore[arg-type]


def test_encoder_refuses_what_it_cannot_represent():
    with pytest.raises(ProtocolError):
        encode_arrays({"x": np.array(["a"])})
    with pytest.raises(ProtocolError):
        encode_arrays({1: np.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(ProtocolError):
        encode_arrays({"x": np.array([1 + 2j])})


# ----------------------------------------------------------------------------- fuzz


def _only_typed(data: bytes) -> None:
    for decode in (decode_arrays, decode_arrays_view):
        with contextlib.suppress(ProtocolError):
            decode(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _only_typed(MAGIC + data[:4] + data[4:])
    _only_typed(data)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_byte_mutations(mutations):
    blob = bytearray(encode_arrays(MODEL))
    for pos, value in mutations:
        blob[pos % len(blob)] = value
    _only_typed(bytes(blob))


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=False), st.text(max_size=6))
_dims = st.lists(st.one_of(st.integers(-3, 2**66), st.floats(), st.text(max_size=3),
                           st.booleans()), max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=4), _json_leaf),
     "dtype": st.one_of(st.sampled_from(ALLOWED_DTYPES), _json_leaf),
     "shape": st.one_of(_dims, _json_leaf),
     "nbytes": st.one_of(st.integers(-10, 2**66), _json_leaf)},
    optional={"x": _json_leaf}), max_size=4), st.binary(max_size=64))
def test_fuzz_structured_headers(header, data):
    _only_typed(blob_from(header, data))
