"""What the audit chain records: run start, one signed receipt per round, run end.

Bodies hold ids, digests, verdict reasons and epsilon, never payloads, evidence bytes or keys
(other than the coordinator's public key, so a verifier knows whose signatures to expect).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from cleanroom.coordinator.records import RoundRecord, SiteRound


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


def _site_entry(s: SiteRound) -> dict[str, Any]:
    admission = s.admission
    privacy = s.train.privacy if s.train else None
    return {
        "node_id": s.node_id,
        "admitted": s.admitted,
        "reason": s.reason,
        "nonce_sha256": s.nonce_sha256,
        "evidence_sha256": admission.get("evidence_sha256"),
        "measurement": admission.get("measurement"),
        "tcb": admission.get("tcb"),
        "tcb_status": admission.get("tcb_status"),
        "refusal": admission.get("refusal"),
        "checks": admission.get("checks", []),
        "model_ciphertext_sha256": s.model_ciphertext_sha256,
        "aggregator_evidence_sha256": s.aggregator_evidence_sha256,
        "update_ciphertext_sha256": s.update_ciphertext_sha256,
        "update_norm": s.update_norm,
        "epsilon_round": privacy.epsilon_round if privacy else None,
        "epsilon_run": privacy.epsilon_run if privacy else None,
        "epsilon_lifetime": privacy.epsilon_lifetime if privacy else None,
        "ledger_records": privacy.ledger_records if privacy else None,
        "delta": privacy.delta if privacy else None,
        "dp_steps": privacy.steps if privacy else None,
        "num_examples": s.train.num_examples if s.train else None,
    }


def round_receipt(record: RoundRecord, *, policy_digest: str) -> dict[str, Any]:
    """The signed body of a round: who was asked, each site's verdict and the nonce its
    admission consumed (SHA-256), ciphertext digests, the aggregate, privacy spent."""
    return {
        "run_id": record.run_id,
        "round": record.round,
        "sites_asked": sorted(record.sites),
        "attested": record.attested,
        "quarantined": record.quarantined,
        "global_model_sha256": record.model_digest,
        "aggregate_sha256": record.aggregate_digest,
        "aggregator": record.aggregator,
        "aggregated": list(record.aggregated),
        "site_refusals": dict(sorted(record.site_refusals.items())),
        "secure_aggregation": record.secure_aggregation,
        "central_epsilon": record.central_epsilon,
        "skipped": record.skipped,
        "sites": {name: _site_entry(s) for name, s in sorted(record.sites.items())},
        "policy_digest": policy_digest,
        "code_version": code_version(),
    }
