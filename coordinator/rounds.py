"""The coordinator's side of one round of the confidential protocol, as a state machine.

Flower-free and synchronous: the Flower adapter (:mod:`cleanroom.coordinator.strategy`) moves
messages; everything a round decides happens here, in this order:

1. ``attest_nodes(nodes, exchange)``: a ``challenge`` for every connected node that has no
   verdict yet, sent and answered through the adapter's ``exchange``; the answers judged in
   one batch (``judge``: the round's own checks, then the gate's ``admit_phase``, which makes
   nonces and ledger watermarks durable before any verdict takes effect); then
   ``end_attestation()`` (silent nodes quarantined) before any model leaves;
2. ``seal(node, ...)`` the global model for admitted nodes only (to the key each node's
   evidence bound, context = run, round, site, model digest);
3. ``open_update(node, sealed)``: decrypt with this round's key, read the site's typed report
   from inside the envelope, validate the update against the plan; any failure rejects that
   one site for the round;
4. ``look_ahead(digest)``: the next round, created while this round evaluates, so its
   challenges ride on the evaluation messages (one message round trip less per round);
5. ``open_metrics`` / ``close()``: the :class:`RoundRecord` for reports, receipts and audit.

Keys live for one round. Every site entry is filed under the node's authenticated identity
(:class:`~cleanroom.coordinator.gate.SiteDirectory`), never under the name a reply claims.

With an attested aggregator (``aggregator=``, :mod:`cleanroom.coordinator.aggregator`), the
round key is the aggregator's: this object never holds a private key. Admitted sites are
announced to the aggregator, whose evidence for each site (binding the nonce the site sent
with its attestation) rides on the site's instructions; updates and evaluation reports go
to the aggregator unopened (:meth:`submit_update`, :meth:`submit_metrics`), and only what it
releases comes back (:meth:`aggregate`, :meth:`release_metrics`).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cleanroom.coordinator.gate import Admission, AttestationGate, Candidate, refused
from cleanroom.coordinator.records import RoundRecord, SiteRound
from cleanroom.coordinator.validation import (
    check_train_report,
    site_update_bound,
    validate_update,
)
from cleanroom.errors import CleanroomError
from cleanroom.protocol.arrays import EncodedArrays
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
from cleanroom.protocol.payload import Sealed, open_metrics, open_update, seal_model
from cleanroom.protocol.reports import EvaluateReport, TrainReport, metric_means
from cleanroom.protocol.wire import (
    AttestAnswer,
    AttestChallenge,
    AttestResponse,
    Refusal,
    TrainPlan,
)

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    ATTESTING = "attesting"
    TRAINING = "training"
    EVALUATING = "evaluating"
    CLOSED = "closed"


class RoundStateError(CleanroomError):
    """A round step called out of order (a bug in the adapter, not a site's fault)."""


Answer = AttestAnswer  # (response, evidence, endorsement), or why there is none
Reply = Sealed | Refusal | str  # a train reply: the sealed update, the site's refusal, or an error
# The adapter's attestation round trip: the challenges out, the answers (in the order received)
Exchange = Callable[[Mapping[int, AttestChallenge]], list[tuple[int, Answer]]]
Opened = tuple[OrderedDict[str, np.ndarray], TrainReport]  # an update the operator opened


@dataclass(frozen=True)
class Instruction:
    """What goes to one node with the model: the sealed model, next round's challenge (on an
    evaluation), the aggregator's evidence for the site, a masked-input request."""

    sealed: Sealed
    challenge: AttestChallenge | None = None
    aggregator: tuple[bytes, bytes] | None = None
    masked_input: bytes | None = None


@dataclass(frozen=True)
class Updates:
    """A round's updates in: those the operator opened (in reply order, None where there is
    nothing to aggregate) or, with an aggregator, what it released."""

    opened: list[Opened | None]
    aggregate: Any = None  # the aggregator's Aggregate (None without one, or not yet)


@dataclass(frozen=True)
class Session:
    """An admitted site for this round: where its sealed model goes."""

    node_id: int
    site: str
    public_key: bytes
    dataset_rows: int = 0  # the training rows its evidence bound
    update_signer: bytes | None = None  # the Ed25519 key its evidence bound
    secagg_keys: tuple[bytes, bytes] | None = None  # its secure-aggregation keys (bound)


class CoordinatorRound:
    """One round: its key, challenges, admissions, sealed payloads and record."""

    def __init__(self, *, gate: AttestationGate, plan: TrainPlan, run_id: str, round: int,
                 model_digest: str, keys: KeyPair | None = None, aggregator: Any = None,
                 model: Mapping[str, np.ndarray] | None = None) -> None:
        """``aggregator``: the attested aggregator (an AggregatorHandle); then ``model`` is
        the round's global model (it validates updates against it)."""
        self.gate = gate
        self.plan = plan
        self.aggregator = aggregator
        self.record = RoundRecord(round=round, run_id=run_id, model_digest=model_digest)
        if aggregator is not None:
            if model is None:
                raise ValueError("an aggregated round needs its global model")
            self.keys: KeyPair | None = None
            self.public_key: bytes = aggregator.begin_round(run_id, round, model, model_digest)
            self.record.aggregator = {"measurement": _hex(aggregator.measurement)}
        else:
            self.keys = keys or KeyPair.generate()
            self.public_key = self.keys.public_bytes
        self.phase = Phase.ATTESTING
        self._challenges: dict[int, AttestChallenge] = {}
        self._judged: set[int] = set()
        self._sessions: dict[int, Session] = {}
        self._site_nonces: dict[int, bytes] = {}
        self._aggregator_evidence: dict[int, tuple[bytes, bytes]] = {}
        self._eval_digest = ""
        self._reports: list[EvaluateReport] = []

    @property
    def round(self) -> int:
        return self.record.round

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def model_digest(self) -> str:
        return self.record.model_digest

    def _expect(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise RoundStateError(f"round {self.round} is {self.phase.value}, not "
                                  f"{' or '.join(p.value for p in phases)}")

    # ------------------------------------------------------------------ steps
    def challenges(self, node_ids: Iterable[int]) -> dict[int, AttestChallenge]:
        """What to send to attest: a fresh challenge for every node of ``node_ids`` with no
        decision yet (one whose answer rode on last round's evaluation needs none)."""
        out = {n: self.challenge(n) for n in node_ids if self.needs_challenge(n)}
        self.record.bytes_sent += sum(len(c.model_dump_json()) for c in out.values())
        return out

    def judge(self, answers: Iterable[tuple[int, Answer]]) -> list[Admission]:
        """Judge each node's answer (or the reason it has none), in the order received: the
        round's own checks first (an answer to a challenge it sent, one verdict per node, one
        node per site name), then every answer left by the gate in one call
        (:meth:`AttestationGate.admit_phase`, which makes them durable before it returns);
        the verdicts, one per answer, are filed in the order received."""
        self._expect(Phase.ATTESTING)
        answers = list(answers)
        judged = set(self._judged)
        owners = {label: entry.node_id for label, entry in self.record.sites.items()}
        screened: list[tuple[Admission | None, bool]] = []
        candidates: list[Candidate] = []
        for node_id, answer in answers:
            decided, filed = self._screen(node_id, answer, judged, owners)
            screened.append((decided, filed))
            if decided is None:
                assert not isinstance(answer, str)
                candidates.append((node_id, self._challenges[node_id], *answer))
            if filed:
                claimed = None if isinstance(answer, str) else answer[0].site
                judged.add(node_id)
                owners[self._file_label(node_id, claimed, owners)] = node_id
        gated = iter(self.gate.admit_phase(candidates))
        out = []
        for (node_id, answer), (decided, filed) in zip(answers, screened, strict=True):
            if decided is None:
                assert not isinstance(answer, str)
                response, evidence, endorsement = answer
                admission = next(gated)
                self.record.bytes_received += len(evidence) + len(endorsement)
                self.record.verify_seconds += admission.verify_seconds
                if admission.admitted and response.aggregator_nonce is not None:
                    self._site_nonces[node_id] = response.aggregator_nonce
                decided = admission
            out.append(self._apply(decided) if filed else decided)
        return out

    def _screen(self, node_id: int, answer: Answer, judged: set[int],
                owners: Mapping[str, int]) -> tuple[Admission | None, bool]:
        """The round's own verdict on one answer, given the nodes judged and the site names
        filed so far: (a refusal, or None when the gate decides; whether it is filed). A
        second answer of a judged node is refused and not filed (the first verdict stays)."""
        if isinstance(answer, str):
            if node_id in judged:
                return refused(node_id, "protocol: answered twice"), False
            return refused(node_id, answer), True
        site = answer[0].site
        if node_id not in self._challenges:
            return refused(node_id, "protocol: an answer to a challenge this round never "
                           "sent", site), True
        if node_id in judged:
            return refused(node_id, "protocol: answered twice", site), False
        label = self.gate.directory.label(node_id, site)
        if owners.get(label, node_id) != node_id:
            return refused(node_id, f"identity: site name {label!r} already answered this "
                           "round", site), True
        return None, True

    def attest(self, answers: Iterable[tuple[int, Answer]]) -> list[int]:
        """Judge ``answers`` and end the attestation phase (:meth:`end_attestation`): the
        admitted node ids."""
        self.judge(answers)
        return self.end_attestation()

    def attest_nodes(self, node_ids: Iterable[int], exchange: Exchange) -> list[int]:
        """The whole attestation phase in one call: challenge every node of ``node_ids``
        with no decision yet (:meth:`challenges`), send the challenges with ``exchange``
        (the adapter's round trip, returning the answers in the order received), judge them
        and end the phase (:meth:`attest`); the admitted node ids."""
        challenges = self.challenges(node_ids)
        start = time.perf_counter()
        answers = exchange(challenges) if challenges else []
        self.record.attestation_seconds = time.perf_counter() - start
        return self.attest(answers)

    def instructions(self, node_ids: list[int],
                     model: Mapping[str, np.ndarray] | EncodedArrays, *, direction: str,
                     model_digest: str, look_ahead: CoordinatorRound | None = None,
                     masked: Callable[[int], bytes | None] | None = None,
                     ) -> dict[int, Instruction]:
        """What to send with the model: for every admitted node of ``node_ids``, the sealed
        model (:meth:`seal`), the challenge of the ``look_ahead`` round, the aggregator's
        evidence and the ``masked`` input request. Unattested nodes get nothing."""
        out = {}
        for node_id, sealed in self.seal(node_ids, model, direction=direction,
                                         model_digest=model_digest).items():
            challenge = look_ahead.challenge(node_id) if look_ahead is not None else None
            if challenge is not None:
                self.record.bytes_sent += len(challenge.model_dump_json())
            out[node_id] = Instruction(sealed, challenge, self.aggregator_evidence(node_id),
                                       masked(node_id) if masked is not None else None)
        return out

    def updates(self, replies: Iterable[tuple[int, Reply]],
                reference: Mapping[str, np.ndarray], *, release: bool = True) -> Updates:
        """Every train reply of the round, in order: rejected, refused, opened and validated
        (or handed to the aggregator); sites that sent none are dropped
        (:meth:`end_updates`); with an aggregator and ``release``, its release
        (:meth:`aggregate`; secure aggregation releases after its unmask stages)."""
        opened: list[Opened | None] = []
        for node_id, reply in replies:
            opened.append(None)
            if node_id not in self._sessions:
                continue  # not sent a model this round
            if isinstance(reply, str):
                self.reject(node_id, reply)
            elif isinstance(reply, Refusal):
                self.refused(node_id, reply)
            elif self.aggregator is not None:
                self.submit_update(node_id, reply)  # opened only inside the enclave
            else:
                opened[-1] = self.open_update(node_id, reply, reference)
        self.end_updates()
        released = self.aggregate() if release and self.aggregator is not None else None
        return Updates(opened, released)

    # ------------------------------------------------------------------ attestation
    def challenge(self, node_id: int) -> AttestChallenge:
        """A fresh challenge for ``node_id``; it replaces an unanswered earlier one (e.g. a
        piggybacked challenge the site did not answer), whose nonce then never verifies."""
        self._expect(Phase.ATTESTING)
        if node_id in self._judged:
            raise RoundStateError(f"node {node_id} was already judged for round {self.round}")
        challenge = self.gate.challenge(run_id=self.run_id, round=self.round, node_id=node_id,
                                        model_digest=self.model_digest,
                                        coordinator_public_key=self.public_key,
                                        plan=self.plan)
        self._challenges[node_id] = challenge
        return challenge

    def needs_challenge(self, node_id: int) -> bool:
        """No decision about ``node_id`` yet (never challenged, or no answer so far)."""
        return node_id not in self._judged

    def awaiting(self, node_id: int) -> bool:
        """Challenged and not answered yet."""
        return node_id in self._challenges and node_id not in self._judged

    def admit(self, node_id: int, response: AttestResponse, evidence: bytes,
              endorsement: bytes) -> Admission:
        """Judge ``node_id``'s answer to its challenge (once; later answers are ignored)."""
        return self.judge([(node_id, (response, evidence, endorsement))])[0]

    def fail(self, node_id: int, reason: str) -> Admission:
        """A node that answered with an error or an unreadable reply (judged once, like
        :meth:`admit`: a second reply neither overwrites the first verdict nor its reason)."""
        return self.judge([(node_id, reason)])[0]

    def _file_label(self, node_id: int, claimed: str | None,
                    owners: Mapping[str, int]) -> str:
        """The name ``node_id``'s entry is filed under, given the names already filed (site
        name -> node id): its identity's label, or ``node-<id>`` if another node has that."""
        label = self.gate.directory.label(node_id, claimed)
        return label if owners.get(label, node_id) == node_id else f"node-{node_id}"

    def _apply(self, admission: Admission) -> Admission:
        node_id = admission.node_id
        self._judged.add(node_id)
        label = self._file_label(node_id, admission.site,
                                 {name: e.node_id for name, e in self.record.sites.items()})
        self.record.sites[label] = SiteRound(
            site=label, node_id=node_id, admission=admission.summary(),
            admitted=admission.admitted, reason=admission.reason,
            nonce_sha256=admission.nonce_sha256)
        if admission.admitted:
            assert admission.site_public_key is not None
            self._sessions[node_id] = Session(node_id, label, admission.site_public_key,
                                              admission.dataset_rows, admission.update_signer,
                                              admission.secagg_keys)
            if self.aggregator is not None:
                from cleanroom.coordinator.aggregator import SiteSlot

                self.aggregator.admit(self.round, SiteSlot(label, admission.update_signer,
                                                           admission.dataset_rows))
        else:
            log.warning("round %d: %s quarantined: %s", self.round, label, admission.reason)
        return admission

    def end_attestation(self, timed_out: str = "no attestation reply before the timeout",
                        ) -> list[int]:
        """Quarantine every challenged node that did not answer; make the phase durable;
        returns the admitted node ids (sorted)."""
        self._expect(Phase.ATTESTING)
        for node_id in self._challenges:
            if node_id not in self._judged:
                self._apply(refused(node_id, timed_out))
        self.phase = Phase.TRAINING
        self._attest_aggregator()
        return self.admitted

    def _attest_aggregator(self) -> None:
        """The aggregator's evidence for every admitted site that sent it a nonce (one call
        for all); a site that sent none gets none (it decides whether that is enough)."""
        if self.aggregator is None:
            return
        nonces = {self._sessions[n].site: nonce for n, nonce in self._site_nonces.items()
                  if n in self._sessions}
        if not nonces:
            return
        evidence = self.aggregator.attest_sites(self.round, nonces)
        by_site = {s.site: n for n, s in self._sessions.items()}
        for site, pair in evidence.items():
            self._aggregator_evidence[by_site[site]] = pair
            self.record.bytes_sent += len(pair[0]) + len(pair[1])
            from cleanroom.attestation.registry import evidence_digest

            self.record.sites[site].aggregator_evidence_sha256 = evidence_digest(pair[0])

    def aggregator_evidence(self, node_id: int) -> tuple[bytes, bytes] | None:
        """The aggregator's (evidence, endorsement) for ``node_id`` (None without one)."""
        return self._aggregator_evidence.get(node_id)

    @property
    def admitted(self) -> list[int]:
        return sorted(self._sessions)

    @property
    def evaluating(self) -> bool:
        return self.phase is Phase.EVALUATING

    def sessions(self) -> dict[int, Session]:
        """The sites still in this round, by node id (a copy)."""
        return dict(self._sessions)

    def site(self, node_id: int) -> str | None:
        session = self._sessions.get(node_id)
        return session.site if session else None

    def skip(self, reason: str) -> None:
        """No training this round (too few sites)."""
        self.record.skipped = reason
        log.error("round %d: %s", self.round, reason)

    # ------------------------------------------------------------------ model out
    def seal(self, node_ids: list[int], model: Mapping[str, np.ndarray] | EncodedArrays, *,
             direction: str, model_digest: str) -> dict[int, Sealed]:
        """``model`` encrypted once for the admitted nodes among ``node_ids``, each with its
        own wrapped key and context (run, round, site, digest). A node this round did not
        admit gets nothing (the caller drops its message: never send a model unattested)."""
        self._expect(Phase.TRAINING, Phase.EVALUATING)
        admitted = [n for n in node_ids if n in self._sessions]
        for node_id in set(node_ids) - set(admitted):
            log.error("round %d: a model for unattested node %d was dropped", self.round,
                      node_id)
        recipients = [(self._sessions[n].public_key,
                       EnvelopeContext(direction, self.run_id, self.round,  # type: ignore[arg-type]
                                       self._sessions[n].site, model_digest))
                      for n in admitted]
        sealed = dict(zip(admitted, seal_model(model, recipients), strict=True))
        for node_id, item in sealed.items():
            self.record.bytes_sent += item.nbytes
            if direction == "model":
                site = self._sessions[node_id].site
                self.record.sites[site].model_ciphertext_sha256 = item.sha256
        return sealed

    # ------------------------------------------------------------------ updates in
    def open_update(self, node_id: int, sealed: Sealed,
                    reference: Mapping[str, np.ndarray],
                    ) -> tuple[OrderedDict[str, np.ndarray], TrainReport] | None:
        """The site's update and report, validated; None (site rejected) on any problem."""
        self._expect(Phase.TRAINING)
        session = self._sessions.get(node_id)
        if session is None:
            return None  # a reply from a node that was not sent a model
        entry = self.record.sites[session.site]
        context = EnvelopeContext("update", self.run_id, self.round, session.site,
                                  self.model_digest)
        if self.keys is None:
            raise RoundStateError("this round's updates go to the aggregator (submit_update)")
        try:
            update, report = open_update(sealed, self.keys, context, session.update_signer)
            entry.update_ciphertext_sha256 = sealed.sha256
            self.record.bytes_received += sealed.nbytes
            check_train_report(report, self.plan, session.dataset_rows)
            bound = site_update_bound(self.plan, report, reference)
            entry.update_norm = validate_update(update, reference, max_norm=bound)
        except CleanroomError as exc:
            self.reject(node_id, f"update rejected: {exc}")
            return None
        entry.train = report
        self.record.aggregated.append(session.site)
        if report.privacy is not None:
            self.gate.ledger_grew(session.site, report.privacy.ledger_records)
        return update, report

    # ------------------------------------------------------------------ aggregator mode
    def submit_update(self, node_id: int, sealed: Sealed) -> TrainReport | None:
        """Hand ``node_id``'s sealed update to the aggregator (it opens, checks and folds it);
        the site's report when accepted, None (site rejected) otherwise."""
        self._expect(Phase.TRAINING)
        session = self._sessions.get(node_id)
        if session is None:
            return None
        entry = self.record.sites[session.site]
        entry.update_ciphertext_sha256 = sealed.sha256
        self.record.bytes_received += sealed.nbytes
        verdict = self.aggregator.submit_update(self.round, session.site, sealed)
        if not verdict.accepted:
            self.reject(node_id, verdict.reason)
            return None
        entry.train, entry.update_norm = verdict.report, verdict.norm
        self.record.aggregated.append(session.site)
        if verdict.report.privacy is not None:
            self.gate.ledger_grew(session.site, verdict.report.privacy.ledger_records)
        return verdict.report

    def aggregate(self) -> Any:
        """What the aggregator releases for this round (an ``Aggregate``)."""
        self._expect(Phase.TRAINING)
        result = self.aggregator.aggregate(self.round)
        if result.central_epsilon is not None:
            self.record.central_epsilon = result.central_epsilon
        if result.arrays is None and result.secagg is None:
            self.record.aggregated = []  # nothing of theirs left the enclave
            if result.failure:
                log.warning("round %d: no aggregate: %s", self.round, result.failure)
        if result.secagg is not None:
            info = self.record.secure_aggregation or {}
            info.update(result.secagg, survivors=list(result.sites),
                        not_in_sum=list(result.dropped))
            if result.failure:
                info["failure"] = result.failure
            self.record.secure_aggregation = info
            self.record.aggregated = list(result.sites)
        return result

    def refused(self, node_id: int, refusal: Refusal) -> None:
        """An attested site refused to release its update (typed; e.g. the aggregator did not
        attest): recorded under ``site_refusals``, the site takes no further part this
        round. It stays attested: the refusal is the coordinator's problem, not the site's."""
        session = self._sessions.pop(node_id, None)
        if session is None:
            return
        reason = f"{refusal.code}: {refusal.detail}"
        self.record.site_refusals[session.site] = reason
        self.record.sites[session.site].reason = f"refused to release its update: {reason}"
        log.warning("round %d: %s refused to release its update: %s", self.round,
                    session.site, reason)

    def reject(self, node_id: int, reason: str) -> None:
        """Drop an admitted site for the rest of this round."""
        session = self._sessions.pop(node_id, None)
        if session is None:
            return
        entry = self.record.sites[session.site]
        entry.admitted = False
        entry.reason = reason
        log.warning("round %d: %s: %s", self.round, session.site, reason)

    def end_updates(self, timed_out: str = "no training reply before the timeout") -> None:
        """Every admitted site that sent no update by now (it died, hung, lost its link) is
        dropped for the rest of the round with ``timed_out``: quarantined in the record, as
        an attestation timeout is."""
        self._expect(Phase.TRAINING)
        for node_id, session in list(self._sessions.items()):
            if self.record.sites[session.site].update_ciphertext_sha256 is None:
                self.reject(node_id, timed_out)

    def end_training(self, aggregate_digest: str | None) -> None:
        self._expect(Phase.TRAINING)
        self.record.aggregate_digest = aggregate_digest
        self.phase = Phase.EVALUATING

    # ------------------------------------------------------------------ evaluation
    def look_ahead(self, model_digest: str,
                   model: Mapping[str, np.ndarray] | None = None) -> CoordinatorRound:
        """The next round, to be challenged with this round's evaluation messages: the model
        being evaluated *is* the next round's global model, so the evidence can bind it."""
        return CoordinatorRound(gate=self.gate, plan=self.plan, run_id=self.run_id,
                                round=self.round + 1, model_digest=model_digest,
                                aggregator=self.aggregator, model=model)

    def submit_metrics(self, node_id: int, sealed: Sealed, model_digest: str) -> bool:
        """Aggregator mode: hand ``node_id``'s sealed evaluation report to the aggregator."""
        self._expect(Phase.EVALUATING)
        session = self._sessions.get(node_id)
        if session is None:
            return False
        if self.aggregator is None:
            return self.open_metrics(node_id, sealed, model_digest) is not None
        self.record.bytes_received += sealed.nbytes
        if self._eval_digest != model_digest:
            self.aggregator.begin_evaluation(self.round, model_digest)
            self._eval_digest = model_digest
        verdict = self.aggregator.submit_metrics(self.round, session.site, sealed)
        if not verdict.accepted:
            log.warning("round %d: %s: %s", self.round, session.site, verdict.reason)
        return bool(verdict.accepted)

    def release_metrics(self) -> Any:
        """The aggregator's released metrics: per site for the sites that share them, the
        example-weighted mean over all (a ``ReleasedMetrics``)."""
        self._expect(Phase.EVALUATING)
        released = self.aggregator.release_metrics(self.round)
        for site, report in released.per_site.items():
            if site in self.record.sites:
                self.record.sites[site].evaluation = report
        self.record.metrics_mean = dict(released.mean)
        self.record.metrics_sites = list(released.sites)
        return released

    def open_metrics(self, node_id: int, sealed: Sealed, model_digest: str,
                     ) -> EvaluateReport | None:
        self._expect(Phase.EVALUATING)
        session = self._sessions.get(node_id)
        if session is None:
            return None
        context = EnvelopeContext("metrics", self.run_id, self.round, session.site,
                                  model_digest)
        if self.keys is None:
            raise RoundStateError("this round's reports go to the aggregator (submit_metrics)")
        try:
            report = open_metrics(sealed, self.keys, context, session.update_signer)
        except CleanroomError as exc:
            log.warning("round %d: %s: evaluation report refused: %s", self.round,
                        session.site, exc)
            return None
        self.record.bytes_received += sealed.nbytes
        if report.share:  # the operator holds the key, but honours the site's policy
            self.record.sites[session.site].evaluation = report
        self._reports.append(report)
        return report

    def close(self) -> RoundRecord:
        """The round's record; the key and sessions are forgotten."""
        if self.phase is Phase.CLOSED:
            raise RoundStateError(f"round {self.round} is already closed")
        if self._reports and any(not r.share for r in self._reports):
            self.record.metrics_mean = metric_means(self._reports, weighted=False)
        self.phase = Phase.CLOSED
        self._sessions.clear()
        self.keys = None  # round keys live for one round
        self.discard()
        self.record.seconds = time.time() - self.record.started_at
        return self.record

    def discard(self) -> None:
        """Tell the aggregator to forget this round (its key, the model, the sums)."""
        if self.aggregator is not None:
            self.aggregator.end_round(self.round)


def _hex(value: bytes | None) -> str | None:
    return value.hex() if value else None
