"""Model card of a federated run (Markdown for people, JSON for tools), from its report.

Only aggregate facts: site names and sample counts, configuration, epsilon per site, who was
attested with which measurement, quarantines and metrics. Never rows or updates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NOT_A_DEVICE = "Research model; not a medical device; not for clinical decisions."

KNOWN_LIMITS = [
    "Differential privacy bounds what the updates reveal about any one training record "
    "(example-level (epsilon, delta), RDP accountant of Opacus); the per-site test metrics "
    "reported each round leave the sites without DP noise.",
    "In the local simulation the TEE is simulated: its evidence has the SEV-SNP format and the "
    "code measurement is honest, but it is anchored in a consortium test root, not in AMD "
    "hardware. Production policies never trust that root.",
    "The coordinator sees each attested site's decrypted update (no secure aggregation); DP "
    "noise added at the site bounds what it learns.",
    "Sites with few samples (e.g. Switzerland: 30 training, 16 test, almost all positive) make "
    "per-site accuracy noisy.",
    "Sites quarantined in a round contribute nothing to that round; the final model may "
    "under-represent them.",
]


def build_model_card(report: dict[str, Any], *, plan: dict[str, Any], task: dict[str, Any],
                     site_samples: dict[str, dict[str, int]],
                     final_model_sha256: str | None) -> dict[str, Any]:
    """The card of the run ``report`` describes. DP and training facts come from the ``plan``
    that ran (``TrainPlan.model_dump()``), the privacy spent from the sites' reports, the
    purpose from the task's own description."""
    config = report.get("config", {})
    rounds = report.get("rounds", [])
    attestation: dict[str, Any] = {"measurements_allowed": report.get("policy", {}).get(
        "measurements", []), "policy_digest": report.get("policy", {}).get("digest"),
        "rounds": [{"round": r["round"], "attested": r["attested"],
                    "quarantined": r["quarantined"]} for r in rounds]}
    quarantines: dict[str, list[str]] = {}
    for r in rounds:
        for site, reason in r["quarantined"].items():
            quarantines.setdefault(site, []).append(f"round {r['round']}: {reason}")
    dp_plan = plan.get("dp", {})
    spent = report.get("final", {}).get("epsilon", {})
    dp = {"enabled": bool(dp_plan.get("enabled")), "delta": dp_plan.get("delta"),
          "epsilon_target_per_site": dp_plan.get("epsilon"),
          "epsilon_spent": spent,
          "accountant": "RDP (Opacus), every DP-SGD step counted by the site's own ledger",
          "max_grad_norm": dp_plan.get("max_grad_norm"),
          "sample_rate": plan.get("sample_rate"), "local_steps": plan.get("local_steps")}
    aggregator = report.get("aggregator")
    central = (aggregator or {}).get("central_dp")
    if central is not None:
        dp["central"] = {**central,
                         "epsilon_spent": report.get("final", {}).get("central_epsilon")}
    attestation["aggregator"] = None if aggregator is None else {
        "measurement": aggregator.get("measurement"), "provider": aggregator.get("provider"),
        "refusals": {f"round {r['round']}": r.get("site_refusals") for r in rounds
                     if r.get("site_refusals")}}
    description = task.get("description") or f"task {task.get('name')}"
    return {
        "purpose": f"{description}. {NOT_A_DEVICE}",
        "task": {k: task.get(k) for k in ("name", "digest", "dataset")},
        "model": {"name": task.get("name"),
                  "architecture_digest": task.get("architecture_digest"),
                  "final_model_sha256": final_model_sha256},
        "training": {"strategy": config.get("strategy", report.get("strategy")),
                     "rounds": plan.get("rounds"), "local_steps": plan.get("local_steps"),
                     "sample_rate": plan.get("sample_rate"), "lr": plan.get("lr"),
                     "optimizer": plan.get("optimizer"),
                     "max_update_norm": plan.get("max_update_norm") or "derived per site",
                     "seed": config.get("seed")},
        "sites": site_samples,
        "differential_privacy": dp,
        "attestation": attestation,
        "quarantines": quarantines,
        "metrics": report.get("final", {}),
        "primary_metric": (task.get("metrics") or ["accuracy"])[0],
        "scenario": report.get("scenario"),
        "audit": {"log": report.get("audit_log"), "head": report.get("audit_head")},
        "mlflow": report.get("mlflow"),
        "known_limits": KNOWN_LIMITS,
    }


def render_markdown(card: dict[str, Any]) -> str:
    m, t, dp = card["model"], card["training"], card["differential_privacy"]
    task = card.get("task") or {}
    lines = ["# Model card", "", "## Purpose", card["purpose"], "",
             "## Task (approved code)", f"- name: `{task.get('name')}`",
             f"- task digest: `{task.get('digest')}`", f"- dataset: `{task.get('dataset')}`",
             "", "## Model", f"- name: `{m['name']}`",
             f"- architecture digest: `{m['architecture_digest']}`",
             f"- final parameters sha256: `{m['final_model_sha256']}`", "",
             "## Training", *[f"- {k}: {v}" for k, v in t.items()], "",
             "## Sites", "| site | train samples | test samples |", "|---|---|---|"]
    for site, counts in sorted(card["sites"].items()):
        lines.append(f"| {site} | {counts.get('train', '?')} | {counts.get('test', '?')} |")
    lines += ["", "## Differential privacy"]
    if dp["enabled"]:
        lines.append(f"Each site trained with DP-SGD (clip {dp['max_grad_norm']}, sampling rate "
                     f"{dp['sample_rate']}, {dp['local_steps']} steps per round), target "
                     f"epsilon {dp['epsilon_target_per_site']} per site, delta {dp['delta']}; "
                     f"{dp['accountant']}.")
        lines += ["", "| site | epsilon spent (this run) |", "|---|---|"]
        for site, eps in sorted(dp["epsilon_spent"].items()):
            lines.append(f"| {site} | {'-' if eps is None else f'{eps:.4f}'} |")
    else:
        lines.append("**DP was off at the sites for this run** (the plan that ran): no "
                     "example-level guarantee for the updates.")
    central = dp.get("central")
    if central is not None:
        spent = central.get("epsilon_spent")
        lines += ["", f"Central (user-level) DP inside the attested aggregator: each site's "
                  f"update clipped to {central['clip']}, Gaussian noise multiplier "
                  f"{central['noise_multiplier']:.4g} on the mean, delta {central['delta']}; "
                  f"epsilon spent {'-' if spent is None else f'{spent:.4f}'} "
                  f"({central['accountant']})."]
    lines += ["", "## Attestation",
              f"- allowed measurements: {', '.join(f'`{x[:16]}...`' for x in card['attestation']['measurements_allowed']) or 'none'}",  # noqa: E501
              f"- policy digest: `{card['attestation']['policy_digest']}`",
              *_aggregator_lines(card["attestation"].get("aggregator")),
              "", "| round | attested | quarantined |", "|---|---|---|"]
    for r in card["attestation"]["rounds"]:
        q = "; ".join(f"{s}: {why}" for s, why in r["quarantined"].items()) or "-"
        lines.append(f"| {r['round']} | {', '.join(r['attested'])} | {q} |")
    metrics, primary = card["metrics"], card.get("primary_metric", "accuracy")
    per_site = metrics.get("per_site") or {}
    names = sorted({n for values in per_site.values() for n in values},
                   key=lambda n: (n != primary, n == "loss", n))
    lines += ["", "## Metrics (final global model, each site's test split)",
              f"Client-average {primary}: {metrics.get(primary)}", "",
              "| site | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for site, values in sorted(per_site.items()):
        cells = ["-" if values.get(n) is None else f"{values[n]:.4f}" for n in names]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    lines += ["", "## Known limits", *[f"- {x}" for x in card["known_limits"]], "",
              "## Provenance", f"- audit log: `{card['audit']['log']}` head "
              f"`{card['audit']['head']}`",
              f"- MLflow run: `{(card.get('mlflow') or {}).get('run_id')}`", ""]
    return "\n".join(lines)


def _aggregator_lines(aggregator: dict[str, Any] | None) -> list[str]:
    if aggregator is None:
        return ["- aggregator: the coordinator's own process opened the updates (no attested "
                "aggregator)"]
    lines = [f"- aggregator: attested enclave ({aggregator.get('provider')}), measurement "
             f"`{str(aggregator.get('measurement'))[:16]}...`, verified by every site before "
             "it released an update"]
    for when, refusals in (aggregator.get("refusals") or {}).items():
        lines.append(f"- {when}: refused by " + "; ".join(f"{s} ({why})"
                                                        for s, why in refusals.items()))
    return lines


def write_model_card(card: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    md = Path(out_dir) / "model_card.md"
    js = Path(out_dir) / "model_card.json"
    md.write_text(render_markdown(card))
    js.write_text(json.dumps(card, indent=2) + "\n")
    return md, js
