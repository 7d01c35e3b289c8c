"""The attestation gate: fresh challenges, evidence verification, admission decisions.

Flower-independent and synchronous. A site is admitted only if its reply echoes an unused
nonce the coordinator issued to that node for this run and round, the node is the site it
claims to be (:class:`SiteDirectory`), its evidence verifies against the policy, the hardware
REPORT_DATA equals the binding the coordinator computes itself, and its privacy ledger did not
go backwards. Issued and consumed nonces are persisted (:class:`NonceStore`), so a replay is
refused even after a restart; :meth:`AttestationGate.admit_phase` judges a phase's answers and
makes its decisions durable before any of them has an effect.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cleanroom.attestation import trust
from cleanroom.attestation.collateral_folder import CollateralFolder
from cleanroom.attestation.evidence import Endorsements, trusted_amd_chains, verify_evidence
from cleanroom.attestation.registry import evidence_digest
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.verdict import Verdict
from cleanroom.coordinator.watermarks import LedgerWatermarks
from cleanroom.protocol.binding import NONCE_SIZE, Binding
from cleanroom.protocol.wire import AttestChallenge, AttestResponse, LedgerAnchor, TrainPlan

log = logging.getLogger(__name__)


class NonceStore:
    """Issued / consumed nonces, persisted as JSON lines when ``path`` is given.

    Appends are visible at once; :meth:`flush` makes them durable (the gate flushes at the end
    of each attestation phase, :meth:`AttestationGate.admit_phase`, before any model leaves).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._issued: dict[str, tuple[str, int, int]] = {}
        self._consumed: set[str] = set()
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # torn last line after a crash: that nonce was never sent
                if rec.get("op") == "issue":
                    self._issued[rec["nonce"]] = (rec["run_id"], int(rec["round"]),
                                                  int(rec["node"]))
                elif rec.get("op") == "consume":
                    self._consumed.add(rec["nonce"])

    def _write(self, rec: dict[str, object]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def flush(self) -> None:
        """Make every issued and consumed nonce durable."""
        if self.path is None or not self.path.exists():
            return
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())

    def issue(self, run_id: str, round: int, node_id: int) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        with self._lock:
            self._issued[nonce.hex()] = (run_id, round, node_id)
            self._write({"op": "issue", "nonce": nonce.hex(), "run_id": run_id,
                         "round": round, "node": node_id})
        return nonce

    def consume(self, nonce: bytes, run_id: str, round: int, node_id: int) -> str | None:
        """Mark used; returns None if fine, else why the nonce is not acceptable."""
        key = nonce.hex()
        with self._lock:
            issued = self._issued.get(key)
            if issued is None:
                return "nonce was never issued by this coordinator"
            if issued != (run_id, round, node_id):
                return f"nonce was issued for run {issued[0]} round {issued[1]} node " \
                       f"{issued[2]}, not this one"
            if key in self._consumed:
                return "nonce was already used (replay)"
            self._consumed.add(key)
            self._write({"op": "consume", "nonce": key})
        return None


@dataclass(frozen=True)
class SiteDirectory:
    """Who each Flower node is, as provisioning says (never as the node claims).

    ``names``: node id -> provisioned site name (deployments: the names the operator
    registered with the node keys; the in-process simulation: its node map). ``keys``: node id
    -> the identity bytes (DER SPKI) of the key the SuperLink authenticated, bound into every
    attestation (deployments only). ``strict``: a node missing from ``names`` is refused; only
    Flower's own simulation runtime, which assigns node ids the coordinator cannot map, runs
    with ``strict=False`` (claimed names, unique per round).
    """

    names: Mapping[int, str] = field(default_factory=dict)
    keys: Mapping[int, bytes] | None = None
    strict: bool = True

    def label(self, node_id: int, claimed: str | None = None) -> str:
        """The name a node's round entry is filed under: its provisioned name, else (only
        when not strict) what it claims, else ``node-<id>``."""
        if node_id in self.names:
            return self.names[node_id]
        if not self.strict and claimed:
            return claimed
        return f"node-{node_id}"

    def problem(self, node_id: int, claimed: str) -> str | None:
        """Why ``node_id`` may not answer as ``claimed`` (None: it may)."""
        name = self.names.get(node_id)
        if name is None:
            return f"identity: node {node_id} is not a registered site" if self.strict else None
        if name != claimed:
            return f"identity: node {node_id} is registered as {name!r}, not {claimed!r}"
        return None


@dataclass(frozen=True)
class Admission:
    """The gate's decision about one site for one round."""

    node_id: int
    site: str | None  # the name the reply claimed (the record files it under the identity)
    admitted: bool
    reason: str
    verdict: Verdict | None = None
    site_public_key: bytes | None = None
    evidence_sha256: str | None = None
    nonce_sha256: str | None = None
    refusal_code: str | None = None
    verify_seconds: float = 0.0
    task_digest: str | None = None  # the task the evidence binds
    dataset_digest: str | None = None  # the site's registered dataset it binds
    dataset_rows: int = 0
    update_signer: bytes | None = None  # the Ed25519 key that must sign its update
    secagg_keys: tuple[bytes, bytes] | None = None  # (channel, mask): secure aggregation

    def summary(self) -> dict[str, object]:
        """Audit/report view: digests and reasons, never evidence bytes or keys."""
        out: dict[str, object] = {"node_id": self.node_id, "site": self.site,
                                  "admitted": self.admitted, "reason": self.reason,
                                  "evidence_sha256": self.evidence_sha256,
                                  "nonce_sha256": self.nonce_sha256,
                                  "task_digest": self.task_digest,
                                  "dataset_digest": self.dataset_digest,
                                  "dataset_rows": self.dataset_rows}
        if self.verdict is not None and self.verdict.claims is not None:
            c = self.verdict.claims
            out.update(measurement=c.measurement.hex(), format=c.format, root=c.root,
                       simulated=c.simulated, debug=c.debug, tcb=dict(c.tcb))
            if c.tcb_status is not None:
                out["tcb_status"] = c.tcb_status
        if self.verdict is not None:
            out["checks"] = [f"{'ok' if k.passed else 'FAIL'} {k.name}"
                             for k in self.verdict.checks]
        if self.refusal_code:
            out["refusal"] = self.refusal_code
        return out


# One answer for the gate to judge: (node id, its challenge, response, evidence, endorsement)
Candidate = tuple[int, AttestChallenge, AttestResponse, bytes, bytes]


def refused(node_id: int, reason: str, site: str | None = None) -> Admission:
    """An admission refused before the gate looked at any evidence."""
    return Admission(node_id=node_id, site=site, admitted=False, reason=reason)


class AttestationGate:
    """Issues challenges and admits or quarantines sites."""

    def __init__(self, policy: Policy, nonces: NonceStore | None = None, *,
                 coordinator_id: str = "",
                 clock: Callable[[], dt.datetime] | None = None,
                 directory: SiteDirectory | None = None,
                 watermarks: LedgerWatermarks | None = None,
                 collateral: CollateralFolder | None = None) -> None:
        """``collateral``: the configured TDX collateral (Intel PCS TCB info, QE identity,
        CRLs), loaded once and reloaded when its files change; None: none configured (a
        policy that requires collateral then refuses TDX sites, saying so)."""
        self.policy = policy
        self.collateral = collateral
        self.nonces = nonces or NonceStore()
        self.watermarks = watermarks or LedgerWatermarks()
        self.directory = directory or SiteDirectory(strict=False)
        self.coordinator_id = coordinator_id
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._chains: tuple[trust.AmdChain, ...] = trusted_amd_chains(policy)
        self.policy_digest = hashlib.sha256(policy.model_dump_json().encode()).hexdigest()

    def challenge(self, *, run_id: str, round: int, node_id: int, model_digest: str,
                  coordinator_public_key: bytes, plan: TrainPlan) -> AttestChallenge:
        """A fresh challenge for ``node_id``; it carries the ledger anchor of the site this
        node is provisioned as, if the coordinator attested that site's ledger before."""
        site = self.directory.names.get(node_id)
        anchor = self.watermarks.anchor(site)
        return AttestChallenge(run_id=run_id, round=round,
                               nonce=self.nonces.issue(run_id, round, node_id),
                               coordinator_public_key=coordinator_public_key,
                               model_digest=model_digest, plan=plan,
                               coordinator_id=self.coordinator_id, issued_at=time.time(),
                               ledger_anchor=LedgerAnchor(records=anchor[0], head=anchor[1])
                               if anchor else None)

    def admit_phase(self, candidates: Iterable[Candidate]) -> list[Admission]:
        """Judge an attestation phase's answers (:meth:`admit`, in the order given), then
        make the phase durable (:meth:`end_phase`: the nonces consumed, the ledger watermarks
        advanced) before returning, so no admission takes effect before it is on disk. Every
        phase ends here, also one with no answer (the nonces it issued)."""
        admissions = [self.admit(*candidate) for candidate in candidates]
        self.end_phase()
        return admissions

    def admit(self, node_id: int, challenge: AttestChallenge, response: AttestResponse,
              evidence: bytes, endorsement: bytes) -> Admission:
        """One answer's admission (not yet durable: :meth:`admit_phase` makes it so)."""
        site = response.site
        evidence_sha = evidence_digest(evidence) if evidence else None
        nonce_sha = hashlib.sha256(challenge.nonce).hexdigest()

        def quarantine(reason: str, **kw: object) -> Admission:
            return Admission(node_id=node_id, site=site, admitted=False, reason=reason,
                             evidence_sha256=evidence_sha, nonce_sha256=nonce_sha,
                             **kw)  # type: ignore[arg-type]

        if (response.run_id, response.round, response.nonce) != (
                challenge.run_id, challenge.round, challenge.nonce):
            return quarantine("protocol: reply does not answer this round's challenge "
                              "(run, round or nonce differ)")
        identity = self.directory.problem(node_id, site)
        if identity is not None:
            return quarantine(identity)
        if response.refusal is not None:
            label = response.refusal.code.replace("-", " ")
            return quarantine(f"{label}: {response.refusal.detail}",
                              refusal_code=response.refusal.code)
        problem = self.nonces.consume(challenge.nonce, challenge.run_id, challenge.round,
                                      node_id)
        if problem is not None:
            return quarantine(f"freshness: {problem}")
        if response.site_public_key is None or response.update_signer_key is None or \
                not evidence:
            return quarantine("protocol: no evidence, no site key or no update-signing key in "
                              "the reply")
        task = challenge.plan.task
        if response.task_digest != task.digest:
            return quarantine(f"task: the site answers for task {str(response.task_digest)[:16]}"
                              f"..., the run's task is {task.name} ({task.digest[:16]}...)")
        secagg = None
        if challenge.plan.secure_aggregation:
            if response.secagg_channel_key is None or response.secagg_mask_key is None:
                return quarantine("protocol: the run uses secure aggregation but the reply "
                                  "has no secure-aggregation keys")
            secagg = (response.secagg_channel_key, response.secagg_mask_key)
        node_key = bytes.fromhex(response.node_public_key) if response.node_public_key else b""
        keys = self.directory.keys
        if keys is not None and keys.get(node_id, b"") != node_key:
            return quarantine("identity: the node key bound in the evidence is not the key "
                              f"this node authenticated with (node {node_id})")
        binding = Binding(run_id=challenge.run_id, round=challenge.round, site=site,
                          nonce=challenge.nonce, site_public_key=response.site_public_key,
                          model_digest=challenge.model_digest, node_public_key=node_key,
                          ledger_records=response.ledger_records,
                          ledger_head=response.ledger_head,
                          ledger_anchor_head=response.ledger_anchor_head or ""
                          if challenge.ledger_anchor else "",
                          task_digest=task.digest,
                          dataset_digest=response.dataset_digest or "",
                          dataset_rows=response.dataset_rows,
                          update_signer=response.update_signer_key,
                          secagg_keys=_secagg_digest(secagg))
        policy = self.policy.model_copy(update={"report_data": binding.report_data(),
                                                "measurements": self.expected_measurements(
                                                    task.digest)})
        start = time.perf_counter()
        endorsements = Endorsements(
            key_certificate=endorsement or None,
            collateral=self.collateral.current() if self.collateral is not None else None)
        verdict = verify_evidence(evidence, policy=policy, at=self.clock(),
                                  endorsements=endorsements, amd_chains=self._chains)
        elapsed = time.perf_counter() - start
        if not verdict.accepted:
            return quarantine(f"attestation: {verdict.summary}", verdict=verdict,
                              verify_seconds=elapsed)
        # The ledger state is the enclave's word only now that the evidence is authentic.
        rollback = self._ledger_problem(node_id, site, challenge, response)
        if rollback is not None:
            return quarantine(rollback, verdict=verdict, verify_seconds=elapsed)
        self.watermarks.advance(site, response.ledger_records, response.ledger_head)
        return Admission(node_id=node_id, site=site, admitted=True, reason="attested",
                         verdict=verdict, site_public_key=response.site_public_key,
                         evidence_sha256=evidence_sha, nonce_sha256=nonce_sha,
                         verify_seconds=elapsed, task_digest=task.digest,
                         dataset_digest=response.dataset_digest,
                         dataset_rows=response.dataset_rows,
                         update_signer=response.update_signer_key, secagg_keys=secagg)

    def expected_measurements(self, task_digest: str) -> list[bytes]:
        """The MEASUREMENTs a site running ``task_digest`` may show: the policy's, or for a
        simulation policy its site-agent launch digests folded with the task (a simulated
        enclave is launched per task)."""
        if self.policy.environment != "simulation":
            return list(self.policy.measurements)
        from cleanroom.attestation.simulated import task_measurement

        return [task_measurement(m, task_digest) for m in self.policy.measurements]

    def _ledger_problem(self, node_id: int, site: str, challenge: AttestChallenge,
                        response: AttestResponse) -> str | None:
        rollback = self.watermarks.check(site, response.ledger_records, response.ledger_head)
        anchor = challenge.ledger_anchor
        if rollback is None and anchor is not None and \
                self.directory.names.get(node_id) == site and \
                response.ledger_anchor_head != anchor.head:
            rollback = (f"privacy ledger rollback: the site's ledger does not pass through the "
                        f"state this coordinator attested at {anchor.records} records (a copy "
                        "restored from before it and grown again)")
        return rollback

    def ledger_grew(self, site: str, records: int) -> None:
        """A train report's ledger size after the round's charge (a count only: it can only
        make the site's own later attestations fail, so it is safe to take)."""
        self.watermarks.advance(site, records, None)

    def end_phase(self) -> None:
        """Make this phase's nonces and ledger watermarks durable (before they take effect)."""
        self.nonces.flush()
        self.watermarks.flush()


def _secagg_digest(keys: tuple[bytes, bytes] | None) -> bytes:
    """What a site's evidence binds of its secure-aggregation keys (empty without)."""
    if keys is None:
        return b""
    from cleanroom.protocol.secagg import SecAggAdvertisement

    return SecAggAdvertisement(*keys).digest()
