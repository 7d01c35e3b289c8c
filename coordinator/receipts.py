"""What the audit chain records: run start, one signed receipt per round, run end.

Bodies hold ids, digests, verdict reasons and epsilon, never payloads, evidence bytes or keys
(other than the coordinator's public key, so a verifier knows whose signatures to expect).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from cleanroom.coordinator.strategy import RoundRecord


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout, if there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("cleanroom-fl")
    except PackageNotFoundError:
        base = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"],
                                cwd=Path(__file__).parent, capture_output=True, text=True,
                                timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{base}+{commit}" if commit else base


def round_receipt(record: RoundRecord, *, policy_digest: str) -> dict[str, Any]:
    sites = {}
    for name, s in sorted(record.sites.items()):
        admission = s.admission
        sites[name] = {
            "node_id": s.node_id,
            "admitted": s.admitted,
            "reason": s.reason,
            "evidence_sha256": admission.get("evidence_sha256"),
            "measurement": admission.get("measurement"),
            "checks": admission.get("checks", []),
            "model_ciphertext_sha256": s.model_ciphertext_sha256,
            "update_ciphertext_sha256": s.update_ciphertext_sha256,
            "update_norm": s.update_norm,
            "epsilon_round": s.train_metrics.get("epsilon-round"),
            "epsilon_run": s.train_metrics.get("epsilon-run"),
            "epsilon_lifetime": s.train_metrics.get("epsilon-lifetime"),
            "ledger_records": s.train_metrics.get("ledger-records"),
            "delta": s.train_metrics.get("delta"),
            "dp_steps": s.train_metrics.get("dp-steps"),
            "num_examples": s.train_metrics.get("num-examples"),
        }
    return {
        "run_id": record.run_id,
        "round": record.round,
        "sites_asked": sorted(record.sites),
        "attested": record.attested,
        "quarantined": record.quarantined,
        "global_model_sha256": record.model_digest,
        "aggregate_sha256": record.aggregate_digest,
        "skipped": record.skipped,
        "sites": sites,
        "policy_digest": policy_digest,
        "code_version": code_version(),
    }
