"""The site's trainer alone: ``train_task`` (the guarded trainer of a confidential round) vs
the plain Opacus DP-SGD of ``python -m benchmarks rounds``'s plain side, same model, rows,
sampling, clip and noise, one round of local steps per site.

No transport, no coordinator: what the trainer's own checks cost against Opacus. Per repeat
every site trains once in each mode (alternating which goes first); the ratio is the sum of
the guarded trainer's times over the plain ones (wall, and the process's CPU time beside
it). Printed: min / median / max over repeats.

Run: ``python -m benchmarks trainer [--task synthetic-1m] [--sites 20] [--sample-rate 0.1]
[--repeats 3] [--threads N]``.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Any

from benchmarks import spread


def _timed(fn: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="synthetic-1m")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from benchmarks import plainflower
    from cleanroom.models import get_parameters
    from cleanroom.site_agent.datasets import frames_to_task_data
    from cleanroom.site_agent.trainer import train_task
    from cleanroom.site_agent.training import TrainSettings
    from cleanroom.task import load_task

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_task(args.task)
    task = loaded.task
    guarded = TrainSettings(local_steps=args.local_steps, sample_rate=args.sample_rate,
                            lr=0.3, optimizer="sgd", momentum=0.0, max_grad_norm=1.0,
                            noise_multiplier=1.0)
    plain = plainflower.PlainSettings(rounds=1, local_steps=args.local_steps,
                                      sample_rate=args.sample_rate, lr=0.3, max_grad_norm=1.0,
                                      noise_multiplier=1.0)
    sites = [frames_to_task_data(task, *task.simulate(i, args.sites))  # type: ignore[misc]
             for i in range(args.sites)]
    torch.manual_seed(0)
    start = get_parameters(task.model())

    def run_plain(i: int, seed: int) -> None:
        model = task.model()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()})
        d = sites[i]
        plainflower.opacus_train(task, model, np.ascontiguousarray(d.train_x, np.float32),
                                 np.ascontiguousarray(d.train_y, np.float32), plain, seed)

    def run_guarded(i: int, seed: int) -> None:
        train_task(loaded, start, sites[i], guarded, seed=seed)

    run_plain(0, 0)  # imports, caches
    run_guarded(0, 0)
    out: dict[str, list[float]] = {"plain": [], "guarded": [], "wall": [], "cpu": []}
    for rep in range(args.repeats):
        tot = {"plain": [0.0, 0.0], "guarded": [0.0, 0.0]}
        for i in range(args.sites):
            modes = [("plain", run_plain), ("guarded", run_guarded)]
            for mode, fn in (modes if (rep + i) % 2 == 0 else modes[::-1]):
                wall, cpu = _timed(partial(fn, i, rep * 1000 + i))
                tot[mode][0] += wall
                tot[mode][1] += cpu
        out["plain"].append(tot["plain"][0] / args.sites)
        out["guarded"].append(tot["guarded"][0] / args.sites)
        out["wall"].append(tot["guarded"][0] / tot["plain"][0])
        out["cpu"].append(tot["guarded"][1] / tot["plain"][1])

    print(f"{args.task}, {args.sites} sites, sampling {args.sample_rate}, {args.local_steps} "
          f"local step(s), {args.repeats} repeats; min / median / max over repeats")
    print("| plain Opacus s/site | guarded trainer s/site | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|")
    print(f"| {spread(out['plain'], '{:.3f}')} | {spread(out['guarded'], '{:.3f}')} | "
          f"{spread(out['wall'], '{:.2f}')} | {spread(out['cpu'], '{:.2f}')} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
