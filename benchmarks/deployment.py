"""Round wall time on Flower's deployment engine (``cleanroom deploy-local``: SuperLink,
SuperNodes, TLS, node auth, one process per message) vs the same run in the simulation.

Runs ``cleanroom deploy-local --sites N --rounds R`` as a subprocess (its own report.json gives
each round's time and its attestation part), then ``cleanroom simulate`` with the same training
settings on the in-process engine, and prints one table with the ratio. Where a deployed round's
time goes: every Flower message (train, evaluate + next round's attestation) starts a ClientApp
process on each SuperNode, which waits for the SuperNode's poll and imports our code; see
docs/benchmarks.md. Heart-disease has 4 sites; N < 4 runs the first N in deployment only.
Run: ``python -m benchmarks deployment [--sites 4] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _deploy(out: Path, sites: int, rounds: int) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cleanroom", "deploy-local",
                           "--sites", str(sites), "--rounds", str(rounds), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"deploy-local failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}\nlogs: {out / 'logs'}")
    return seconds, json.loads((out / "report.json").read_text())


def _simulate(out: Path, rounds: int) -> tuple[float, dict[str, Any]]:
    from cleanroom.simulations.defaults import training_defaults
    from cleanroom.simulations.engine import SimulationConfig, run_simulation

    values: dict[str, Any] = dict(training_defaults(dp=True))
    values.update(rounds=rounds, tracking=False, progress=False, out=out)
    start = time.perf_counter()
    result = run_simulation(SimulationConfig(**values))
    return time.perf_counter() - start, result.report


def _rows(report: dict[str, Any]) -> tuple[float, float, list[float]]:
    later = report["rounds"][1:] or report["rounds"]  # round 1 also pays site start-up
    seconds = [r["seconds"] for r in later]
    attest = [r["attestation_seconds"] for r in later]
    return statistics.median(seconds), statistics.median(attest), \
        [r["seconds"] for r in report["rounds"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks deployment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 pays start-up and is reported apart)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    deploy_total, deployed = _deploy(tmp / "deploy", args.sites, args.rounds)
    sim_total, simulated = _simulate(tmp / "sim", args.rounds)
    d_round, d_attest, d_all = _rows(deployed)
    s_round, s_attest, s_all = _rows(simulated)
    messages = 2  # per round: train; evaluate carrying the next round's attestation
    print(f"{args.sites} site(s) deployed (deploy-local) vs 4 sites simulated (in-process), "
          f"{args.rounds} rounds, DP defaults; median of rounds 2..R")
    print(f"{'':28s} {'deploy-local':>13s} {'simulation':>11s} {'ratio':>8s}")
    print(f"{'s/round':28s} {d_round:13.3f} {s_round:11.4f} {d_round / s_round:8.0f}")
    print(f"{'  of which attestation':28s} {d_attest:13.3f} {s_attest:11.4f}")
    print(f"{'s/message (round / 2)':28s} {d_round / messages:13.3f} "
          f"{s_round / messages:11.4f}")
    print(f"{'round 1 (start-up)':28s} {d_all[0]:13.3f} {s_all[0]:11.4f}")
    print(f"{'whole command, s':28s} {deploy_total:13.1f} {sim_total:11.1f}")
    print(f"every round, deploy-local: {', '.join(f'{s:.1f}' for s in d_all)} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
