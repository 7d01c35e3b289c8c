"""Canonical bytes of a set of named arrays (model parameters or updates) and their digest.

Both sides must agree bit for bit on what a "model" is, because the model digest is bound into
attestation evidence and into the encryption context. The encoding is deliberately simple and
strict: ``MAGIC || u32-LE header length || JSON header || raw little-endian bytes``, the JSON
header listing every array's name, dtype, shape and byte count in order, serialised canonically
(sorted keys, no spaces, ASCII). Decoding checks every length before it allocates and refuses
anything it cannot represent exactly, including a header that is not in canonical form, so
``SHA-256(blob) == arrays_digest(decode(blob))`` holds for every blob the decoder accepts.

Two ways in and out:

* :func:`encode_arrays` / :func:`decode_arrays` / :func:`arrays_digest`: bytes in, independent
  writable arrays out (one copy each way).
* :func:`encode_arrays_view` / :func:`decode_arrays_view`: the zero-copy path. Encoding returns
  the header plus a memoryview on each array's own memory (a copy only for an array that is not
  C-contiguous little-endian) and hashes them incrementally; decoding returns arrays that *view*
  the caller's buffer (writable when the buffer is, e.g. the output of
  :func:`cleanroom.protocol.envelope.open_envelope`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from cleanroom.errors import ProtocolError

MAGIC = b"CRFLARR1"
PREFIX_SIZE = len(MAGIC) + 4  # magic, then the header length (u32, little-endian)
ALLOWED_DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")
MAX_HEADER = 1 << 20  # bytes of JSON header
MAX_ARRAYS = 10_000  # arrays in one blob
MAX_NDIM = 32  # dimensions of one array
MAX_NAME = 1024  # characters of one array name
MAX_ARRAY_BYTES = 1 << 40  # bytes one array's shape may describe (zero dims counted as one)

_KEYS = ("dtype", "name", "nbytes", "shape")


def _canonical_json(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()


def _raw_view(arr: np.ndarray) -> memoryview:
    """Flat unsigned-byte view of ``arr``'s little-endian bytes (copies only if it must)."""
    little = arr.dtype.newbyteorder("<")
    if not arr.flags.c_contiguous or arr.dtype != little:
        arr = np.ascontiguousarray(arr).astype(little, copy=False)
    return memoryview(arr.reshape(-1).view(np.uint8))


@dataclass(frozen=True, eq=False)
class EncodedArrays:
    """The canonical encoding of a set of arrays, as parts that view the arrays' memory.

    ``header`` is ``MAGIC || length || JSON``; ``buffers`` hold each array's raw bytes in
    order (each view keeps its array alive). The arrays must not be modified while this object
    is in use: the views (and the cached digest) would no longer agree.
    """

    header: bytes
    buffers: tuple[memoryview, ...]
    names: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(b.nbytes for b in self.buffers)

    def parts(self) -> tuple[memoryview, ...]:
        """Header then every array buffer: the blob is their concatenation."""
        return (memoryview(self.header), *self.buffers)

    @cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical bytes, computed once, without a copy."""
        h = hashlib.sha256()
        for part in self.parts():
            h.update(part)
        return h.hexdigest()

    def write_into(self, out: memoryview | bytearray) -> int:
        """Copy the blob into ``out`` (at least :attr:`nbytes` long); return bytes written."""
        view = memoryview(out).cast("B")
        pos = 0
        for part in self.parts():
            view[pos:pos + part.nbytes] = part
            pos += part.nbytes
        return pos

    def to_bytes(self) -> bytes:
        """The blob as one ``bytes`` object (one copy)."""
        return b"".join(self.parts())


def encode_arrays_view(arrays: Mapping[str, np.ndarray]) -> EncodedArrays:
    """Encode named arrays in their given order, viewing their memory (no copy for arrays that
    are already C-contiguous and little-endian)."""
    if len(arrays) > MAX_ARRAYS:
        raise ProtocolError(f"{len(arrays)} arrays exceed the limit of {MAX_ARRAYS}")
    header: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise ProtocolError(f"array name {name!r} is not a string")
        a = np.asarray(value)
        dtype = a.dtype.name
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype} not supported")
        raw = _raw_view(a)
        header.append({"name": name, "dtype": dtype, "shape": list(a.shape),
                       "nbytes": raw.nbytes})
        buffers.append(raw)
    head = _canonical_json(header)
    if len(head) > MAX_HEADER:
        raise ProtocolError(f"array header of {len(head)} bytes exceeds {MAX_HEADER}")
    return EncodedArrays(MAGIC + struct.pack("<I", len(head)) + head, tuple(buffers),
                         tuple(arrays.keys()))


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays in their given order (one copy, into the returned bytes)."""
    return encode_arrays_view(arrays).to_bytes()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the canonical encoding: the 'model digest' bound everywhere."""
    return encode_arrays_view(arrays).digest


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _int(value: object, what: str, name: str) -> int:
    if type(value) is not int:  # not bool, not float, not a string of digits
        raise ProtocolError(f"array blob: {what} of {name!r} is not an integer")
    return value


def _entry(raw: object, index: int, seen: set[str], offset: int, end: int) -> _Entry:
    if not isinstance(raw, dict) or tuple(sorted(raw)) != _KEYS:
        raise ProtocolError(f"array blob: header entry {index} must have exactly the keys "
                            f"{', '.join(_KEYS)}")
    name, dtype_name, shape_raw = raw["name"], raw["dtype"], raw["shape"]
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise ProtocolError(f"array blob: entry {index} has no valid name")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"array blob: entry {index} name is not valid Unicode") from None
    if name in seen:
        raise ProtocolError(f"array blob: duplicate array name {name!r}")
    if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
        raise ProtocolError(f"array blob: {name!r} has unsupported dtype {dtype_name!r}")
    if not isinstance(shape_raw, list) or len(shape_raw) > MAX_NDIM:
        raise ProtocolError(f"array blob: shape of {name!r} must be a list of at most "
                            f"{MAX_NDIM} dimensions")
    shape = tuple(_int(d, "a dimension", name) for d in shape_raw)
    if any(d < 0 for d in shape):
        raise ProtocolError(f"array blob: {name!r} has a negative dimension {list(shape)}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    span = dtype.itemsize
    for d in shape:  # what numpy must be able to index, zero dims counted as one
        span *= max(d, 1)
        if span > MAX_ARRAY_BYTES:
            raise ProtocolError(f"array blob: shape {list(shape)} of {name!r} is too large")
    expect = math.prod(shape) * dtype.itemsize
    nbytes = _int(raw["nbytes"], "nbytes", name)
    if nbytes != expect:
        raise ProtocolError(f"array blob: {name!r} declares {nbytes} bytes, its shape and "
                            f"dtype make {expect}")
    if offset + nbytes > end:
        raise ProtocolError(f"array blob: {name!r} runs {offset + nbytes - end} bytes past "
                            "the end")
    return _Entry(name, dtype, shape, offset, nbytes)


def _parse(buf: memoryview) -> list[_Entry]:
    """Validate the whole blob's structure; return where each array lies in it."""
    if buf.nbytes < PREFIX_SIZE or buf[:len(MAGIC)] != MAGIC:
        raise ProtocolError("array blob: bad magic")
    (hlen,) = struct.unpack_from("<I", buf, len(MAGIC))
    if hlen > MAX_HEADER or PREFIX_SIZE + hlen > buf.nbytes:
        raise ProtocolError("array blob: header length out of range")
    head = bytes(buf[PREFIX_SIZE:PREFIX_SIZE + hlen])
    try:
        header = json.loads(head, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("array blob: header JSON nested too deeply") from None
    except ValueError:  # includes UnicodeDecodeError and over-long integer literals
        raise ProtocolError("array blob: header is not JSON") from None
    if not isinstance(header, list):
        raise ProtocolError("array blob: header must be a list")
    if len(header) > MAX_ARRAYS:
        raise ProtocolError(f"array blob: {len(header)} arrays exceed the limit of "
                            f"{MAX_ARRAYS}")
    entries: list[_Entry] = []
    seen: set[str] = set()
    pos = PREFIX_SIZE + hlen
    for index, raw in enumerate(header):
        entry = _entry(raw, index, seen, pos, buf.nbytes)
        seen.add(entry.name)
        entries.append(entry)
        pos += entry.nbytes
    if pos != buf.nbytes:
        raise ProtocolError(f"array blob: {buf.nbytes - pos} trailing bytes")
    canonical = _canonical_json([{"name": e.name, "dtype": e.dtype.name, "nbytes": e.nbytes,
                                  "shape": list(e.shape)} for e in entries])
    if canonical != head:
        raise ProtocolError("array blob: header is not in canonical form")
    for e in entries:
        if e.dtype.kind == "b" and e.nbytes and int(np.frombuffer(
                buf, np.uint8, e.nbytes, e.offset).max()) > 1:
            raise ProtocolError(f"array blob: bool array {e.name!r} holds bytes other than 0/1")
    return entries


def _no_constant(token: str) -> object:
    raise ValueError(f"non-finite constant {token}")


def _as_view(blob: object) -> memoryview:
    try:
        view = memoryview(blob)  # type: ignore[arg-type]
    except TypeError:
        raise ProtocolError(f"array blob must be bytes-like, not {type(blob).__name__}") from None
    if not view.c_contiguous:
        raise ProtocolError("array blob must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def decode_arrays_view(blob: bytes | bytearray | memoryview | np.ndarray,
                       ) -> OrderedDict[str, np.ndarray]:
    """Decode without copying: every array views ``blob``.

    The arrays are writable exactly when ``blob`` is (``bytes`` gives read-only arrays, a
    ``bytearray`` or writable memoryview gives writable ones) and they keep ``blob`` alive. An
    array whose bytes are not aligned for its dtype in ``blob`` is copied (numpy would
    otherwise work on it slowly). Raises ProtocolError, and nothing else, on any malformed blob.
    """
    buf = _as_view(blob)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for e in _parse(buf):
        arr = np.frombuffer(buf, dtype=e.dtype, count=e.nbytes // e.dtype.itemsize,
                            offset=e.offset).reshape(e.shape)
        if not arr.flags.aligned:
            arr = arr.copy()
        out[e.name] = arr
    return out


def decode_arrays(blob: bytes | bytearray | memoryview) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`encode_arrays`: independent, writable arrays (one copy each);
    raises ProtocolError, and nothing else, on any malformed blob."""
    buf = _as_view(blob)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for e in _parse(buf):
        out[e.name] = np.frombuffer(buf, dtype=e.dtype, count=e.nbytes // e.dtype.itemsize,
                                    offset=e.offset).reshape(e.shape).copy()
    return out
