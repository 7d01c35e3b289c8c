"""report.json and report.png of a federated run, built from the coordinator's round records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cleanroom.coordinator.records import RoundRecord


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _means(per_site: dict[str, dict[str, float]]) -> dict[str, float | None]:
    names = sorted({name for metrics in per_site.values() for name in metrics})
    return {name: _mean([m[name] for m in per_site.values() if m.get(name) is not None])
            for name in names}


def round_entry(record: RoundRecord, epsilon_so_far: dict[str, float | None]) -> dict[str, Any]:
    """One element of report["rounds"]; ``epsilon_so_far`` carries each site's cumulative ε.

    ``metrics``: each site's evaluation of the global model by metric name (the task's metrics
    and ``loss``); ``means``: their client averages (``accuracy_mean``/``loss_mean`` repeat
    two of them for readers of earlier reports)."""
    metrics = {site: {k: v for k, v in s.evaluation.metrics.items() if v is not None}
               for site, s in sorted(record.sites.items())
               if s.evaluation is not None and s.evaluation.metrics}
    for site, s in record.sites.items():
        if s.epsilon_run is not None:
            epsilon_so_far[site] = s.epsilon_run
        else:
            epsilon_so_far.setdefault(site, None)
    means = _means(metrics) if record.metrics_mean is None else dict(record.metrics_mean)
    return {
        "round": record.round,
        "attested": record.attested,
        "quarantined": record.quarantined,
        "aggregated": list(record.aggregated),
        "site_refusals": dict(sorted(record.site_refusals.items())),
        "evaluation_refusals": dict(sorted(record.evaluation_refusals.items())),
        "aggregator": record.aggregator,
        "secure_aggregation": record.secure_aggregation,
        "central_epsilon": record.central_epsilon,
        "metrics": metrics,
        "means": means,
        "accuracy_mean": means.get("accuracy"),
        "loss_mean": means.get("loss"),
        "epsilon": dict(sorted(epsilon_so_far.items())),
        "skipped": record.skipped,
        "sites": {site: {"admitted": s.admitted, "reason": s.reason,
                         "measurement": s.admission.get("measurement"),
                         "tcb": s.admission.get("tcb"),
                         "refusal": s.admission.get("refusal"),
                         "evidence_sha256": s.admission.get("evidence_sha256"),
                         "nonce_sha256": s.nonce_sha256,
                         "dataset_digest": s.admission.get("dataset_digest")}
                  for site, s in sorted(record.sites.items())},
        "model_digest": record.model_digest,
        "aggregate_digest": record.aggregate_digest,
        "update_norm": {site: s.update_norm for site, s in sorted(record.sites.items())
                        if s.update_norm is not None},
        "bytes_sent": record.bytes_sent,
        "bytes_received": record.bytes_received,
        "seconds": round(record.seconds, 4),
        "attestation_seconds": round(record.attestation_seconds, 4),
        "verify_seconds": round(record.verify_seconds, 4),
    }


def build_report(records: list[RoundRecord], *, prior: list[dict[str, Any]] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """``prior``: report entries of rounds run before a resume (from the checkpoint).

    ``final``: the last evaluated round's client-averaged metrics by name (``final["c_index"]``,
    ``final["accuracy"]``, ``final["loss"]``...), each site's values under ``per_site``, and
    each site's cumulative ε."""
    epsilon: dict[str, float | None] = {}
    for entry in prior or []:
        epsilon.update(entry.get("epsilon", {}))
    rounds = [*(prior or []), *(round_entry(r, epsilon) for r in records)]
    last = next((r for r in reversed(rounds) if r.get("means") or r["metrics"]), None)
    per_site = last["metrics"] if last else {}
    means = (last.get("means") or _means(per_site)) if last else {}
    central = next((r["central_epsilon"] for r in reversed(rounds)
                    if r.get("central_epsilon") is not None), None)
    report: dict[str, Any] = {
        "rounds": rounds,
        "final": {**means, "per_site": per_site, "accuracy_mean": means.get("accuracy"),
                  "epsilon": dict(sorted(epsilon.items())), "central_epsilon": central},
    }
    report.update(extra)
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def primary_metric(report: dict[str, Any]) -> str:
    """The metric the plot and summaries show: the task's first, else accuracy, else loss."""
    listed = (report.get("task") or {}).get("metrics") or []
    return listed[0] if listed else "accuracy"


LEGEND_SITES = 10  # more sites: grey lines and counts, not a legend entry per site


def _mark_quarantines(ax: Any, rounds: list[dict[str, Any]], sites: list[str],
                      colors: dict[str, Any], many: bool) -> None:
    """A red band on each round with a quarantine; each site's x (few sites) or the count."""
    first = True
    for r in rounds:
        if not r["quarantined"]:
            continue
        ax.axvline(r["round"], color="red", alpha=0.08, lw=6)
        if many:
            ax.annotate(f"{len(r['quarantined'])} x", (r["round"], 0.02), color="red",
                        ha="center", fontsize=7)
            continue
        for site in r["quarantined"]:
            ax.scatter([r["round"]], [0.02 + 0.04 * sites.index(site)], marker="x",
                       color=colors[site], s=40, label="quarantined" if first else None)
            first = False


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """The task's main metric and ε per round, per site, with quarantines marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    sites = sorted({s for r in rounds for s in (*r["attested"], *r["quarantined"])})
    many = len(sites) > LEGEND_SITES  # one grey line per site, no legend entry each
    colors = {s: ("0.55" if many else plt.get_cmap("tab10")(i % 10))
              for i, s in enumerate(sites)}
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [r["round"] for r in rounds]
    metric = primary_metric(report)
    style = {"lw": 0.6, "alpha": 0.45} if many else {"marker": "o", "ms": 3, "lw": 1}
    for i, site in enumerate(sites):
        label = (f"one line per site ({len(sites)})" if i == 0 else None) if many else site
        acc = [r["metrics"].get(site, {}).get(metric, math.nan) for r in rounds]
        ax_acc.plot(xs, acc, color=colors[site], label=label, **style)
        eps = [r["epsilon"].get(site) for r in rounds]
        eps_vals = [math.nan if e is None else e for e in eps]
        ax_eps.plot(xs, eps_vals, color=colors[site], label=label, **style)
    mean = [math.nan if (r.get("means") or {}).get(metric) is None else r["means"][metric]
            for r in rounds]
    ax_acc.plot(xs, mean, color="black", lw=2.5, label="client average")
    _mark_quarantines(ax_acc, rounds, sites, colors, many)
    if metric != "loss":
        ax_acc.set_ylim(0, 1)
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel(f"test {metric}")
    ax_acc.set_title(f"{metric} per site (x = quarantined that round)" if len(sites) <=
                     LEGEND_SITES else f"{metric} per site (n x = sites quarantined)")
    ax_acc.legend(fontsize=7, loc="lower right")
    ax_eps.set_xlabel("round")
    ax_eps.set_ylabel("cumulative ε (this run)")
    ax_eps.set_title("Privacy spent per site (overlapping when sites spend alike)")
    target = (report.get("privacy") or {}).get("epsilon_target_per_run")
    if target:
        ax_eps.axhline(target, color="gray", ls="--", lw=1,
                       label=f"coordinator's target ε = {target:g} (sites may cap lower)")
    if any(e is not None for r in rounds for e in r["epsilon"].values()):
        ax_eps.legend(fontsize=7, loc="upper left")
    else:
        ax_eps.text(0.5, 0.5, "DP off", ha="center", va="center", transform=ax_eps.transAxes)
    for ax in (ax_acc, ax_eps):
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
