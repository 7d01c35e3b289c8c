"""Envelope throughput next to the AES-GCM limit of this machine, v2 against v1.

In one run, ``--repeats`` times, interleaved so every path sees the same machine load:

* ``openssl speed -evp aes-256-gcm -bytes 1048576`` (one core, warm buffers: the limit), or
  AESGCM over 1 MiB chunks when openssl is missing;
* a ``--mb`` MB float32 update, site -> coordinator: v2 seal (encode, encrypt once, sign) and
  open (verify, decrypt, decode into views), with the default threads and with one, and open
  into a buffer reused from the previous repeat (no page faults); v1 as the
  code calls it today (``protocol.flower.seal_arrays`` / ``open_arrays``) and v1 at library
  level (``encode_arrays`` + ``seal``, ``open_sealed`` + ``decode_arrays``);
* the same payload as a model (the digest is part of the work: hashed on seal, checked on
  open), and the cost of joining v2's per-chunk parts into one ``bytes``;
* the envelope record through Flower's protobuf encoding, as every message carries it: the
  chunks as a list of ``bytes`` (before 2026-12-02) and joined into one ``bytes`` (now; the
  join included), and for reference the plaintext update as the ``ArrayRecord`` plain Flower
  sends;
* one global model to ``--sites`` sites per round: v1 encodes and encrypts it per site; v2
  encodes and hashes it once, encrypts it once and wraps a 32-byte key per site.

A first, untimed pass warms the process up (its first large allocations and glibc's mmap
threshold cost several times more; printed apart). Prints wall-clock and CPU (user + system,
all threads: what ``openssl speed`` reports by default) min / median / max GB/s, seconds for
the round, and the ratios. Run:
``python -m benchmarks crypto [--mb 100] [--sites 20] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

MB = 1_000_000


def openssl_aes_gcm(elapsed: bool) -> float | None:
    """GB/s of ``openssl speed -evp aes-256-gcm`` on 1 MiB blocks (None without openssl).

    openssl counts user CPU time by default (so its figure holds on a loaded machine);
    ``elapsed`` asks for wall-clock time instead (``-elapsed``)."""
    cmd = ["openssl", "speed", *(["-elapsed"] if elapsed else []), "-seconds", "1", "-evp",
           "aes-256-gcm", "-bytes", "1048576"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        m = re.match(r"\s*AES-256-GCM\s+([\d.]+)k\s*$", line, re.IGNORECASE)
        if m:
            return float(m.group(1)) * 1000 / 1e9
    return None


def aesgcm_chunks(nbytes: int) -> tuple[float, float]:
    """(wall, CPU) seconds of cryptography's AESGCM over 1 MiB chunks into a warm buffer."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    chunk = 1 << 20
    data = memoryview(np.random.default_rng(0).bytes(chunk))
    out = bytearray(chunk + 16)
    aead = AESGCM(AESGCM.generate_key(256))

    def run() -> None:
        for i in range(max(1, nbytes // chunk)):
            aead.encrypt_into(i.to_bytes(12, "big"), data, None, out)

    wall, cpu, _ = timed(run)
    scale = nbytes / (max(1, nbytes // chunk) * chunk)
    return wall * scale, cpu * scale


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of the whole process: user + system, every thread)."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def make_update(nbytes: int) -> OrderedDict[str, np.ndarray]:
    """A float32 'update' of about ``nbytes``: a few large layers and some small ones."""
    rng = np.random.default_rng(7)
    n = nbytes // 4
    sizes = [n * 4 // 10, n * 3 // 10, n * 2 // 10]
    sizes.append(n - sum(sizes) - 3 * 1000)
    arrays = OrderedDict((f"layer{i}.weight", rng.standard_normal(s, dtype=np.float32) * 0.01)
                         for i, s in enumerate(sizes))
    for i in range(3):
        arrays[f"layer{i}.bias"] = rng.standard_normal(1000, dtype=np.float32) * 0.01
    return arrays


Times = dict[str, list[tuple[float, float]]]  # path -> [(wall s, CPU s)] per repeat


def _encoded(record: object) -> bytes:
    """A record as Flower's protobuf encodes it in a message (what the wire carries)."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(RecordDict({"cleanroom.envelope": record})).SerializeToString()


def run(mb: int, sites: int, repeats: int) -> tuple[int, Times]:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.app import ArrayRecord, ConfigRecord

    from cleanroom.protocol import envelope as env
    from cleanroom.protocol import flower
    from cleanroom.protocol.arrays import (
        arrays_digest,
        decode_arrays,
        encode_arrays,
        encode_arrays_view,
    )

    update = make_update(mb * MB)
    size = encode_arrays_view(update).nbytes
    digest = arrays_digest(update)
    coordinator, site_key = env.KeyPair.generate(), ed25519.Ed25519PrivateKey.generate()
    upd_ctx = env.EnvelopeContext("update", "bench", 1, "site0", digest)
    model_ctx = env.EnvelopeContext("model", "bench", 1, "site0", digest)
    site_keys = [env.KeyPair.generate() for _ in range(sites)]
    site_ctx = [env.EnvelopeContext("model", "bench", 1, f"site{i}", digest)
                for i in range(sites)]
    up = [env.Recipient(coordinator.public_bytes, upd_ctx)]
    metrics = {"num-examples": 1000, "loss": 0.5}
    times: Times = {}
    reusable: np.ndarray | None = None

    def measure(name: str, fn: Callable[[], object]) -> object:
        wall, cpu, result = timed(fn)
        times.setdefault(name, []).append((wall, cpu))
        return result

    for repeat in range(repeats + 1):  # pass 0 warms the process up and is reported apart
        if repeat == 1:
            cold = {name: pairs.pop() for name, pairs in times.items()}
            times.clear()
            times["_cold"] = [cold["v2 seal update"], cold["v2 open update"],
                              cold["v1 encode_arrays + seal"],
                              cold["v1 open_sealed + decode_arrays"]]
        cpu_rate, wall_rate = openssl_aes_gcm(False), openssl_aes_gcm(True)
        chunks_wall, chunks_cpu = aesgcm_chunks(size)
        times.setdefault("openssl aes-256-gcm", []).append(
            (size / wall_rate / 1e9 if wall_rate else chunks_wall,
             size / cpu_rate / 1e9 if cpu_rate else chunks_cpu))
        times.setdefault("AESGCM 1 MiB chunks (python)", []).append((chunks_wall, chunks_cpu))
        # --- v2, site -> coordinator update (signed, metrics inside)
        for workers, tag in ((env.stream.DEFAULT_WORKERS, ""), (1, ", 1 thread")):
            sealed = measure(f"v2 seal update{tag}", lambda w=workers: env.seal_arrays_envelope(
                update, up, metadata=metrics, signer=site_key, workers=w))
            opened = measure(f"v2 open update{tag}", lambda s=sealed, w=workers:
                             env.open_arrays_envelope(
                                 s.parts, s.wrapped_keys[0], coordinator, upd_ctx,
                                 expected_signer=site_key.public_key(), workers=w))
            assert np.array_equal(opened.arrays["layer2.bias"], update["layer2.bias"])
        del opened
        if reusable is None:  # kept from one repeat to the next, as a daemon would
            reusable = env.stream.aligned_empty(env.envelope_plaintext_size(sealed.parts))
        measure("v2 open update, reused out buffer", lambda s=sealed, o=reusable:
                env.open_arrays_envelope(s.parts, s.wrapped_keys[0], coordinator, upd_ctx,
                                         expected_signer=site_key.public_key(), out=o))
        measure("v2 join parts into one bytes", lambda s=sealed: s.to_bytes())
        # --- the envelope record through Flower's protobuf encoding (every message pays it)
        measure("wire: record as a chunk list", lambda s=sealed: _encoded(
            ConfigRecord({"parts": list(s.parts)})))
        measure("wire: record as one bytes (+ join)", lambda s=sealed: _encoded(
            ConfigRecord({"payload": b"".join(s.parts)})))
        plain_record = flower.numpy_to_arrays(update)
        measure("wire: plain ArrayRecord (reference)", lambda r=plain_record: _encoded(r))
        del plain_record
        del sealed
        # --- v2 as a model: the digest is part of the work (hashed on seal, checked on open)
        sealed = measure("v2 seal model (+ SHA-256)", lambda: env.seal_arrays_envelope(
            encode_arrays_view(update), [env.Recipient(site_keys[0].public_bytes,
                                                       model_ctx)]))
        measure("v2 open model (+ SHA-256)", lambda s=sealed: env.open_arrays_envelope(
            s.parts, s.wrapped_keys[0], site_keys[0], model_ctx))
        del sealed
        # --- v1: the library calls the first envelope made (its Flower adapter is gone)
        ct = measure("v1 encode_arrays + seal", lambda: env.seal(
            encode_arrays(update), coordinator.public_bytes, upd_ctx))
        measure("v1 open_sealed + decode_arrays", lambda c=ct: decode_arrays(
            env.open_sealed(c, coordinator, upd_ctx)))
        del ct
        # --- one global model to N sites (coordinator side)
        record_in = flower.numpy_to_arrays(update)

        def v1_round(rec: ArrayRecord = record_in) -> None:
            model = flower.arrays_to_numpy(rec)
            d = arrays_digest(model)
            for kp, c in zip(site_keys, site_ctx, strict=True):
                ctx = env.EnvelopeContext("model", c.run_id, c.round, c.site, d)
                env.seal(encode_arrays(model), kp.public_bytes, ctx)  # per site, as v1 did

        def v2_round(rec: ArrayRecord = record_in) -> None:
            encoded = encode_arrays_view(flower.arrays_to_numpy(rec))
            _ = encoded.digest  # the challenge carries it before the model is sent
            env.seal_arrays_envelope(encoded, [env.Recipient(kp.public_bytes, c)
                                               for kp, c in zip(site_keys, site_ctx,
                                                                strict=True)])

        measure(f"v1 model to {sites} sites", v1_round)
        measure(f"v2 model to {sites} sites", v2_round)
        del record_in
    return size, times


def main(argv: list[str] | None = None) -> int:
    from cleanroom.protocol.stream import DEFAULT_WORKERS

    parser = argparse.ArgumentParser(prog="python -m benchmarks crypto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="update / model size in MB")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    size, times = run(args.mb, args.sites, args.repeats)
    cold = [f"{size / w / 1e9:.2f}/{size / c / 1e9:.2f}" for w, c in times.pop("_cold")]

    def stats(values: list[float]) -> str:
        return f"{min(values):7.3f} {statistics.median(values):7.3f} {max(values):7.3f}"

    print(f"payload {size / MB:.1f} MB float32, {args.repeats} repeats interleaved, v2 threads "
          f"{DEFAULT_WORKERS}; CPU = user + system time of the process (all threads), the "
          "measure openssl speed reports by default")
    print(f"{'path':34s} {'wall GB/s min/median/max':>24s}   {'CPU GB/s min/median/max':>23s}")
    for name, pairs in times.items():
        if "sites" in name:
            continue
        wall = [size / w / 1e9 for w, _ in pairs]
        cpu = [size / c / 1e9 for _, c in pairs]
        print(f"{name:34s} {stats(wall)}   {stats(cpu)}")
    print(f"\n{'one model to ' + str(args.sites) + ' sites':34s} "
          f"{'wall s min/median/max':>24s}   {'CPU s min/median/max':>23s}")
    for name, pairs in times.items():
        if "sites" in name:
            print(f"{name:34s} {stats([w for w, _ in pairs])}   {stats([c for _, c in pairs])}")

    def med(name: str, which: int) -> float:
        return statistics.median(p[which] for p in times[name])

    base = "openssl aes-256-gcm"

    def ratios(label: str, seal: str, open_: str) -> None:
        cells = []
        for which in (1, 0):  # CPU, wall
            ref = med(base, which)
            cells.append(f"{ref / med(seal, which):5.2f} {ref / med(open_, which):5.2f} "
                         f"{2 * ref / (med(seal, which) + med(open_, which)):5.2f}")
        print(f"{label:34s} {cells[0]:>17s}   {cells[1]:>17s}")

    print("\nthroughput / openssl (medians)    CPU: seal  open  both   wall: seal  open  both"
          "\n(both = 2 x size / (seal + open time); wall against openssl speed -elapsed)")
    ratios("v2 update", "v2 seal update", "v2 open update")
    ratios("v2 update, 1 thread", "v2 seal update, 1 thread", "v2 open update, 1 thread")
    ratios("v2 model (+ SHA-256)", "v2 seal model (+ SHA-256)", "v2 open model (+ SHA-256)")
    ratios("v1 library", "v1 encode_arrays + seal", "v1 open_sealed + decode_arrays")
    print("\nspeed-up of v2 (median time of v1 / v2)   CPU: seal  open     wall: seal  open")
    for label, v1s, v1o in (("against v1 library", "v1 encode_arrays + seal",
                             "v1 open_sealed + decode_arrays"),):
        cells = [f"{med(v1s, w) / med('v2 seal update', w):6.2f} "
                 f"{med(v1o, w) / med('v2 open update', w):6.2f}" for w in (1, 0)]
        print(f"{label:42s} {cells[0]:>13s}   {cells[1]:>13s}")
    v1r, v2r = f"v1 model to {args.sites} sites", f"v2 model to {args.sites} sites"
    print(f"one model to {args.sites} sites: v2 takes {med(v1r, 1) / med(v2r, 1):.1f}x less "
          f"CPU and {med(v1r, 0) / med(v2r, 0):.1f}x less wall time than v1 per round")
    print(f"warm-up pass (a fresh process's first calls, not in the figures above), GB/s "
          f"wall/CPU: v2 seal {cold[0]}, open {cold[1]}; v1 library seal {cold[2]}, "
          f"open {cold[3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
