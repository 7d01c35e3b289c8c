"""Wall time of a 4-site round: confidential vs the same Flower run without attestation and
encryption (same strategy, same DP training, same engine), as a ratio measured in one run.

Both modes record every round's wall time (train + evaluate); round 1 (site start-up) is left
out, and confidential and plain runs alternate so that machine noise hits both alike. Reported:
mean and median per mode, and the ratio of each.
Run: ``python -m benchmarks rounds [--rounds R] [--repeats K] [--backend inprocess|ray]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run_once(confidential: bool, rounds: int, backend: str, out: Path) -> tuple[float, Any]:
    from cleanroom.simulations.defaults import training_defaults
    from cleanroom.simulations.engine import SimulationConfig, run_simulation

    values: dict[str, Any] = dict(training_defaults(dp=True))
    values.update(rounds=rounds, confidential=confidential, tracking=False, progress=False,
                  backend=backend, out=out)
    config = SimulationConfig(**values)
    start = time.perf_counter()
    result = run_simulation(config)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rounds-"))
    per_round: dict[bool, list[float]] = {True: [], False: []}
    breakdown: list[dict[str, float]] = []
    run_once(True, 1, args.backend, tmp / "warm-c")  # imports, calibration caches
    run_once(False, 1, args.backend, tmp / "warm-p")
    for rep in range(args.repeats):
        for confidential in ((True, False) if rep % 2 == 0 else (False, True)):
            tag = f"{'c' if confidential else 'p'}{rep}"
            _, result = run_once(confidential, args.rounds, args.backend, tmp / tag)
            rounds = result.report["rounds"][1:]  # round 1 pays one-off site start-up
            per_round[confidential].extend(r["seconds"] for r in rounds)
            if confidential:
                breakdown.extend({
                    "attestation": r["attestation_seconds"], "verify": r["verify_seconds"],
                    "bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"],
                } for r in rounds)
    print(f"backend {args.backend}, 4 sites, {args.rounds} rounds x {args.repeats} repeats per "
          "mode (alternating), wall time of rounds 2..R (train + evaluate)")
    print(f"{'mode':34s} {'mean s':>9s} {'median':>9s} {'p25':>8s} {'p75':>8s}")
    for label, values in (("plain Flower (no attestation/HPKE)", per_round[False]),
                          ("confidential (attested + HPKE)", per_round[True])):
        q = statistics.quantiles(values, n=4)
        print(f"{label:34s} {statistics.mean(values):9.4f} {statistics.median(values):9.4f} "
              f"{q[0]:8.4f} {q[2]:8.4f}")
    mean_ratio = statistics.mean(per_round[True]) / statistics.mean(per_round[False])
    median_ratio = statistics.median(per_round[True]) / statistics.median(per_round[False])
    print(f"{'ratio confidential / plain':34s} {mean_ratio:9.3f} {median_ratio:9.3f}")
    if args.backend == "ray":
        print("(Flower's simulation runtime delivers replies on a ~0.1 s polling grid, so "
              "round times are bimodal; the ratio of means is the stable figure)")
    b = {k: statistics.mean(x[k] for x in breakdown) for k in breakdown[0]}
    print(f"in a confidential round: attestation round trip {b['attestation']:.4f} s "
          f"(evidence verification {b['verify']:.4f} s for 4 sites), "
          f"{b['bytes_sent']:.0f} B sent / {b['bytes_received']:.0f} B received by the "
          "coordinator in challenges, evidence and envelopes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
