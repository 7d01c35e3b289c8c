"""Fuzz targets for what arrives from the network: envelopes, array blobs, wire schemas.

Each target takes arbitrary bytes and must either accept them or raise the project's typed
error (``ProtocolError``/``EnvelopeError``; pydantic's ``ValidationError`` for the schemas).
Anything else escaping a target (ValueError, OverflowError, MemoryError, RecursionError, an
assertion that a tampered envelope opened) is a finding. The targets are plain functions so
any driver can call them (``benchmarks/fuzz.py``, atheris, hypothesis); this module carries
a small mutation-based driver of its own::

    python -m cleanroom.protocol.fuzz --target envelope --runs 1000000
    python -m cleanroom.protocol.fuzz --target all --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import ValidationError

from cleanroom.errors import ProtocolError
from cleanroom.protocol import stream
from cleanroom.protocol.arrays import decode_arrays, decode_arrays_view, encode_arrays
from cleanroom.protocol.envelope import (
    EnvelopeContext,
    KeyPair,
    Recipient,
    _parse_metadata,
    open_arrays_envelope,
    open_envelope,
    seal_envelope,
)
from cleanroom.protocol.wire import AttestChallenge, AttestResponse, EnvelopeHeader

PATCH = struct.Struct(">IB")  # a mutation in envelope modes 2 and 3: position, xor mask
FUZZ_CHUNK_LOG2 = stream.MIN_CHUNK_LOG2


# ----------------------------------------------------------------------------- targets


def fuzz_arrays(data: bytes) -> None:
    """Both array decoders on ``data``: a result or a ProtocolError, nothing else."""
    for decode in (decode_arrays, decode_arrays_view):
        with contextlib.suppress(ProtocolError):
            decode(data)


@dataclass(frozen=True)
class _Fixture:
    recipient: KeyPair
    signer: ed25519.Ed25519PrivateKey
    context: EnvelopeContext
    payload: bytes  # a genuine signed update, three 4 KiB chunks, with metadata
    parts: tuple[bytes, ...]  # the same, as header and chunks
    wrapped: bytes


@functools.cache
def _fixture() -> _Fixture:
    recipient = KeyPair.from_private_bytes(bytes(range(32)))
    signer = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
    context = EnvelopeContext("update", "fuzz-run", 1, "fuzz-site", "ab" * 32)
    blob = encode_arrays(OrderedDict(w=np.arange(2000, dtype=np.float32),
                                     b=np.ones(3, np.float64)))
    sealed = seal_envelope(blob, [Recipient(recipient.public_bytes, context)],
                           metadata={"num-examples": 10}, signer=signer,
                           chunk_log2=FUZZ_CHUNK_LOG2)
    return _Fixture(recipient, signer, context, sealed.to_bytes(), sealed.parts,
                    sealed.wrapped_keys[0])


def _patched(original: bytes, patches: bytes) -> bytes:
    out = bytearray(original)
    for i in range(0, len(patches) - PATCH.size + 1, PATCH.size):
        pos, mask = PATCH.unpack_from(patches, i)
        out[pos % len(out)] ^= mask
    return bytes(out)


def _edited_parts(original: tuple[bytes, ...], ops: bytes) -> list[bytes]:
    parts = list(original)
    for op in ops[:16]:
        if not parts:
            break
        kind, index = op % 3, (op // 3) % len(parts)
        if kind == 0:
            del parts[index]
        elif kind == 1:
            parts.insert(index, parts[index])
        else:
            other = (index + 1) % len(parts)
            parts[index], parts[other] = parts[other], parts[index]
    return parts


def fuzz_envelope(data: bytes) -> None:
    """Open hostile envelopes; the first byte picks what ``data[1:]`` becomes:

    0: the whole sealed payload (with a genuine wrap); 1: the wrapped key (with a genuine
    payload); 2: patches (u32 position, u8 xor) to a genuine payload; 3: patches to the genuine
    wrap; 4: an array blob sealed genuinely, then opened and decoded; 5: envelope metadata;
    6: edits to the genuine payload's parts (each byte drops, duplicates or swaps a part).
    Modes 2, 3 and 6 also assert that an envelope that was changed never opens.
    """
    f = _fixture()
    if not data:
        return
    mode, body = data[0] % 7, data[1:]
    expect = f.signer.public_key()
    try:
        if mode == 0:
            open_envelope(body, f.wrapped, f.recipient, f.context, expected_signer=expect)
        elif mode == 1:
            open_envelope(f.payload, body, f.recipient, f.context, expected_signer=expect)
        elif mode in (2, 3):
            payload = _patched(f.payload, body) if mode == 2 else f.payload
            wrapped = _patched(f.wrapped, body) if mode == 3 else f.wrapped
            open_envelope(payload, wrapped, f.recipient, f.context, expected_signer=expect)
            if (payload, wrapped) != (f.payload, f.wrapped):
                raise AssertionError("a tampered envelope opened")
        elif mode == 4:
            sealed = seal_envelope(body, [Recipient(f.recipient.public_bytes, f.context)],
                                   signer=f.signer, chunk_log2=FUZZ_CHUNK_LOG2)
            open_arrays_envelope(sealed.parts, sealed.wrapped_keys[0], f.recipient,
                                 f.context, expected_signer=expect)
        elif mode == 5:
            _parse_metadata(body[:stream.MAX_METADATA])
        else:
            parts = _edited_parts(f.parts, body)
            open_envelope(parts, f.wrapped, f.recipient, f.context, expected_signer=expect)
            if parts != list(f.parts):
                raise AssertionError("an envelope with edited parts opened")
    except ProtocolError:
        pass


WIRE_MODELS = (EnvelopeHeader, AttestChallenge, AttestResponse)


def fuzz_wire(data: bytes) -> None:
    """Every wire schema on ``data`` as JSON: a model or a ValidationError, nothing else."""
    for model in WIRE_MODELS:
        with contextlib.suppress(ValidationError):
            model.model_validate_json(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "envelope": fuzz_envelope, "arrays": fuzz_arrays, "wire": fuzz_wire}


# ----------------------------------------------------------------------------- seeds


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start mutating from."""
    arrays = [encode_arrays(OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3),
                                        b=np.array([1.5]), m=np.array([True]))),
              encode_arrays({}), encode_arrays({"x": np.zeros((0, 3), np.int64)})]
    if target == "arrays":
        return arrays
    if target == "wire":
        header = EnvelopeHeader(direction="update", run_id="r", round=1, site="va",
                                model_digest="ab" * 32, suite="s",
                                ciphertext_sha256="cd" * 32)
        response = AttestResponse(site="va", run_id="r", round=1, nonce=b"\x01" * 32)
        return [header.model_dump_json().encode(), response.model_dump_json().encode(),
                b'{"protocol":1,"run_id":"r","round":1,"nonce":"' + b"00" * 32 + b'"}']
    f = _fixture()
    return [b"\x00" + f.payload, b"\x01" + f.wrapped, b"\x02" + PATCH.pack(100, 1),
            b"\x03" + PATCH.pack(5, 1), *(b"\x04" + a for a in arrays),
            b'\x05{"num-examples": 3, "loss": [0.5, {"a": null}]}', b"\x06\x02"]


INTERESTING = [b"0", b"-1", b"4294967296", b"18446744073709551616", b"1e308", b"NaN",
               b"Infinity", b"[" * 64, b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b'"\\ud800"']


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """One to four random edits: bit flips, byte sets, inserts, deletes, duplicated ranges,
    truncation, splices with another seed, interesting tokens."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[pos % len(out)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del out[pos:pos + rng.randint(1, 64)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start:start + rng.randint(1, 256)]
        elif op == 5:
            del out[pos:]
        elif op == 6:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            out[pos:] = other[cut:]
        else:
            token = rng.choice(INTERESTING)
            out[pos:pos + len(token)] = token
    return bytes(out)


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class FuzzResult:
    target: str
    execs: int
    seconds: float
    finding: bytes | None  # the first input that raised something other than a typed error
    error: str = ""


def run(target: str, *, runs: int | None = None, seconds: float | None = None,
        seed: int = 0) -> FuzzResult:
    """Fuzz ``target`` for ``runs`` inputs or ``seconds``; stop at the first finding."""
    fn, corpus = TARGETS[target], seeds(target)
    rng = random.Random(seed)
    start, execs = time.perf_counter(), 0
    while (runs is None or execs < runs) and (
            seconds is None or time.perf_counter() - start < seconds):
        data = mutate(rng.choice(corpus), rng, corpus) if execs >= len(corpus) \
            else corpus[execs]
        execs += 1
        try:
            fn(data)
        except Exception as exc:  # noqa: BLE001 - anything untyped is what we look for
            return FuzzResult(target, execs, time.perf_counter() - start, data,
                              f"{type(exc).__name__}: {exc}")
    return FuzzResult(target, execs, time.perf_counter() - start, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cleanroom.protocol.fuzz",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--runs", type=int, default=None, help="inputs per target")
    parser.add_argument("--seconds", type=float, default=None, help="time per target")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs is None and args.seconds is None:
        args.runs = 10_000
    targets = list(TARGETS) if args.target == "all" else [args.target]
    print(f"{'target':<10} {'execs':>10} {'seconds':>8} {'execs/s':>9}  result")
    status = 0
    for name in targets:
        r = run(name, runs=args.runs, seconds=args.seconds, seed=args.seed)
        verdict = "ok" if r.finding is None else f"FINDING {r.error}; input {r.finding.hex()}"
        print(f"{name:<10} {r.execs:>10} {r.seconds:>8.1f} {r.execs / r.seconds:>9.0f}  "
              f"{verdict}")
        status |= r.finding is not None
    return status


if __name__ == "__main__":
    sys.exit(main())
