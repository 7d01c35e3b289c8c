"""What the audit chain records: run start, one signed receipt per round, run end.

:class:`AuditObserver` is the run's observer (:mod:`cleanroom.coordinator.run`) that appends
them to the signed hash chain (:mod:`cleanroom.coordinator.audit`); it builds each round's
receipt (:func:`round_receipt`) from the closed round's record.

Bodies hold ids, digests, verdict reasons and epsilon, never payloads, evidence bytes or keys
(other than the coordinator's public key, so a verifier knows whose signatures to expect).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from cleanroom.coordinator.records import RoundRecord, SiteRound
from cleanroom.coordinator.run import ClosedRun, FederatedRun, RoundEvent, RunObserver


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


def open_audit(path: Path, key_path: Path) -> Any:
    """The coordinator's audit log, with its signing key created on first use (mode 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cleanroom.coordinator.audit import AuditLog, load_signing_key
    from cleanroom.fsutil import write_private

    if not key_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return AuditLog(path, load_signing_key(key_path))


class AuditObserver(RunObserver):
    """The signed hash chain: run start (or resume), one receipt per round, run end."""

    def __init__(self) -> None:
        self.audit: Any = None

    def opened(self, run: FederatedRun) -> None:
        from cleanroom.coordinator.audit import public_key_hex
        from cleanroom.coordinator.checkpoint import check_against_audit
        from cleanroom.protocol.arrays import arrays_digest

        spec = run.spec
        previous_head = ""
        if spec.resume is not None:  # (load_resumable checked it; a bare checkpoint is checked)
            ckpt = spec.resume.checkpoint
            previous_head = ckpt.audit_head or check_against_audit(ckpt,
                                                                   spec.resume.previous_audit)
        self.audit = open_audit(run.out / "audit.jsonl", spec.stores.audit_key)
        run.audit_path = self.audit.path
        common = {"coordinator_public_key": public_key_hex(self.audit.key),
                  "code_version": code_version(), "run_id": run.run_id,
                  "policy_digest": run.gate.policy_digest}
        if spec.resume is not None:
            ckpt = spec.resume.checkpoint
            self.audit.append("run-resume", {
                **common, "from_round": ckpt.round, "rounds": ckpt.rounds,
                "checkpoint_sha256": ckpt.sha256, "previous_audit_head": previous_head,
                "checkpoint_model_sha256": arrays_digest(ckpt.model)})
            return
        self.audit.append("run-start", {
            **common, "strategy": spec.strategy, "sites": spec.sites,
            "policy_name": spec.policy.name,
            "measurements": [m.hex() for m in spec.policy.measurements],
            "plan": spec.plan.model_dump(mode="json"),
            "aggregator": run.aggregator_summary()})

    def round_closed(self, run: FederatedRun, event: RoundEvent) -> None:
        receipt = round_receipt(event.record, policy_digest=run.gate.policy_digest)
        if event.checkpoint_sha256 is not None:
            receipt["checkpoint_sha256"] = event.checkpoint_sha256
        self.audit.append("round-receipt", receipt)

    def failed(self, run: FederatedRun) -> None:
        if self.audit is not None:
            self.audit.append("run-end", {"status": "failed", "rounds": len(run.records)})

    def closed(self, run: FederatedRun, result: ClosedRun) -> None:
        last = result.records[-1] if result.records else None
        run.audit_head = self.audit.append("run-end", {
            "status": "completed" if result.last_round >= run.spec.plan.rounds else "paused",
            "last_round": result.last_round, "rounds": len(result.records),
            "final_model_sha256": result.final_digest,
            "attested_last_round": last.attested if last else [],
            "epsilon": dict(run.epsilon)})
        run.audit_entries = self.audit.seq
        result.paths["audit"] = self.audit.path
