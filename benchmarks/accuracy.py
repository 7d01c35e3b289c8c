"""Client-average test accuracy of the full confidential pipeline on Fed-Heart-Disease.

Every number comes from real ``cleanroom simulate`` runs (attested, HPKE-encrypted, Opacus
DP-SGD with each site's own RDP accountant): mean ± std over seeds, without DP and with DP at
the default epsilon, then the epsilon/accuracy curve. Also writes ``accuracy_curve.png``.
FLamby references: FedAvg 0.685, FedAdam 0.726, FedYogi 0.731, pooled 0.735.
Run: ``python -m benchmarks accuracy [--seeds 5] [--strategy NAME] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

EPSILONS = (0.5, 1.0, 2.0, 5.0, 8.0)


def simulate(out: Path, *, dp: bool, epsilon: float, seed: int, strategy: str) -> dict[str, Any]:
    from cleanroom.simulations.defaults import training_defaults
    from cleanroom.simulations.engine import SimulationConfig, run_simulation

    values: dict[str, Any] = dict(training_defaults(dp=dp))
    values.update(dp=dp, epsilon=epsilon, seed=seed, strategy=strategy, tracking=False,
                  progress=False, out=out)
    return run_simulation(SimulationConfig(**values)).report


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="python -m benchmarks accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategy", default=None, help="default: the simulation default")
    parser.add_argument("--epsilons", default=",".join(str(e) for e in EPSILONS))
    parser.add_argument("--out", type=Path, default=None, help="where to write the plot")
    args = parser.parse_args(argv)
    from cleanroom.simulations.engine import SimulationConfig

    strategy = args.strategy or SimulationConfig().strategy
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    tmp = Path(tempfile.mkdtemp(prefix="bench-acc-"))
    settings = [("no DP", False, 1.0)] + [(f"DP eps={e:g}", True, e) for e in epsilons]
    results: dict[str, list[float]] = {}
    spent: dict[str, list[float]] = {}
    bar = tqdm(total=len(settings) * args.seeds, desc="simulations", unit="run")
    for label, dp, eps in settings:
        for seed in range(args.seeds):
            report = simulate(tmp / f"{label.replace(' ', '_')}-{seed}", dp=dp, epsilon=eps,
                              seed=seed, strategy=strategy)
            results.setdefault(label, []).append(report["final"]["accuracy_mean"])
            eps_values = [e for e in report["final"]["epsilon"].values() if e is not None]
            if eps_values:
                spent.setdefault(label, []).append(max(eps_values))
            bar.update(1)
    bar.close()
    print(f"strategy {strategy}, {args.seeds} seeds, client-average test accuracy "
          "(FLamby: FedAvg 0.685, FedAdam 0.726, FedYogi 0.731, pooled 0.735)")
    print(f"{'setting':14s} {'mean':>7s} {'std':>7s} {'min':>7s} {'max':>7s} "
          f"{'max eps spent':>14s}")
    for label, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        eps_text = f"{max(spent[label]):.4f}" if label in spent else "-"
        print(f"{label:14s} {statistics.mean(values):7.4f} {std:7.4f} {min(values):7.4f} "
              f"{max(values):7.4f} {eps_text:>14s}")
    out = args.out or Path("runs") / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, epsilons, out / "accuracy_curve.png")
    print(f"plot: {out / 'accuracy_curve.png'}")
    return 0


def _plot(results: dict[str, list[float]], epsilons: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [statistics.mean(results[f"DP eps={e:g}"]) for e in epsilons]
    stds = [statistics.stdev(results[f"DP eps={e:g}"]) if len(results[f"DP eps={e:g}"]) > 1
            else 0.0 for e in epsilons]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(epsilons, means, yerr=stds, marker="o", capsize=3, label="DP (mean ± std)")
    ax.axhline(statistics.mean(results["no DP"]), color="gray", ls="--", label="no DP")
    ax.axhline(0.735, color="green", ls=":", label="FLamby pooled 0.735")
    ax.set_xscale("log")
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel("epsilon per site for the whole run (delta 1e-5)")
    ax.set_title(f"Fed-Heart-Disease, {len(results['no DP'])} seeds", fontsize=10)
    ax.set_ylabel("client-average test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
