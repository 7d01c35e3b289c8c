"""Canonical bytes of a set of named arrays (model parameters or updates) and their digest.

Both sides must agree bit for bit on what a "model" is, because the model digest is bound into
attestation evidence and into the encryption context. The encoding is deliberately simple and
strict: a JSON header (names, dtypes, shapes, in order) then the raw little-endian bytes.
Decoding checks every length and refuses anything it cannot represent exactly.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from cleanroom.errors import ProtocolError

MAGIC = b"CRFLARR1"
ALLOWED_DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")
MAX_HEADER = 1 << 20
MAX_ARRAYS = 10_000


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays in their given order."""
    header = []
    chunks = []
    for name, arr in arrays.items():
        a = np.asarray(arr)
        dtype = a.dtype.name
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype} not supported")
        data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header.append({"name": name, "dtype": dtype, "shape": list(a.shape),
                       "nbytes": len(data)})
        chunks.append(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def decode_arrays(blob: bytes) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`encode_arrays`; raises ProtocolError on any inconsistency."""
    if len(blob) < len(MAGIC) + 4 or not blob.startswith(MAGIC):
        raise ProtocolError("array blob: bad magic")
    (hlen,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or start + hlen > len(blob):
        raise ProtocolError("array blob: header length out of range")
    try:
        header = json.loads(blob[start:start + hlen])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("array blob: header is not JSON") from None
    if not isinstance(header, list) or len(header) > MAX_ARRAYS:
        raise ProtocolError("array blob: header must be a list")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    pos = start + hlen
    for entry in header:
        try:
            name, dtype = str(entry["name"]), str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            nbytes = int(entry["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("array blob: malformed header entry") from None
        if dtype not in ALLOWED_DTYPES or any(d < 0 for d in shape) or name in out:
            raise ProtocolError(f"array blob: bad entry for {name!r}")
        dt = np.dtype(dtype).newbyteorder("<")
        expect = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if nbytes != expect or pos + nbytes > len(blob):
            raise ProtocolError(f"array blob: {name!r} has {nbytes} bytes, expect {expect}")
        out[name] = np.frombuffer(blob, dtype=dt, count=expect // dt.itemsize,
                                  offset=pos).reshape(shape).astype(dtype).copy()
        pos += nbytes
    if pos != len(blob):
        raise ProtocolError(f"array blob: {len(blob) - pos} trailing bytes")
    return out


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the canonical encoding: the 'model digest' bound everywhere."""
    return hashlib.sha256(encode_arrays(arrays)).hexdigest()
