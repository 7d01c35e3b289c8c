"""Secure aggregation cost: time per stage and bytes per site, for 4 to 1000 sites.

Runs whole rounds in one process (every site's state machine and the aggregator's, messages
through their wire encoding) and prints one table: per stage, the mean CPU time of one site
(sites run in parallel in a deployment) and the aggregator's CPU time; bytes one site sends
and receives over the round, next to the plain update (4 bytes per float32 parameter); then
Shamir cost per secret, ours next to Flower's (pycryptodome), at the same (shares, threshold).
Run: ``python -m benchmarks secagg [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from cleanroom.protocol import secagg as sa
from cleanroom.protocol import secagg_primitives as prim
from cleanroom.protocol import secagg_wire as w

STAGES = ("share-keys", "masked-input", "consistency", "unmask")


def _size(message: Any) -> int:
    if isinstance(message, w.MaskedInput):
        header, vector = w.masked_input_parts(message)
        return len(header) + len(vector)
    return len(w.encode(message))


def run_round(n: int, d: int, *, drop_before: int = 0, drop_after: int = 0,
              neighbours: int | None = None, seed: int = 0) -> dict[str, Any]:
    """One round; ``drop_before`` sites go silent after sharing keys, ``drop_after`` after
    sending their masked input. Returns timings (s) and byte counts."""
    names = [f"site-{i:04d}" for i in range(n)]
    policy = sa.SitePolicy(min_neighbours=neighbours)
    sites = {s: sa.SiteSecAgg(s, "bench", 1, policy=policy) for s in names}
    params = sa.make_params("bench", 1, n_sites=n, vector_length=d, clip=1.0, max_weight=100,
                            neighbours=neighbours)
    rng = np.random.default_rng(seed)
    update = rng.uniform(-1, 1, d).astype(np.float32)  # one update for all: compute, not data
    site_time: dict[str, float] = defaultdict(float)
    agg_time: dict[str, float] = defaultdict(float)
    sent: dict[str, int] = defaultdict(int)
    received: dict[str, int] = defaultdict(int)

    def timed(bucket: dict[str, float], stage: str, fn: Callable[[], Any]) -> Any:
        start = time.process_time()  # CPU time: stable on a shared machine
        out = fn()
        bucket[stage] += time.process_time() - start
        return out

    agg = timed(agg_time, "share-keys", lambda: sa.AggregatorSecAgg(
        params, [sites[s].advertisement.roster_entry(s) for s in names]))
    request = timed(agg_time, "share-keys", agg.share_keys_request)
    request_size = _size(request)
    for s in names:
        received[s] += request_size
        reply = timed(site_time, "share-keys", lambda s=s: sites[s].share_keys(request))
        sent[s] += _size(reply)
        timed(agg_time, "share-keys", lambda r=reply: agg.receive_share_keys(r))
    requests = timed(agg_time, "masked-input", agg.masked_input_requests)
    gone_before = set(names[1:1 + drop_before])
    gone_after = set(names[1 + drop_before:1 + drop_before + drop_after])
    for s, r in requests.items():
        received[s] += _size(r)
        if s in gone_before:
            continue
        reply = timed(site_time, "masked-input",
                      lambda s=s, r=r: sites[s].masked_input(r, update, 7))
        sent[s] += _size(reply)
        timed(agg_time, "masked-input", lambda m=reply: agg.receive_masked_input(m))
    requests = timed(agg_time, "consistency", agg.consistency_requests)
    for s, r in requests.items():
        received[s] += _size(r)
        if s in gone_after:
            continue
        reply = timed(site_time, "consistency", lambda s=s, r=r: sites[s].consistency(r))
        sent[s] += _size(reply)
        timed(agg_time, "consistency", lambda m=reply: agg.receive_consistency(m))
    requests = timed(agg_time, "unmask", agg.unmask_requests)
    for s, r in requests.items():
        received[s] += _size(r)
        reply = timed(site_time, "unmask", lambda s=s, r=r: sites[s].unmask(r))
        sent[s] += _size(reply)
        timed(agg_time, "unmask", lambda m=reply: agg.receive_unmask(m))
    result = timed(agg_time, "unmask", agg.result)
    survivors = n - drop_before
    want = 7 * survivors * update.astype(np.float64)
    error = float(np.abs(result.weighted_sum - want).max())
    assert error <= sa.quantization_error_bound(params, result.total_weight), error
    active = [s for s in names if s not in gone_before | gone_after]
    return {"params": params, "site": {k: v / n for k, v in site_time.items()},
            "agg": dict(agg_time), "sent": max(sent[s] for s in active),
            "received": max(received[s] for s in active), "error": error}


def shamir_costs(cases: list[tuple[int, int]], repeat: int) -> list[tuple[int, int, float,
                                                                          float, float | None,
                                                                          float | None]]:
    """(shares, threshold, ours split ms, ours combine ms, Flower split ms, Flower combine ms)."""
    try:
        from flwr.common.secure_aggregation.crypto import shamir as flower
    except ImportError:  # pragma: no cover - flwr is a dependency
        flower = None
    out = []
    for n, t in cases:
        secret = os.urandom(32)
        xs = list(range(1, n + 1))
        start = time.process_time()
        for _ in range(repeat):
            shares = prim.split_secret(secret, t, xs)
        ours_split = (time.process_time() - start) / repeat
        start = time.process_time()
        for i in range(repeat):
            prim._lagrange_at_zero.cache_clear()
            assert prim.combine_shares(dict(list(shares.items())[i % 2:]), t) == secret
        ours_combine = (time.process_time() - start) / repeat
        fl_split = fl_combine = None
        if flower is not None:
            start = time.process_time()
            fshares = flower.create_shares(secret, t, n)
            fl_split = time.process_time() - start
            start = time.process_time()
            assert flower.combine_shares(fshares[:t]) == secret
            fl_combine = time.process_time() - start
        out.append((n, t, ours_split * 1e3, ours_combine * 1e3,
                    None if fl_split is None else fl_split * 1e3,
                    None if fl_combine is None else fl_combine * 1e3))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks secagg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="skip the 1000-site and 1M-parameter rounds")
    args = parser.parse_args(argv)
    cases = [(4, 10_000, 0, 0), (4, 10_000, 0, 1), (20, 10_000, 0, 0), (20, 10_000, 2, 4),
             (100, 10_000, 0, 0), (100, 10_000, 10, 10)]
    if not args.quick:
        cases += [(1000, 10_000, 0, 0), (1000, 10_000, 50, 50), (4, 1_000_000, 0, 0),
                  (20, 1_000_000, 0, 0), (20, 1_000_000, 2, 4)]
    head = (f"{'sites':>5s} {'params':>9s} {'k':>4s} {'t':>4s} {'drop b/a':>8s} {'bits':>4s} | "
            + " ".join(f"{s[:11]:>11s}" for s in STAGES) + " | "
            + " ".join(f"{'agg ' + s[:7]:>11s}" for s in STAGES)
            + f" | {'sent/site':>10s} {'recv/site':>10s} {'plain':>9s} {'ratio':>6s}")
    run_round(4, 100)  # warm imports and caches
    print("CPU time in ms: per site = mean of one site; agg = the aggregator's")
    print(head)
    print("-" * len(head))
    for n, d, before, after in cases:
        r = run_round(n, d, drop_before=before, drop_after=after)
        p = r["params"]
        plain = 4 * d
        print(f"{n:5d} {d:9,d} {p.neighbours:4d} {p.threshold:4d} {f'{before}/{after}':>8s} "
              f"{p.mod_bits:4d} | "
              + " ".join(f"{r['site'].get(s, 0) * 1e3:11.1f}" for s in STAGES) + " | "
              + " ".join(f"{r['agg'].get(s, 0) * 1e3:11.1f}" for s in STAGES)
              + f" | {r['sent'] / 1e3:8.1f}kB {r['received'] / 1e3:8.1f}kB "
              f"{plain / 1e3:7.1f}kB {r['sent'] / plain:6.2f}", flush=True)
    print("drop b/a = sites silent after sharing keys / after sending their masked input; "
          "ratio = bytes one site sends / its plain float32 update")
    print()
    print(f"{'Shamir (32-byte secret)':24s} {'ours split':>11s} {'ours comb.':>11s} "
          f"{'Flower split':>13s} {'Flower comb.':>13s}  (ms per secret)")
    for n, t, os_, oc, fs, fc in shamir_costs([(4, 3), (20, 14), (117, 79)],
                                              repeat=5 if args.quick else 20):
        fs_text = f"{fs:13.2f}" if fs is not None else f"{'n/a':>13s}"
        fc_text = f"{fc:13.2f}" if fc is not None else f"{'n/a':>13s}"
        print(f"{f'{n} shares, t={t}':24s} {os_:11.2f} {oc:11.2f} {fs_text} {fc_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
