"""Trust both ways, side by side (issue 13, item 5): what mutual attestation, secure
aggregation and central DP cost per round, on the wire, and in utility.

Four protocols, each a ``cleanroom simulate`` of the same task, seed and site DP budget:

* (a) ``base``: today's protocol before issue 13 (``--no-aggregator``: the coordinator's own
  process opens each update);
* (b) ``mutual``: + the attested aggregator enclave every site verifies (the default);
* (c) ``secagg``: + secure aggregation (three more message round trips per round);
* (d) ``central``: + central DP inside the aggregator (``--central-epsilon``; sites clip
  their deltas to ``--central-clip`` and weigh 1).

Per protocol and site count: the median round wall time (rounds 2..R, so start-up is left
out), bytes on the wire per round (everything the coordinator sent and received: challenges,
evidence, sealed models, updates, secagg messages), the final client-average metric of the
task, and its ratio to (a). Repeats alternate the protocol order; printed are min / median /
max over repeats. The ``sites`` option picks the cases: 4 = the built-in heart-disease task
(its four hospitals), 20 = the built-in synthetic task with 20 sites.

Run: ``python -m benchmarks trust [--sites 4,20] [--rounds 5] [--repeats 3]
[--central-epsilon 8] [--central-clip 0.5]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import spread

PROTOCOLS = ("base", "mutual", "secagg", "central")
LABELS = {"base": "(a) before issue 13", "mutual": "(b) + mutual attestation",
          "secagg": "(c) + secure aggregation", "central": "(d) + central DP"}


def _config(protocol: str, sites: int, rounds: int, seed: int, out: Path,
            central_epsilon: float, central_clip: float) -> Any:
    from cleanroom.simulations.engine import SimulationConfig

    task = "heart-disease" if sites == 4 else "synthetic"
    values: dict[str, Any] = {
        "task": task, "sites": None if task == "heart-disease" else sites, "rounds": rounds,
        "strategy": "fedavg", "seed": seed, "out": out, "tracking": False, "progress": False,
        "aggregator": protocol != "base", "secure_aggregation": protocol in ("secagg", "central"),
    }
    if protocol == "central":
        values.update(central_epsilon=central_epsilon, central_clip=central_clip)
    return SimulationConfig(**values)


def run_once(protocol: str, sites: int, rounds: int, seed: int, central_epsilon: float,
             central_clip: float) -> dict[str, float]:
    from cleanroom.simulations.engine import run_simulation

    with tempfile.TemporaryDirectory(prefix=f"bench-trust-{protocol}-") as tmp:
        ends: list[float] = []
        result = run_simulation(_config(protocol, sites, rounds, seed, Path(tmp) / "out",
                                        central_epsilon, central_clip),
                                on_round=lambda _entry: ends.append(time.perf_counter()))
        report = result.report
    entries = report["rounds"]
    laps = [b - a for a, b in itertools.pairwise(ends)] or [result.seconds]
    metric = (report["task"].get("metrics") or ["accuracy"])[0]
    wire = [e["bytes_sent"] + e["bytes_received"] for e in entries]
    return {"round_s": statistics.median(laps), "bytes": statistics.median(wire),
            "metric": float(report["final"].get(metric) or float("nan")),
            "central_epsilon": report["final"].get("central_epsilon") or float("nan"),
            "aggregated": statistics.mean(len(e["aggregated"]) for e in entries)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks trust",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="4,20", help="site counts (4: heart-disease, "
                        "else the synthetic task)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--central-epsilon", type=float, default=8.0)
    parser.add_argument("--central-clip", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.sites.split(",") if x.strip()]
    raw: dict[str, dict[str, list[dict[str, float]]]] = {}
    for n in counts:
        raw[str(n)] = {p: [] for p in PROTOCOLS}
        for repeat in range(args.repeats):
            order = PROTOCOLS if repeat % 2 == 0 else tuple(reversed(PROTOCOLS))
            for protocol in order:
                raw[str(n)][protocol].append(run_once(
                    protocol, n, args.rounds, repeat, args.central_epsilon, args.central_clip))
                print(f"  {n} sites, repeat {repeat + 1}, {protocol}: "
                      f"{raw[str(n)][protocol][-1]}", flush=True)
    header = (f"{'sites':>5} {'protocol':<26} {'round s (min/med/max)':>24} "
              f"{'x (a)':>6} {'bytes/round':>12} {'x (a)':>6} {'metric':>18} {'vs (a)':>7} "
              f"{'central eps':>11}")
    print("\n" + header + "\n" + "-" * len(header))
    for n in counts:
        base = raw[str(n)]["base"]
        base_s = statistics.median(r["round_s"] for r in base)
        base_b = statistics.median(r["bytes"] for r in base)
        base_m = statistics.median(r["metric"] for r in base)
        for protocol in PROTOCOLS:
            rows = raw[str(n)][protocol]
            secs = [r["round_s"] for r in rows]
            wire = statistics.median(r["bytes"] for r in rows)
            metric = [r["metric"] for r in rows]
            central = statistics.median(r["central_epsilon"] for r in rows)
            print(f"{n:>5} {LABELS[protocol]:<26} {spread(secs, '{:.3g}'):>24} "
                  f"{statistics.median(secs) / base_s:>6.2f} {wire / 1e3:>10.1f}kB "
                  f"{wire / base_b:>6.2f} {spread(metric, '{:.3g}'):>18} "
                  f"{statistics.median(metric) - base_m:>+7.3f} "
                  f"{'-' if central != central else f'{central:.2f}':>11}")
    print(f"metric = final client-average of the task's first metric; site DP epsilon 1.0 "
          f"each; central: epsilon {args.central_epsilon}, clip {args.central_clip}, "
          f"user level; {args.repeats} repeats, protocol order alternating")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
