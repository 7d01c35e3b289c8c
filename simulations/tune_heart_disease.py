"""Hyper-parameter study of federated DP training on FLamby's Fed-Heart-Disease (4 sites).

A pure in-process federated loop, no Flower runtime: every round each site runs
:func:`site_agent.training.train_local` from the current global model, and the server update is
a numpy re-implementation of Flower's ``flwr.serverapp.strategy`` rules (same defaults):

* ``fedavg``: average of the site models weighted by their number of training examples;
* ``fedprox``: FedAvg on the server, proximal term ``mu/2 ||w - w_global||^2`` on the sites;
* ``fedadam``: ``delta = avg - w``; ``m = b1 m + (1-b1) delta``; ``v = b2 v + (1-b2) delta^2``;
  ``w += eta * sqrt(1-b2^(t+1)) / (1-b1^(t+1)) * m / (sqrt(v) + tau)`` (t = server round,
  from 1); defaults eta=0.1, b1=0.9, b2=0.99, tau=1e-3;
* ``fedyogi``: as FedAdam but ``v = v - (1-b2) delta^2 sign(v - delta^2)`` and no bias
  correction, ``w += eta * m / (sqrt(v) + tau)``; defaults eta=0.01, b1=0.9, b2=0.99,
  tau=1e-3.

Metric (FLamby's): the unweighted mean over the 4 sites of each site's test accuracy of the
final global model, averaged over seeds. With DP every site calibrates its own noise multiplier
for the whole run with ``calibrate_noise(epsilon, delta, sample_rate, rounds * local_steps)``
and the epsilon its own accountant reports after the run is checked to be <= epsilon.

Usage::

    python -m cleanroom.simulations.tune_heart_disease            # default grid (a few minutes)
    python -m cleanroom.simulations.tune_heart_disease --quick    # a small grid (under a minute)

The script prints tables only (aggregate accuracies); it never prints or writes a data row.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from cleanroom.models import build_model, get_parameters
from cleanroom.site_agent.data import HEART_DISEASE_SITES, SiteData, load_heart_disease_site
from cleanroom.site_agent.training import (
    TrainSettings,
    calibrate_noise,
    epsilon_spent,
    evaluate,
    train_local,
)

log = logging.getLogger(__name__)

DELTA = 1e-5
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi")
FLAMBY_REFERENCE = {"fedavg": 0.685, "fedadam": 0.726, "fedyogi": 0.731, "pooled": 0.735}

# Flower's defaults (flwr.serverapp.strategy, flwr 1.41).
FLOWER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedprox": {"proximal_mu": 0.0},
    "fedadam": {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
}

Arrays = OrderedDict[str, np.ndarray]


@dataclass(frozen=True)
class Config:
    """One point of the grid."""

    strategy: str = "fedavg"
    model: str = "logreg"
    rounds: int = 5
    local_steps: int = 10
    sample_rate: float = 1.0
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    eta: float | None = None  # server lr (FedAdam/FedYogi); None = Flower's default
    proximal_mu: float = 0.0

    def label(self) -> str:
        parts = [self.strategy, self.model, f"R{self.rounds}", f"S{self.local_steps}",
                 f"q{self.sample_rate:g}", f"{self.optimizer}{self.lr:g}",
                 f"C{self.max_grad_norm:g}"]
        if self.momentum:
            parts.append(f"m{self.momentum:g}")
        if self.eta is not None:
            parts.append(f"eta{self.eta:g}")
        if self.proximal_mu:
            parts.append(f"mu{self.proximal_mu:g}")
        return " ".join(parts)


# --------------------------------------------------------------------------- server strategies


class ServerStrategy:
    """numpy version of a Flower strategy's ``aggregate_train`` (the arrays part)."""

    def __init__(self, name: str, eta: float | None = None) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}")
        self.name = name
        opts = dict(FLOWER_DEFAULTS[name])
        if eta is not None:
            opts["eta"] = eta
        self.eta = float(opts.get("eta", 0.0))
        self.beta_1 = float(opts.get("beta_1", 0.0))
        self.beta_2 = float(opts.get("beta_2", 0.0))
        self.tau = float(opts.get("tau", 0.0))
        self.m_t: dict[str, np.ndarray] | None = None
        self.v_t: dict[str, np.ndarray] | None = None

    def aggregate(self, server_round: int, current: Arrays,
                  replies: Sequence[tuple[Arrays, int]]) -> Arrays:
        total = float(sum(n for _, n in replies))
        avg: dict[str, np.ndarray] = {}
        for arrays, n in replies:  # aggregate_arrayrecords: weights n / total
            for k, v in arrays.items():
                avg[k] = avg[k] + v * (n / total) if k in avg else v * (n / total)
        if self.name in ("fedavg", "fedprox"):
            return OrderedDict((k, avg[k].astype(np.float32)) for k in current)
        delta = {k: avg[k] - current[k] for k in current}
        if not self.m_t:
            self.m_t = {k: np.zeros_like(v) for k, v in avg.items()}
        self.m_t = {k: self.beta_1 * v + (1 - self.beta_1) * delta[k]
                    for k, v in self.m_t.items()}
        if not self.v_t:
            self.v_t = {k: np.zeros_like(v) for k, v in avg.items()}
        if self.name == "fedadam":
            self.v_t = {k: self.beta_2 * v + (1 - self.beta_2) * (delta[k] ** 2)
                        for k, v in self.v_t.items()}
            eta = (self.eta * math.sqrt(1 - self.beta_2 ** (server_round + 1.0))
                   / (1 - self.beta_1 ** (server_round + 1.0)))
        else:  # fedyogi
            self.v_t = {k: v - (1.0 - self.beta_2) * (delta[k] ** 2)
                        * np.sign(v - delta[k] ** 2) for k, v in self.v_t.items()}
            eta = self.eta
        m_t, v_t = self.m_t, self.v_t
        return OrderedDict((k, (x + eta * m_t[k] / (np.sqrt(v_t[k]) + self.tau))
                            .astype(np.float32)) for k, x in current.items())


# --------------------------------------------------------------------------- federation


@lru_cache(maxsize=1)
def load_sites() -> tuple[SiteData, ...]:
    return tuple(load_heart_disease_site(s) for s in HEART_DISEASE_SITES)


@lru_cache(maxsize=4096)
def noise_for(epsilon: float, sample_rate: float, steps: int) -> float:
    return calibrate_noise(epsilon, DELTA, sample_rate, steps)


@lru_cache(maxsize=4096)
def _spent(history: tuple[tuple[float, float, int], ...]) -> float:
    return epsilon_spent(history, DELTA)


@dataclass(frozen=True)
class RunResult:
    accuracy: float  # client-average test accuracy of the final global model
    site_accuracy: tuple[float, ...]
    epsilon: float | None  # largest epsilon spent by a site (None without DP)


def run_federation(cfg: Config, seed: int, epsilon: float | None) -> RunResult:
    """One federated run; ``epsilon=None`` trains without DP."""
    sites = load_sites()
    total_steps = cfg.rounds * cfg.local_steps
    sigma = None if epsilon is None else noise_for(epsilon, cfg.sample_rate, total_steps)
    settings = TrainSettings(local_steps=cfg.local_steps, sample_rate=cfg.sample_rate,
                             lr=cfg.lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                             max_grad_norm=cfg.max_grad_norm, noise_multiplier=sigma,
                             proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0)
    server = ServerStrategy(cfg.strategy, cfg.eta)
    current = get_parameters(build_model(cfg.model, seed=seed))
    ledgers: list[list[tuple[float, float, int]]] = [[] for _ in sites]
    for rnd in range(1, cfg.rounds + 1):
        replies: list[tuple[Arrays, int]] = []
        for i, data in enumerate(sites):
            res = train_local(cfg.model, current, data, settings,
                              seed=seed * 1_000_003 + rnd * 101 + i)
            if res.noise_multiplier is not None:
                ledgers[i].append((res.noise_multiplier, res.sample_rate, res.steps))
            replies.append((res.parameters, res.num_examples))
        current = server.aggregate(rnd, current, replies)
    accs = tuple(evaluate(cfg.model, current, d.test_x, d.test_y)[1] for d in sites)
    eps = None
    if epsilon is not None:
        eps = max(_spent(tuple(h)) for h in ledgers)
        if eps > epsilon + 1e-9:
            raise RuntimeError(f"{cfg.label()}: a site spent epsilon {eps:.4f} > {epsilon}")
    return RunResult(float(np.mean(accs)), accs, eps)


@dataclass(frozen=True)
class Score:
    cfg: Config
    epsilon: float | None
    mean: float
    std: float
    per_seed: tuple[float, ...]
    site_mean: tuple[float, ...]
    eps_spent: float | None


def score(cfg: Config, epsilon: float | None, seeds: Sequence[int] = SEEDS) -> Score:
    runs = [run_federation(cfg, s, epsilon) for s in seeds]
    accs = tuple(r.accuracy for r in runs)
    site_mean = tuple(float(np.mean([r.site_accuracy[i] for r in runs]))
                      for i in range(len(HEART_DISEASE_SITES)))
    spent = [r.epsilon for r in runs if r.epsilon is not None]
    return Score(cfg, epsilon, float(np.mean(accs)),
                 float(statistics.stdev(accs)) if len(accs) > 1 else 0.0, accs, site_mean,
                 max(spent) if spent else None)


# --------------------------------------------------------------------------- grids

DEFAULT_CONFIG = Config(strategy="fedadam", model="logreg", rounds=5, local_steps=1,
                        sample_rate=1.0, lr=0.3, optimizer="sgd", momentum=0.0,
                        max_grad_norm=0.5, eta=0.3)
"""The chosen defaults (docs/dp-tuning.md): FedAdam with server lr 0.3 (Flower's other
defaults), 5 rounds of one full-batch DP-SGD step each; good with and without DP."""

DEFAULT_SERVER_ETA: dict[str, float | None] = {"fedavg": None, "fedprox": None,
                                               "fedadam": 0.3, "fedyogi": 0.1}
"""Recommended server learning rate per strategy for the default schedule (None: no server
lr / Flower's default)."""


def _grid(base: Config, **axes: Iterable[object]) -> list[Config]:
    keys = list(axes)
    return [replace(base, **dict(zip(keys, values, strict=True)))
            for values in itertools.product(*(list(axes[k]) for k in keys))]


def _strategy_variants(quick: bool) -> list[Config]:
    """Server side: each strategy with Flower's defaults plus a few server learning rates."""
    if quick:
        return [Config(strategy="fedavg"), Config(strategy="fedprox", proximal_mu=0.1),
                Config(strategy="fedadam", eta=0.3), Config(strategy="fedyogi", eta=0.1)]
    return ([Config(strategy="fedavg")]
            + [Config(strategy="fedprox", proximal_mu=mu) for mu in (0.1, 1.0)]
            + [Config(strategy="fedadam", eta=eta) for eta in (None, 0.3)]
            + [Config(strategy="fedyogi", eta=eta) for eta in (None, 0.03, 0.1)])


def default_grid(quick: bool, dp: bool) -> list[Config]:
    """The searched configurations.

    Full-batch (q=1) local SGD for every strategy variant, model, schedule (rounds x local
    steps), client learning rate and (DP only) clipping norm, plus a side grid of Poisson
    sub-sampling (q<1) and local Adam around FedAvg/FedAdam.
    """
    if quick:
        schedules: tuple[tuple[int, int], ...] = ((5, 1), (5, 5))
        models: tuple[str, ...] = ("logreg",)
        lrs: tuple[float, ...] = (0.3,)
        clips: tuple[float, ...] = (1.0,)
    else:
        schedules = ((3, 1), (5, 1), (10, 1), (20, 1), (5, 5), (10, 5))
        if not dp:
            schedules += ((10, 10),)
        models = ("logreg", "mlp")
        lrs = (0.3, 1.0)
        clips = (0.5, 1.0) if dp else (1.0,)
    out: list[Config] = []
    for variant in _strategy_variants(quick):
        for model, (rounds, steps), lr, clip in itertools.product(models, schedules, lrs, clips):
            if variant.strategy == "fedprox" and steps == 1:
                continue  # the proximal term has no effect on a single local step
            out.append(replace(variant, model=model, rounds=rounds, local_steps=steps, lr=lr,
                               max_grad_norm=clip))
    if not quick:  # sub-sampled batches and a local Adam optimiser
        for strategy in ("fedavg", "fedadam"):
            out += _grid(Config(strategy=strategy, max_grad_norm=1.0), sample_rate=(0.1, 0.5),
                         rounds=(5, 10), local_steps=(5, 10), lr=(0.3, 1.0))
            out += _grid(Config(strategy=strategy, optimizer="adam", max_grad_norm=1.0),
                         sample_rate=(0.5, 1.0), rounds=(5,), local_steps=(5,),
                         lr=(0.01, 0.03))
    return out


# --------------------------------------------------------------------------- execution


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)


def score_all(jobs: Sequence[tuple[Config, float | None, tuple[int, ...]]],
              workers: int) -> list[Score]:
    """``score`` of every job, on ``workers`` processes (results in job order)."""
    if workers <= 1:
        return [score(c, e, s) for c, e, s in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                             initializer=_init_worker) as pool:
        futures = [pool.submit(score, c, e, s) for c, e, s in jobs]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- report


def _fmt(s: Score) -> str:
    eps = "∞ (no DP)" if s.epsilon is None else f"{s.epsilon:g}"
    spent = "-" if s.eps_spent is None else f"{s.eps_spent:.3f}"
    sites = " / ".join(f"{a:.3f}" for a in s.site_mean)
    return f"| {s.cfg.label()} | {eps} | {spent} | {s.mean:.3f} ± {s.std:.3f} | {sites} |"


HEADER = ("| config | ε target | ε spent (max over sites) | client-avg test acc (mean ± std) "
          "| per-site acc (clev / hung / swit / va) |\n|---|---|---|---|---|")


def print_table(title: str, scores: Sequence[Score], out: list[str], note: str = "") -> None:
    lines = [f"\n### {title}\n", *([note, ""] if note else []), HEADER,
             *(_fmt(s) for s in scores)]
    out.extend(lines)
    print("\n".join(lines), flush=True)


def best_by(scores: Sequence[Score], key: Callable[[Config], object]) -> list[Score]:
    """The best score for each value of ``key(config)``, in first-seen order of the keys."""
    best: dict[object, Score] = {}
    for s in scores:
        k = key(s.cfg)
        cur = best.get(k)
        if cur is None or (s.mean, -s.std) > (cur.mean, -cur.std):
            best[k] = s
    return list(best.values())


def best_per_strategy(scores: Sequence[Score]) -> list[Score]:
    by = {s.cfg.strategy: s for s in best_by(scores, lambda c: c.strategy)}
    return [by[k] for k in STRATEGIES if k in by]


LEGEND = ("Config: strategy, model, R rounds, S local steps per round, q Poisson sampling "
          "rate, local optimiser and lr, C clipping norm (DP only), eta server lr "
          "(FedAdam/FedYogi; absent = Flower's default), mu FedProx proximal weight.")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run from the repository root with "
                                "'python -m cleanroom.simulations.tune_heart_disease'.")
    p.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    p.add_argument("--epsilon", type=float, default=1.0,
                   help="per-site budget of the DP search (default 1)")
    p.add_argument("--curve", default="0.5,1,2,5,8", help="epsilons of the ε/accuracy curve")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1 (default 5)")
    p.add_argument("--holdout-seeds", type=int, default=10,
                   help="extra seeds N..N+K-1 to re-check the chosen defaults (default 10)")
    p.add_argument("--top", type=int, default=10, help="rows of each ranked table")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default 2)")
    p.add_argument("--output", help="also write the tables (markdown) to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _init_worker()
    seeds = tuple(range(args.seeds))
    holdout = tuple(range(args.seeds, args.seeds + args.holdout_seeds))
    curve_eps = [float(e) for e in args.curve.split(",") if e.strip()]
    out: list[str] = [LEGEND]
    print(LEGEND)
    started = time.perf_counter()

    modes: tuple[tuple[str, float | None], ...] = (("no DP", None),
                                                   (f"DP ε={args.epsilon:g}", args.epsilon))
    ranked: dict[str, list[Score]] = {}
    for mode, eps in modes:
        grid = default_grid(args.quick, dp=eps is not None)
        t0 = time.perf_counter()
        scores = sorted(score_all([(c, eps, seeds) for c in grid], args.workers),
                        key=lambda s: (-s.mean, s.std))
        ranked[mode] = scores
        print_table(f"{mode}: top {args.top} of {len(grid)} configs, seeds 0..{args.seeds - 1} "
                    f"({time.perf_counter() - t0:.0f} s)", scores[:args.top], out)
        print_table(f"{mode}: best config per strategy", best_per_strategy(scores), out)
        print_table(f"{mode}: best config per model and local optimiser",
                    best_by(scores, lambda c: (c.model, c.optimizer)), out)
        print_table(f"{mode}: best config per Poisson sampling rate q and schedule",
                    sorted(best_by(scores, lambda c: (c.sample_rate, c.rounds * c.local_steps)),
                           key=lambda s: (s.cfg.sample_rate, s.cfg.rounds * s.cfg.local_steps)),
                    out)

    default = DEFAULT_CONFIG
    per_strategy = [replace(default, strategy=s, eta=DEFAULT_SERVER_ETA[s])
                    for s in STRATEGIES if s != "fedprox"]
    jobs = [(c, e, seeds) for e in (None, args.epsilon) for c in per_strategy]
    jobs += [(default, e, holdout) for e in (None, args.epsilon)] if holdout else []
    best_dp = ranked[modes[1][0]][0].cfg
    jobs += [(c, e, seeds) for c in (best_dp, default) for e in (*curve_eps, None)]
    results = score_all(jobs, args.workers)
    n = len(per_strategy)
    print_table("chosen defaults under each strategy (server lr: DEFAULT_SERVER_ETA)",
                results[:2 * n], out)
    rest = results[2 * n:]
    if holdout:
        print_table(f"chosen defaults on held-out seeds {holdout[0]}..{holdout[-1]}", rest[:2],
                    out)
        rest = rest[2:]
    k = len(curve_eps) + 1
    for title, cfg, scores in (("best DP config of the search", best_dp, rest[:k]),
                               ("chosen defaults", default, rest[k:2 * k])):
        steps = cfg.rounds * cfg.local_steps
        sigmas = ", ".join(f"ε={e:g}: σ={noise_for(e, cfg.sample_rate, steps):.2f}"  # noqa: RUF001
                           for e in curve_eps)
        print_table(f"ε/accuracy curve, {title} ({cfg.label()}), δ={DELTA:g}", scores, out,
                    note=f"Noise multipliers for {steps} steps at q={cfg.sample_rate:g}: {sigmas}")
    elapsed = f"\ntotal time: {time.perf_counter() - started:.0f} s ({args.workers} workers)"
    out.append(elapsed)
    print(elapsed)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
