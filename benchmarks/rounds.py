"""Round wall time: the confidential round vs PLAIN FLOWER doing the same training.

The plain side (:mod:`benchmarks.plainflower`) is a plain Flower ClientApp training the same
model on the same rows with Opacus DP-SGD (same sampling, steps, clip, noise multiplier) and
Flower's FedAdam with the same options, in float32, with no cleanroom code; the confidential
side is ``cleanroom simulate`` (attestation every round, encrypted model and updates, sealed
ledger, audit receipts, checkpoints, report). Both run on the same in-process transport (every
message serialised to Flower's protobuf and back), the same torch threads and the same number
of site threads (default 1: sites one after another). The 1M and 10M cases sample rows at
rate 0.1 (about 20 rows per site and step; full-batch DP-SGD of a 10M-parameter model takes
about a minute per site here), which leaves less training to hide the overhead behind.

A round's time is the interval between the ends of two consecutive evaluation phases (so
round 1, which pays start-up, is left out, and the coordinator's work between rounds is in).
Each repeat runs the two modes back to back (alternating which goes first) and gives one
ratio: median confidential round / median plain round. Printed: per case, min / median / max
over the repeats of the plain and confidential round times and of the ratio.

Run: ``python -m benchmarks rounds [--cases 4x-heart,20x1m,20x10m] [--rounds 3]
[--repeats 3] [--workers 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import spread


@dataclass(frozen=True)
class Case:
    name: str
    task: str
    sites: int | None  # None: the task's own sites
    sample_rate: float | None = None  # None: the plan's


CASES = {
    "4x-heart": Case("4x-heart", "heart-disease", None),
    "20x1m": Case("20x1m", "synthetic-1m", 20, sample_rate=0.1),
    "20x10m": Case("20x10m", "synthetic-10m", 20, sample_rate=0.1),
}
GOALS = {"20x1m": 1.15, "20x10m": 1.05}  # issue 14


class RoundClock:
    """Ends of evaluation phases -> round times (rounds 2..R)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def mark(self) -> None:
        self.ends.append(time.perf_counter())

    def on_reply(self, reply: Any, done: int, total: int) -> None:
        if done == total and str(reply.metadata.message_type).startswith("evaluate"):
            self.mark()

    def rounds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]


def _config(case: Case, rounds: int, workers: int, threads: int | None, out: Path,
            confidential: bool = True) -> Any:
    from cleanroom.simulations.defaults import training_defaults
    from cleanroom.simulations.engine import SimulationConfig, load_simulation_task

    loaded = load_simulation_task(case.task)
    values: dict[str, Any] = dict(training_defaults(dp=True, plan=loaded.task.plan))
    values.update(task=case.task, sites=case.sites, rounds=rounds, confidential=confidential,
                  tracking=False, progress=False, out=out, workers=workers, threads=threads)
    if case.sample_rate is not None:
        values["sample_rate"] = case.sample_rate
    return SimulationConfig(**values)


def run_confidential(case: Case, rounds: int, workers: int, threads: int | None,
                     out: Path) -> list[float]:
    from cleanroom.simulations.engine import run_simulation

    clock = RoundClock()
    result = run_simulation(_config(case, rounds, workers, threads, out), on_reply=clock.on_reply)
    attested = [len(r["attested"]) for r in result.report["rounds"]]
    if min(attested) != max(attested) or not attested[0]:
        raise SystemExit(f"{case.name}: not every site attested every round: {attested}")
    return clock.rounds()


def run_plain(case: Case, rounds: int, threads: int | None, out: Path) -> list[float]:
    import torch

    from benchmarks import plainflower
    from cleanroom.simulations.engine import load_simulation_task, site_names, torch_threads

    config = _config(case, rounds, 1, threads, out, confidential=False)
    loaded = load_simulation_task(case.task)
    sites = len(site_names(config, loaded))
    settings = plainflower.PlainSettings(
        rounds=rounds, local_steps=config.local_steps, sample_rate=config.sample_rate,
        lr=config.lr, max_grad_norm=config.max_grad_norm,
        noise_multiplier=plainflower.noise_multiplier(
            config.epsilon, config.delta, config.sample_rate, rounds * config.local_steps),
        eta=float(config.strategy_options.get("eta", 0.3)))
    clock = RoundClock()
    before = torch.get_num_threads()
    want = torch_threads(config, loaded)
    if want is not None:
        torch.set_num_threads(want)
    try:
        plainflower.run(loaded.task, sites, settings, on_round_end=clock.mark)
    finally:
        torch.set_num_threads(before)
    return clock.rounds()


def measure(case: Case, rounds: int, repeats: int, workers: int, threads: int | None,
            tmp: Path) -> dict[str, list[float]]:
    """Per repeat: median plain round, median confidential round, their ratio."""
    out: dict[str, list[float]] = {"plain": [], "confidential": [], "ratio": []}
    run_plain(case, 1, threads, tmp / f"{case.name}-warm-p")  # imports, caches
    run_confidential(case, 1, workers, threads, tmp / f"{case.name}-warm-c")
    for rep in range(repeats):
        times: dict[str, float] = {}
        for mode in (("plain", "confidential") if rep % 2 == 0 else ("confidential", "plain")):
            where = tmp / f"{case.name}-{mode}-{rep}"
            rounds_s = run_plain(case, rounds, threads, where) if mode == "plain" else \
                run_confidential(case, rounds, workers, threads, where)
            times[mode] = statistics.median(rounds_s)
        out["plain"].append(times["plain"])
        out["confidential"].append(times["confidential"])
        out["ratio"].append(times["confidential"] / times["plain"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2; round 1 "
                        "is not timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="threads serving sites on the "
                        "confidential side (the plain side: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both sides "
                        "(default: the simulation's choice)")
    args = parser.parse_args(argv)
    import logging

    import flwr.common.logger  # noqa: F401  (configures its logger on import: import first)

    logging.getLogger("flwr").setLevel(logging.WARNING)  # the plain run logs every step
    if args.rounds < 2:
        parser.error("--rounds must be >= 2")
    cases = [CASES[c] for c in args.cases.split(",") if c]
    tmp = Path(tempfile.mkdtemp(prefix="bench-rounds-"))
    print(f"{args.rounds} rounds per run (rounds 2..{args.rounds} timed), {args.repeats} "
          f"repeats alternating the modes, site threads {args.workers}; "
          "min / median / max over repeats")
    print("| case | plain Flower s/round | confidential s/round | ratio | goal |")
    print("|---|---|---|---|---|")
    for case in cases:
        r = measure(case, args.rounds, args.repeats, args.workers, args.threads, tmp)
        goal = GOALS.get(case.name)
        print(f"| {case.name} ({case.task}) | {spread(r['plain'])} | "
              f"{spread(r['confidential'])} | {spread(r['ratio'], '{:.2f}')} | "
              f"{f'<= {goal}' if goal else '-'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
