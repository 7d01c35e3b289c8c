"""Model card of a federated run (Markdown for people, JSON for tools), from its report.

Only aggregate facts: site names and sample counts, configuration, epsilon per site, who was
attested with which measurement, quarantines and metrics. Never rows or updates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PURPOSES = {
    "heart-disease": "Research model estimating the presence of heart disease (UCI 'num' > 0) "
                     "from 13 routine clinical features (FLamby Fed-Heart-Disease). Not a "
                     "medical device; not for clinical decisions.",
    "synthetic": "Synthetic benchmark data; the model has no clinical meaning.",
}

KNOWN_LIMITS = [
    "Differential privacy bounds what the updates reveal about any one training record "
    "(example-level (epsilon, delta), RDP accountant of Opacus); the per-site test metrics "
    "reported each round are not privatised.",
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


def build_model_card(report: dict[str, Any], *, site_samples: dict[str, dict[str, int]],
                     architecture_digest: str, final_model_sha256: str | None) -> dict[str, Any]:
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
    dp = {"enabled": bool(config.get("dp")), "delta": config.get("delta"),
          "epsilon_target_per_site": config.get("epsilon"),
          "epsilon_spent": report.get("final", {}).get("epsilon", {}),
          "accountant": "RDP (Opacus), every DP-SGD step counted by the site's own ledger",
          "max_grad_norm": config.get("max_grad_norm"),
          "sample_rate": config.get("sample_rate"), "local_steps": config.get("local_steps")}
    return {
        "purpose": PURPOSES.get(config.get("dataset", ""), "federated model"),
        "model": {"name": config.get("model"), "architecture_digest": architecture_digest,
                  "final_model_sha256": final_model_sha256},
        "training": {k: config.get(k) for k in ("strategy", "rounds", "local_steps",
                                                "sample_rate", "lr", "optimizer",
                                                "max_update_norm", "seed", "backend")},
        "sites": site_samples,
        "differential_privacy": dp,
        "attestation": attestation,
        "quarantines": quarantines,
        "metrics": report.get("final", {}),
        "scenario": report.get("scenario"),
        "audit": {"log": report.get("audit_log"), "head": report.get("audit_head")},
        "mlflow": report.get("mlflow"),
        "known_limits": KNOWN_LIMITS,
    }


def render_markdown(card: dict[str, Any]) -> str:
    m, t, dp = card["model"], card["training"], card["differential_privacy"]
    lines = ["# Model card", "", "## Purpose", card["purpose"], "",
             "## Model", f"- name: `{m['name']}`",
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
        lines.append("**DP was off for this run**: no formal privacy guarantee for the updates.")
    lines += ["", "## Attestation",
              f"- allowed measurements: {', '.join(f'`{x[:16]}...`' for x in card['attestation']['measurements_allowed']) or 'none'}",  # noqa: E501
              f"- policy digest: `{card['attestation']['policy_digest']}`",
              "", "| round | attested | quarantined |", "|---|---|---|"]
    for r in card["attestation"]["rounds"]:
        q = "; ".join(f"{s}: {why}" for s, why in r["quarantined"].items()) or "-"
        lines.append(f"| {r['round']} | {', '.join(r['attested'])} | {q} |")
    metrics = card["metrics"]
    lines += ["", "## Metrics (final global model, each site's test split)",
              f"Client-average accuracy: {metrics.get('accuracy_mean')}", "",
              "| site | accuracy | loss |", "|---|---|---|"]
    for site, acc in sorted((metrics.get("accuracy") or {}).items()):
        loss = (metrics.get("loss") or {}).get(site)
        lines.append(f"| {site} | {acc:.4f} | {'-' if loss is None else f'{loss:.4f}'} |")
    lines += ["", "## Known limits", *[f"- {x}" for x in card["known_limits"]], "",
              "## Provenance", f"- audit log: `{card['audit']['log']}` head "
              f"`{card['audit']['head']}`",
              f"- MLflow run: `{(card.get('mlflow') or {}).get('run_id')}`", ""]
    return "\n".join(lines)


def write_model_card(card: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    md = Path(out_dir) / "model_card.md"
    js = Path(out_dir) / "model_card.json"
    md.write_text(render_markdown(card))
    js.write_text(json.dumps(card, indent=2) + "\n")
    return md, js
