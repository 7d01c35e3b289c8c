"""Simulated sites at scale: ``cleanroom simulate`` with 100 and 1000 sites, and 100 sites of
a 1M-parameter model, each in a fresh process: wall time, CPU time and peak resident memory.

Goals (issue 14): 1000 sites x 3 rounds of the built-in ``synthetic`` task in < 5 minutes;
100 sites x a 1M-parameter model under 1.5 GB peak RSS. The load of the machine while each
case ran is printed beside it (CPU time / wall time shows how much of the machine the run had).

Run: ``python -m benchmarks scale [--cases 100,1000,100x1m] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (task, sites, rounds, extra options, goal seconds, goal peak bytes)
CASES: dict[str, tuple[str, int, int, tuple[str, ...], float | None, int | None]] = {
    "100": ("synthetic", 100, 3, (), None, None),
    "1000": ("synthetic", 1000, 3, (), 300.0, None),
    "100x1m": ("synthetic-1m", 100, 2, ("--sample-rate", "0.1"), None, 1536 * 2**20),
}
MB = 2**20


def run(task: str, sites: int, rounds: int, extra: tuple[str, ...],
        out: Path) -> tuple[float, float, int, float]:
    """(wall s, CPU s, peak RSS bytes, load average) of one ``cleanroom simulate``."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "cleanroom", "simulate", "--task", task,
                                 "--sites", str(sites), "--rounds", str(rounds), "--out",
                                 str(out), "--no-tracking", "--no-progress", *extra],
                                stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"simulate failed ({proc.returncode}), see {log}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"cleanroom simulate (confidential, DP, FedAdam), {args.repeats} repeat(s), "
          "min / median / max when repeated; CPU time and peak RSS of the simulate process")
    print("| case | task | sites x rounds | wall s | CPU s | peak RSS | goal | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [c for c in args.cases.split(",") if c]:
        task, sites, rounds, extra, goal_s, goal_rss = CASES[name]
        walls, cpus, peaks, loads = [], [], [], []
        for rep in range(args.repeats):
            wall, cpu, peak, load = run(task, sites, rounds, extra, tmp / f"{name}-{rep}")
            walls.append(wall)
            cpus.append(cpu)
            peaks.append(peak)
            loads.append(load)
        wall_s = " / ".join(f"{v:.0f}" for v in (min(walls), statistics.median(walls),
                                                   max(walls))) if len(walls) > 1 else \
            f"{walls[0]:.0f}"
        goal = "-"
        if goal_s is not None:
            goal = f"< {goal_s:.0f} s: {'met' if max(walls) < goal_s else 'NOT met'}"
        if goal_rss is not None:
            goal = f"< {goal_rss / MB:.0f} MB: {'met' if max(peaks) < goal_rss else 'NOT met'}"
        print(f"| {name} | {task} | {sites} x {rounds} | {wall_s} | "
              f"{statistics.median(cpus):.0f} | {max(peaks) / MB:.0f} MB | {goal} | "
              f"{statistics.median(loads):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
