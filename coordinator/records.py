"""What the coordinator knows about a round: one :class:`RoundRecord`, one :class:`SiteRound`
per site asked. Digests, verdict summaries and the sites' typed reports only: never evidence
bytes, keys, parameters or rows. Reports, receipts, MLflow and checkpoints are built from these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cleanroom.protocol.reports import EvaluateReport, TrainReport


@dataclass
class SiteRound:
    """One site in one round, filed under the site's authenticated identity."""

    site: str
    node_id: int
    admission: dict[str, Any]  # Admission.summary(): digests, checks, measurement
    admitted: bool
    reason: str
    nonce_sha256: str | None = None  # the challenge nonce this site's admission consumed
    model_ciphertext_sha256: str | None = None
    aggregator_evidence_sha256: str | None = None  # the aggregator's evidence sent to it
    update_ciphertext_sha256: str | None = None
    update_norm: float | None = None
    train: TrainReport | None = None
    evaluation: EvaluateReport | None = None

    @property
    def epsilon_run(self) -> float | None:
        return self.train.privacy.epsilon_run if self.train and self.train.privacy else None


@dataclass
class RoundRecord:
    """Everything the coordinator knows about one round."""

    round: int
    run_id: str
    model_digest: str
    sites: dict[str, SiteRound] = field(default_factory=dict)
    aggregate_digest: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    started_at: float = field(default_factory=time.time)
    attestation_seconds: float = 0.0
    verify_seconds: float = 0.0
    seconds: float = 0.0
    skipped: str | None = None
    aggregator: dict[str, Any] | None = None  # the attested aggregator (its measurement)
    aggregated: list[str] = field(default_factory=list)  # sites whose update entered it
    site_refusals: dict[str, str] = field(default_factory=dict)  # site -> its typed refusal
    evaluation_refusals: dict[str, str] = field(default_factory=dict)  # of its evaluation
    central_epsilon: float | None = None  # the aggregator's central DP so far
    metrics_mean: dict[str, float] | None = None  # released client averages (not per site)
    metrics_sites: list[str] = field(default_factory=list)  # sites those averages cover
    secure_aggregation: dict[str, Any] | None = None  # parameters, survivors, dropped sites

    @property
    def attested(self) -> list[str]:
        return sorted(s.site for s in self.sites.values() if s.admitted)

    @property
    def quarantined(self) -> dict[str, str]:
        return {s.site: s.reason for s in sorted(self.sites.values(), key=lambda s: s.site)
                if not s.admitted}

    def site_of(self, node_id: int) -> SiteRound | None:
        return next((s for s in self.sites.values() if s.node_id == node_id), None)
