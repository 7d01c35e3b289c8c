"""Tuning and measurement of the Fed-TCGA-BRCA example with the site's trusted trainer.

A plain federated loop (no attestation, no encryption: those do not change the numbers): each
of FLamby's 6 regions registers its data in its own data room (the simulated path:
``DataRoom.register_simulated``), is served the task's fields only, trains with
``train_task`` (the site's DP-SGD when ``--epsilon`` is set) and evaluates with
``evaluate_task``; the server averages the updates weighted by training rows (FedAvg) and
applies them with FedAdam (Flower's update rule: no bias correction, ``tau``). Reported: the
client-average test C-index (the mean of the 6 regions' C-indices, FLamby's "client average")
per seed, and its mean and standard deviation over the seeds.

    python examples/fed_tcga_brca/tune.py                  # the chosen plans: no DP, and ε = 1
    python examples/fed_tcga_brca/tune.py --curve --plot docs/img/tcga_epsilon.png
    python examples/fed_tcga_brca/tune.py --grid            # the no-DP hyper-parameter grid
    python examples/fed_tcga_brca/tune.py --epsilon inf 1 --strategy fedavg --lr 1 ...
"""

from __future__ import annotations

import argparse
import itertools
import math
import secrets
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleanroom.site_agent.datasets import DataRoom, TaskData
from cleanroom.site_agent.trainer import evaluate_task, train_task
from cleanroom.site_agent.training import TrainSettings, calibrate_noise, epsilon_spent
from cleanroom.task import LoadedTask, load_task

HERE = Path(__file__).resolve().parent
N_SITES = 6
DELTA = 1e-5
SEEDS = (0, 1, 2, 3, 4)
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
METRIC = "c_index"


@dataclass(frozen=True)
class Plan:
    """What a coordinator's plan would carry (the task carries none of it)."""

    rounds: int = 30
    local_steps: int = 5
    lr: float = 0.1
    optimizer: str = "sgd"
    server_lr: float = 0.05
    strategy: str = "fedadam"   # fedadam | fedavg
    sample_rate: float = 1.0    # full batch without DP
    dp_sample_rate: float = 1.0
    max_grad_norm: float = 1.0

    def settings(self, epsilon: float) -> TrainSettings:
        dp = math.isfinite(epsilon)
        rate = self.dp_sample_rate if dp else self.sample_rate
        sigma = calibrate_noise(epsilon, DELTA, rate, self.rounds * self.local_steps) if dp \
            else None
        return TrainSettings(local_steps=self.local_steps, sample_rate=rate, lr=self.lr,
                             optimizer=self.optimizer, momentum=0.0,
                             max_grad_norm=self.max_grad_norm, noise_multiplier=sigma)


def load_sites(loaded: LoadedTask, root: Path) -> list[TaskData]:
    """Each region registers its simulated data in its own room and is served the task."""
    sites = []
    for k in range(N_SITES):
        room = DataRoom(root / f"site{k}", secrets.token_bytes(32))
        record = room.register_simulated(loaded.task, k, N_SITES)
        assert "pid" in record.identifying, "the identifier scan must flag the barcode"
        sites.append(room.serve(loaded.task))
    return sites


def run(loaded: LoadedTask, sites: Sequence[TaskData], plan: Plan, epsilon: float,
        seed: int) -> tuple[float, list[float], float]:
    """Client-average test C-index after ``plan.rounds`` rounds; per-site values; the epsilon
    each site spent (recomputed from the charges the trainer returned)."""
    import torch

    from cleanroom.models import get_parameters

    torch.manual_seed(seed)
    params = OrderedDict((k, v.astype(np.float64))
                         for k, v in get_parameters(loaded.task.model()).items())
    settings = plan.settings(epsilon)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    charges: list[list[tuple[float, float, int]]] = [[] for _ in sites]
    for rnd in range(plan.rounds):
        start = OrderedDict((k, v.astype(np.float32)) for k, v in params.items())
        updates, weights = [], []
        for i, data in enumerate(sites):
            res = train_task(loaded, start, data, settings,
                             seed=(seed * 1_000_003 + rnd * 101 + i) % (2**31))
            if res.noise_multiplier is not None:
                charges[i].append((res.noise_multiplier, res.sample_rate, res.steps))
            updates.append(res.parameters)
            weights.append(res.num_examples)
        total = float(sum(weights))
        for k in params:
            avg = sum(w * u[k].astype(np.float64) for w, u in zip(weights, updates,
                                                                  strict=True)) / total
            delta = avg - params[k]
            if plan.strategy == "fedavg":
                params[k] = avg
            else:  # Flower's FedAdam
                m[k] = 0.9 * m[k] + 0.1 * delta
                v2[k] = 0.99 * v2[k] + 0.01 * delta * delta
                params[k] = params[k] + plan.server_lr * m[k] / (np.sqrt(v2[k]) + 1e-9)
    final = OrderedDict((k, v.astype(np.float32)) for k, v in params.items())
    per_site = [evaluate_task(loaded, final, data)[METRIC] for data in sites]
    spent = max((epsilon_spent(c, DELTA) for c in charges), default=math.inf) if \
        math.isfinite(epsilon) else math.inf
    return float(np.nanmean(per_site)), per_site, spent


def measure(loaded: LoadedTask, sites: Sequence[TaskData], plan: Plan, epsilon: float,
            seeds: Sequence[int]) -> tuple[float, float, list[float], float]:
    scores, spent = [], 0.0
    for seed in seeds:
        score, _, eps = run(loaded, sites, plan, epsilon, seed)
        scores.append(score)
        spent = max(spent, eps)
    sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return statistics.mean(scores), sd, scores, spent


def _fmt_eps(epsilon: float) -> str:
    return "inf (no DP)" if not math.isfinite(epsilon) else f"{epsilon:g}"


NO_DP_PLAN = Plan(rounds=50, local_steps=5, lr=0.03, optimizer="sgd", server_lr=0.1,
                  strategy="fedadam")
"""Chosen on the no-DP grid (docs/benchmarks.md): FedAdam, full batch."""
DP_PLAN = Plan(rounds=10, local_steps=1, lr=2.0, optimizer="sgd", strategy="fedavg",
               dp_sample_rate=1.0, max_grad_norm=1.0)
"""Chosen at epsilon = 1: few full-batch DP steps (T = 10), FedAvg (FedAdam's normalisation
amplifies the noise)."""
LONG_DP_PLAN = Plan(rounds=50, local_steps=1, lr=1.0, optimizer="sgd", strategy="fedavg",
                    dp_sample_rate=1.0, max_grad_norm=1.0)
"""The same with 5x the steps (T = 50): better without noise, more noise per step under DP."""


def _table_header(seeds: Sequence[int]) -> None:
    print("| plan | ε per site (δ = 1e-5) | noise multiplier | ε spent (recomputed) | "
          f"client-avg C-index, seeds {','.join(map(str, seeds))} | per seed | seconds |")
    print("|---|---|---|---|---|---|---|")


def _row(name: str, loaded: LoadedTask, sites: Sequence[TaskData], plan: Plan, epsilon: float,
         seeds: Sequence[int]) -> tuple[float, float]:
    t0 = time.perf_counter()
    mean, sd, scores, spent = measure(loaded, sites, plan, epsilon, seeds)
    sigma = plan.settings(epsilon).noise_multiplier
    print(f"| {name} | {_fmt_eps(epsilon)} | {'-' if sigma is None else f'{sigma:.2f}'} | "
          f"{'-' if not math.isfinite(spent) else f'{spent:.3f}'} | {mean:.3f} ± {sd:.3f} | "
          f"{', '.join(f'{s:.3f}' for s in scores)} | {time.perf_counter() - t0:.0f} |",
          flush=True)
    return mean, sd


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="store_true", help="search the no-DP grid")
    p.add_argument("--curve", action="store_true", help="the epsilon / C-index curve (DP plan)")
    p.add_argument("--plot", type=Path, help="write the curve as a PNG")
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--epsilon", type=float, nargs="*", help="measure a custom plan (the "
                   "options below) at these epsilons ('inf': no DP)")
    p.add_argument("--rounds", type=int, default=Plan.rounds)
    p.add_argument("--local-steps", type=int, default=Plan.local_steps)
    p.add_argument("--lr", type=float, default=Plan.lr)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=Plan.optimizer)
    p.add_argument("--server-lr", type=float, default=Plan.server_lr)
    p.add_argument("--strategy", choices=["fedadam", "fedavg"], default=Plan.strategy)
    p.add_argument("--dp-sample-rate", type=float, default=Plan.dp_sample_rate)
    p.add_argument("--max-grad-norm", type=float, default=Plan.max_grad_norm)
    args = p.parse_args(argv)
    loaded = load_task(HERE)
    with tempfile.TemporaryDirectory() as tmp:
        sites = load_sites(loaded, Path(tmp))
        print(f"task {loaded.name} digest {loaded.digest[:16]}; sites (train/test rows): "
              + ", ".join(f"{d.n_train}/{d.n_test}" for d in sites))
        if args.grid:
            print("| strategy | local lr | local steps | server lr | rounds | client-avg C-index |")
            print("|---|---|---|---|---|---|")
            grid = [("fedadam", lr, steps, server_lr, rounds)
                    for lr, steps, server_lr, rounds in itertools.product(
                        [0.03, 0.1], [1, 5], [0.05, 0.1], [30, 50])]
            grid += [("fedavg", lr, steps, 0.0, rounds)
                     for lr, steps, rounds in itertools.product([0.3, 1.0], [1, 10], [30, 50])]
            for strategy, lr, steps, server_lr, rounds in grid:
                trial = Plan(rounds=rounds, local_steps=steps, lr=lr, server_lr=server_lr,
                             strategy=strategy)
                mean, sd, _, _ = measure(loaded, sites, trial, math.inf, args.seeds)
                print(f"| {strategy} | {lr:g} | {steps} | "
                      f"{server_lr if strategy == 'fedadam' else '-'} | {rounds} | "
                      f"{mean:.3f} ± {sd:.3f} |", flush=True)
            return 0
        if args.epsilon:
            plan = Plan(rounds=args.rounds, local_steps=args.local_steps, lr=args.lr,
                        optimizer=args.optimizer, server_lr=args.server_lr,
                        strategy=args.strategy, dp_sample_rate=args.dp_sample_rate,
                        max_grad_norm=args.max_grad_norm)
            print(f"custom: {plan}")
            _table_header(args.seeds)
            for epsilon in args.epsilon:
                _row("custom", loaded, sites, plan, epsilon, args.seeds)
            return 0
        print(f"no-DP plan: {NO_DP_PLAN}\nDP plan: {DP_PLAN}")
        _table_header(args.seeds)
        if not args.curve:
            _row("no-DP plan", loaded, sites, NO_DP_PLAN, math.inf, args.seeds)
            _row("DP plan", loaded, sites, DP_PLAN, 1.0, args.seeds)
            return 0
        curves = {name: [(epsilon, *_row(name, loaded, sites, plan, epsilon, args.seeds))
                         for epsilon in EPSILONS]
                  for name, plan in (("DP plan (T = 10)", DP_PLAN),
                                     ("long DP plan (T = 50)", LONG_DP_PLAN))}
        if args.plot:
            plot(curves, args.plot)
            print(f"plot: {args.plot}")
    return 0


def plot(curves: dict[str, list[tuple[float, float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs: list[float] = []
    for name, curve in curves.items():
        finite = [(e, m, s) for e, m, s in curve if math.isfinite(e)]
        xs = [e for e, _, _ in finite]
        line = ax.errorbar(xs, [m for _, m, _ in finite], yerr=[s for _, _, s in finite],
                           marker="o", capsize=3, label=f"{name}, DP-SGD at each site")
        nodp = [m for e, m, _ in curve if not math.isfinite(e)]
        if nodp:
            ax.axhline(nodp[0], color=line[0].get_color(), linestyle="--", alpha=0.6,
                       label=f"{name} without noise ({nodp[0]:.3f})")
    ax.axhline(0.831, color="black", linestyle="-.", alpha=0.6,
               label="no-DP plan, FedAdam (0.831)")
    ax.axhline(0.815, color="tab:red", linestyle=":", label="FLamby FedAdam, Cox, no DP (0.815)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("ε per site for the whole run (δ = 1e-5)")
    ax.set_ylabel("client-average test C-index (5 seeds)")
    ax.set_title("Fed-TCGA-BRCA, 6 regions, linear Weibull PH risk score")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
