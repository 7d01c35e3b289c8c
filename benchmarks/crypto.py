"""Envelope throughput next to the AES-GCM limit of this machine, v2 against v1.

In one run, ``--repeats`` times, interleaved so every path sees the same machine load:

* ``openssl speed -evp aes-256-gcm -bytes 1048576`` (one core, warm buffers: the limit), or
  AESGCM over 1 MiB chunks when openssl is missing;
* a ``--mb`` MB float32 update, site -> coordinator: v2 seal (encode, encrypt once, sign) and
  open (verify, decrypt, decode into views), with the default threads and with one; v1 as the
  code calls it today (``protocol.flower.seal_arrays`` / ``open_arrays``) and v1 at library
  level (``encode_arrays`` + ``seal``, ``open_sealed`` + ``decode_arrays``);
* the same payload as a model (the digest is part of the work: hashed on seal, checked on
  open), and the cost of joining v2's per-chunk parts into one ``bytes`` (not needed when
  the parts travel as a list of bytes);
* one global model to ``--sites`` sites per round: v1 encodes and encrypts it per site; v2
  encodes and hashes it once, encrypts it once and wraps a 32-byte key per site.

Prints min / median / max GB/s (seconds for the round) and the ratios. Run:
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


def openssl_aes_gcm() -> float | None:
    """GB/s of ``openssl speed -evp aes-256-gcm`` on 1 MiB blocks (None without openssl)."""
    try:
        out = subprocess.run(["openssl", "speed", "-seconds", "1", "-evp", "aes-256-gcm",
                              "-bytes", "1048576"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        m = re.match(r"\s*AES-256-GCM\s+([\d.]+)k\s*$", line, re.IGNORECASE)
        if m:
            return float(m.group(1)) * 1000 / 1e9
    return None


def aesgcm_chunks(nbytes: int) -> float:
    """GB/s of cryptography's AESGCM over 1 MiB chunks into a warm buffer (the fallback)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    chunk = 1 << 20
    data = memoryview(np.random.default_rng(0).bytes(chunk))
    out = bytearray(chunk + 16)
    aead = AESGCM(AESGCM.generate_key(256))
    count = max(1, nbytes // chunk)
    start = time.perf_counter()
    for i in range(count):
        aead.encrypt_into(i.to_bytes(12, "big"), data, None, out)
    return count * chunk / (time.perf_counter() - start) / 1e9


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


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


def run(mb: int, sites: int, repeats: int) -> dict[str, list[float]]:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

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
    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    for _ in range(repeats):
        base = openssl_aes_gcm()
        record("openssl", size / base / 1e9 if base else float("nan"))
        record("aesgcm 1 MiB chunks", size / aesgcm_chunks(size) / 1e9)
        # --- v2, site -> coordinator update (signed, with metadata)
        for workers, tag in ((env.stream.DEFAULT_WORKERS, ""), (1, " 1 thread")):
            t, sealed = timed(lambda w=workers: env.seal_arrays_envelope(
                update, up, metadata=metrics, signer=site_key, workers=w))
            record(f"v2 seal{tag}", t)
            t, opened = timed(lambda s=sealed, w=workers: env.open_arrays_envelope(
                s.parts, s.wrapped_keys[0], coordinator, upd_ctx,
                expected_signer=site_key.public_key(), workers=w))
            record(f"v2 open{tag}", t)
            assert np.array_equal(opened.arrays["layer2.bias"], update["layer2.bias"])
        t, _ = timed(lambda s=sealed: s.to_bytes())
        record("v2 join parts to one bytes", t)
        del sealed, opened
        # --- v2 as a model: digest hashed on seal, checked on open
        t, sealed = timed(lambda: env.seal_arrays_envelope(
            encode_arrays_view(update), [env.Recipient(site_keys[0].public_bytes,
                                                       model_ctx)]))
        record("v2 seal model (+hash)", t)
        t, opened = timed(lambda s=sealed: env.open_arrays_envelope(
            s.parts, s.wrapped_keys[0], site_keys[0], model_ctx))
        record("v2 open model (+hash)", t)
        del sealed, opened
        # --- v1 today: the Flower adapter, and the library calls under it
        content = RecordDict({"arrays": flower.numpy_to_arrays(update),
                              "metrics": ConfigRecord({"num-examples": 1000})})
        t, (sealed_content, _) = timed(lambda c=content: flower.seal_arrays(
            c, coordinator.public_bytes, upd_ctx))
        record("v1 seal_arrays", t)
        t, _ = timed(lambda c=sealed_content: flower.open_arrays(c, coordinator, upd_ctx))
        record("v1 open_arrays", t)
        del content, sealed_content
        t, ct = timed(lambda: env.seal(encode_arrays(update), coordinator.public_bytes,
                                       upd_ctx))
        record("v1 encode+seal", t)
        t, _ = timed(lambda c=ct: decode_arrays(env.open_sealed(c, coordinator, upd_ctx)))
        record("v1 open_sealed+decode", t)
        del ct
        # --- one global model to N sites
        record_in = flower.numpy_to_arrays(update)

        def v1_round(rec: ArrayRecord = record_in) -> None:
            model = flower.arrays_to_numpy(rec)
            d = arrays_digest(model)
            for kp, c in zip(site_keys, site_ctx, strict=True):
                ctx = env.EnvelopeContext("model", c.run_id, c.round, c.site, d)
                flower.seal_arrays(RecordDict({"arrays": rec}), kp.public_bytes, ctx)

        def v2_round(rec: ArrayRecord = record_in) -> None:
            encoded = encode_arrays_view(flower.arrays_to_numpy(rec))
            _ = encoded.digest  # the challenge carries it before the model is sent
            env.seal_arrays_envelope(encoded, [env.Recipient(kp.public_bytes, c)
                                               for kp, c in zip(site_keys, site_ctx,
                                                                strict=True)])

        t, _ = timed(v1_round)
        record(f"v1 model to {sites} sites", t)
        t, _ = timed(v2_round)
        record(f"v2 model to {sites} sites", t)
        del record_in
    results["_size"] = [size]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks crypto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="update / model size in MB")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    res = run(args.mb, args.sites, args.repeats)
    size = res.pop("_size")[0]
    gbps = {k: sorted(size / t / 1e9 for t in v) for k, v in res.items()}

    def row(name: str, values: list[float], unit: str) -> None:
        print(f"{name:34s} {min(values):8.3f} {statistics.median(values):8.3f} "
              f"{max(values):8.3f}  {unit}")

    from cleanroom.protocol.stream import DEFAULT_WORKERS

    print(f"payload {size / MB:.1f} MB float32, {args.repeats} repeats, interleaved; "
          f"v2 threads: {DEFAULT_WORKERS}")
    print(f"{'path':34s} {'min':>8s} {'median':>8s} {'max':>8s}")
    for name, values in gbps.items():
        if "sites" not in name:
            row(name, values, "GB/s")
    for name, values in res.items():
        if "sites" in name:
            row(name, sorted(values), "s per round (coordinator)")

    def med(name: str) -> float:
        return statistics.median(res[name])

    def ratio_rows(label: str, seal: str, open_: str) -> None:
        both = 2 * med("openssl") / (med(seal) + med(open_))
        print(f"{label:34s} seal {med('openssl') / med(seal):6.2f}  open "
              f"{med('openssl') / med(open_):6.2f}  seal+open {both:6.2f}")

    print("\nratios of medians (throughput / openssl aes-256-gcm throughput; "
          "seal+open = 2 x size / (seal + open time))")
    ratio_rows("v2 / openssl", "v2 seal", "v2 open")
    ratio_rows("v2 1 thread / openssl", "v2 seal 1 thread", "v2 open 1 thread")
    ratio_rows("v2 model (+hash) / openssl", "v2 seal model (+hash)", "v2 open model (+hash)")
    ratio_rows("v1 flower / openssl", "v1 seal_arrays", "v1 open_arrays")
    print(f"{'v2 / v1 flower (speed-up)':34s} seal {med('v1 seal_arrays') / med('v2 seal'):6.2f}"
          f"  open {med('v1 open_arrays') / med('v2 open'):6.2f}")
    print(f"{'v2 / v1 library (speed-up)':34s} seal {med('v1 encode+seal') / med('v2 seal'):6.2f}"
          f"  open {med('v1 open_sealed+decode') / med('v2 open'):6.2f}")
    v1r, v2r = med(f"v1 model to {args.sites} sites"), med(f"v2 model to {args.sites} sites")
    print(f"{'model to ' + str(args.sites) + ' sites':34s} v1 {v1r:.3f} s, v2 {v2r:.3f} s: "
          f"{v1r / v2r:.1f}x less coordinator time per round")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
