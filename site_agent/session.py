"""The site's side of one round of the confidential protocol, Flower-free.

:class:`SiteProtocol` answers a challenge (policy and budget checks, a fresh ephemeral key,
evidence binding nonce + key + model + node key + ledger state, or a typed refusal), opens a
sealed model only with that round's key and only if it is the model the evidence bound,
trains it with the site's :class:`SiteTrainer` under the settings the site decided, charges
the sealed privacy ledger (reserve before, commit the steps taken before the update leaves),
and seals the update *with its report* to the coordinator's round key. The round's secrets
(the ephemeral private key and the challenge) travel between messages only sealed with the
enclave's key (:class:`SessionBlob`); the Flower mod (:mod:`cleanroom.site_agent.mod`) just
stores that blob in the node's context.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.errors import ProtocolError, SiteRefusal
from cleanroom.protocol.binding import AggregatorBinding, Binding
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair, signer_public_bytes
from cleanroom.protocol.payload import (
    Sealed,
    open_model,
    seal_masked_update,
    seal_metrics,
    seal_update,
)
from cleanroom.protocol.reports import EvaluateReport, PrivacySpend, TrainReport
from cleanroom.protocol.secagg import SiteSecAgg
from cleanroom.protocol.wire import AttestChallenge, AttestResponse, Refusal, TrainPlan
from cleanroom.site_agent.ledger import EpsilonMemo
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.sealed import seal_blob, unseal_blob
from cleanroom.site_agent.settings import RoundSettings, decide_settings, round_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """What a trainer did; ``(noise_multiplier, sample_rate, steps)`` is the charge."""

    parameters: OrderedDict[str, np.ndarray]
    steps: int
    num_examples: int
    noise_multiplier: float | None
    sample_rate: float
    train_loss: float


class SiteTrainer(Protocol):
    """The site's trusted trainer: it, not the task, owns the data and the DP."""

    def train(self, runtime: SiteRuntime, plan: TrainPlan,
              arrays: Mapping[str, np.ndarray], settings: RoundSettings, seed: int,
              strategy_config: Mapping[str, Any]) -> TrainOutcome: ...

    def evaluate(self, runtime: SiteRuntime, plan: TrainPlan,
                 arrays: Mapping[str, np.ndarray]) -> EvaluateReport: ...


@dataclass(frozen=True)
class Answer:
    """The reply to a challenge; ``session`` (sealed) is set when the site attested."""

    response: AttestResponse
    evidence: bytes = b""
    endorsement: bytes = b""
    session: SessionBlob | None = None


@dataclass(frozen=True)
class _Round:
    """One round's secrets, unsealed for the message at hand."""

    keys: KeyPair
    signer: ed25519.Ed25519PrivateKey
    challenge: AttestChallenge
    aggregator_nonce: bytes | None = None  # the site's challenge to the aggregator
    secrets: dict[str, Any] | None = None  # as sealed (to re-seal an updated session)


@dataclass(frozen=True)
class SessionBlob:
    """One round's secrets, sealed with the enclave's session key (safe to store outside)."""

    run_id: str
    round: int
    sealed: bytes


def _digest(data: bytes) -> str:
    """The evidence digest the coordinator records too (canonical: padding-independent)."""
    from cleanroom.attestation.registry import evidence_digest

    return evidence_digest(data)


class SiteProtocol:
    """One site's protocol steps for one message (cheap to build per message)."""

    def __init__(self, runtime: SiteRuntime, trainer: SiteTrainer,
                 memo: EpsilonMemo | None = None) -> None:
        self.runtime = runtime
        self.trainer = trainer
        self.memo = memo
        if memo is not None:
            runtime.ledger.memo = memo

    # ------------------------------------------------------------------ attestation
    def answer(self, challenge: AttestChallenge) -> Answer:
        """The attestation answer to ``challenge``, or a typed refusal."""
        runtime = self.runtime
        base = {"site": runtime.site, "run_id": challenge.run_id, "round": challenge.round,
                "nonce": challenge.nonce.hex(), "provider": runtime.provider.name,
                "node_public_key": runtime.node_public_key.hex()}
        try:
            settings = decide_settings(runtime, challenge, self.memo)
            if settings.noise_multiplier is not None:
                runtime.ledger.check(challenge.run_id, challenge.round,
                                     settings.noise_multiplier, settings.sample_rate,
                                     settings.local_steps)
        except SiteRefusal as refusal:
            log.info("site %s refuses run %s round %d: %s", runtime.site, challenge.run_id,
                     challenge.round, refusal.code)
            runtime.activity.record("refused", challenge.run_id, challenge.round,
                                    code=refusal.code, detail=refusal.detail)
            return Answer(AttestResponse.model_validate(
                {**base, "refusal": Refusal(code=refusal.code, detail=refusal.detail)}))
        keys = KeyPair.generate()  # the round's HPKE key: the model is sealed to it
        signer = ed25519.Ed25519PrivateKey.generate()  # signs this round's update and reports
        aggregator_nonce = os.urandom(32)  # the site's own challenge to the aggregator
        secagg = SiteSecAgg(runtime.site, challenge.run_id, challenge.round) \
            if challenge.plan.secure_aggregation else None
        advert = secagg.advertisement if secagg is not None else None
        ledger_records, ledger_head = runtime.ledger.state()
        anchor = challenge.ledger_anchor
        anchor_head = runtime.ledger.head_at(anchor.records) if anchor else None
        task = challenge.plan.task
        binding = Binding(run_id=challenge.run_id, round=challenge.round, site=runtime.site,
                          nonce=challenge.nonce, site_public_key=keys.public_bytes,
                          model_digest=challenge.model_digest,
                          node_public_key=runtime.node_public_key,
                          ledger_records=ledger_records, ledger_head=ledger_head,
                          ledger_anchor_head=anchor_head or "" if anchor else "",
                          task_digest=task.digest, dataset_digest=settings.dataset_digest,
                          dataset_rows=settings.dataset_rows,
                          update_signer=signer_public_bytes(signer),
                          secagg_keys=advert.digest() if advert is not None else b"")
        evidence = runtime.provider.for_task(task.digest).evidence(binding.report_data())
        secrets = {"private_key": keys.private_bytes().hex(),
                   "signing_key": signer.private_bytes_raw().hex(),
                   "aggregator_nonce": aggregator_nonce.hex(),
                   "challenge": challenge.model_dump_json()}
        if secagg is not None:
            secrets["secagg"] = secagg.export_state().decode()
        blob = self._seal_session(challenge.run_id, challenge.round, secrets)
        response = AttestResponse.model_validate(
            {**base, "site_public_key": keys.public_bytes.hex(),
             "ledger_records": ledger_records, "ledger_head": ledger_head,
             "ledger_anchor_head": anchor_head, "task_digest": task.digest,
             "update_signer_key": signer_public_bytes(signer).hex(),
             "dataset_digest": settings.dataset_digest or None,
             "dataset_rows": settings.dataset_rows,
             "aggregator_nonce": aggregator_nonce.hex(),
             "secagg_channel_key": advert.channel_key.hex() if advert else None,
             "secagg_mask_key": advert.mask_key.hex() if advert else None})
        log.info("site %s attested run %s round %d (evidence sha256 prefix %s)", runtime.site,
                 challenge.run_id, challenge.round, _digest(evidence.data)[:16])
        runtime.activity.record("attested", challenge.run_id, challenge.round,
                                evidence_sha256=_digest(evidence.data),
                                model_digest=challenge.model_digest,
                                task=task.name, task_digest=task.digest,
                                dataset_digest=settings.dataset_digest,
                                coordinator=challenge.coordinator_id)
        return Answer(response, evidence.data, evidence.endorsement, blob)

    def _seal_session(self, run_id: str, round: int, secrets: dict[str, Any]) -> SessionBlob:
        return SessionBlob(run_id, round, seal_blob(self.runtime.session_key(),
                                                    json.dumps(secrets).encode(),
                                                    self._label(run_id)))

    def _label(self, run_id: str) -> bytes:
        return f"session/{self.runtime.site}/{run_id}".encode()

    def _session(self, blob: SessionBlob | None) -> _Round:
        if blob is None:
            raise ProtocolError("no attested session for this round: the site must attest "
                                "before it receives a model")
        raw = unseal_blob(self.runtime.session_key(), blob.sealed, self._label(blob.run_id))
        secrets = json.loads(raw)
        nonce = secrets.get("aggregator_nonce")
        return _Round(KeyPair.from_private_bytes(bytes.fromhex(secrets["private_key"])),
                      ed25519.Ed25519PrivateKey.from_private_bytes(
                          bytes.fromhex(secrets["signing_key"])),
                      AttestChallenge.model_validate_json(secrets["challenge"]),
                      bytes.fromhex(nonce) if nonce else None, secrets)

    # ------------------------------------------------------------------ secure aggregation
    def _secagg(self, session: _Round) -> SiteSecAgg:
        state = (session.secrets or {}).get("secagg")
        if state is None:
            raise ProtocolError("this round's session has no secure aggregation (the plan "
                                "the site attested for did not ask for it)")
        return SiteSecAgg.restore(state.encode())

    def _with_secagg(self, session: _Round, secagg: SiteSecAgg) -> SessionBlob:
        """The session re-sealed with the secure-aggregation state after a step."""
        challenge = session.challenge
        secrets = {**(session.secrets or {}), "secagg": secagg.export_state().decode()}
        return self._seal_session(challenge.run_id, challenge.round, secrets)

    def secagg_step(self, blob: SessionBlob | None, stage: str, message: bytes,
                    ) -> tuple[bytes, SessionBlob]:
        """One secure-aggregation stage (share-keys, consistency, unmask) of this round:
        the aggregator's request in, this site's reply out, the session re-sealed. A
        :class:`SecAggError` (typed, with a code) ends the site's part in the round."""
        from cleanroom.protocol import secagg_wire as wire

        session = self._session(blob)
        secagg = self._secagg(session)
        kinds = {"share-keys": (wire.ShareKeysRequest, secagg.share_keys),
                 "consistency": (wire.ConsistencyRequest, secagg.consistency),
                 "unmask": (wire.UnmaskRequest, secagg.unmask)}
        if stage not in kinds:
            raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")
        kind, step = kinds[stage]
        try:
            reply = step(wire.decode(kind, message))  # type: ignore[operator]
        finally:
            blob = self._with_secagg(session, secagg)  # an aborted state stays aborted
        challenge = session.challenge
        self.runtime.activity.record("secagg", challenge.run_id, challenge.round, stage=stage)
        return wire.encode(reply), blob

    def _verify_aggregator(self, session: _Round, record: tuple[bytes, bytes] | None,
                           what: str) -> bool:
        """Whether the round key the site seals to belongs to an aggregator enclave this site
        verified now (evidence binding its own nonce, the run, round, site, key and model,
        checked against its aggregator policy); a typed refusal when it must but cannot."""
        from cleanroom.attestation.evidence import verify_evidence
        from cleanroom.attestation.registry import Endorsements

        runtime, challenge = self.runtime, session.challenge
        trust, policy = runtime.config.aggregator, runtime.aggregator_policy
        if record is None or policy is None:
            if trust.required:
                raise SiteRefusal("aggregator-unattested", f"the coordinator sent no evidence "
                                  f"of an aggregator enclave with this {what}; this site "
                                  "releases its work only to an attested aggregator")
            return False
        if session.aggregator_nonce is None:
            raise SiteRefusal("aggregator-attestation", "this round's session holds no nonce "
                              "for the aggregator")
        evidence, endorsement = record
        binding = AggregatorBinding(run_id=challenge.run_id, round=challenge.round,
                                    site=runtime.site, site_nonce=session.aggregator_nonce,
                                    aggregator_public_key=challenge.coordinator_public_key,
                                    model_digest=challenge.model_digest)
        verdict = verify_evidence(
            evidence, policy=policy.model_copy(update={"report_data": binding.report_data()}),
            endorsements=Endorsements(key_certificate=endorsement or None))
        if not verdict.accepted:
            runtime.activity.record("refused", challenge.run_id, challenge.round,
                                    code="aggregator-attestation", detail=verdict.summary)
            raise SiteRefusal("aggregator-attestation", "the coordinator's aggregator evidence "
                              f"does not verify: {verdict.summary}")
        runtime.activity.record("aggregator-verified", challenge.run_id, challenge.round,
                                evidence_sha256=verdict.evidence_sha256,
                                measurement=verdict.claims.measurement.hex()
                                if verdict.claims is not None else None)
        return True

    def _open(self, blob: SessionBlob | None, sealed: Sealed, direction: str,
              ) -> tuple[_Round, OrderedDict[str, np.ndarray]]:
        session = self._session(blob)
        keys, challenge = session.keys, session.challenge
        header = sealed.header
        if (header.run_id, header.round) != (challenge.run_id, challenge.round):
            raise ProtocolError(f"{direction} for run {header.run_id} round {header.round} but "
                                f"the attested session is run {challenge.run_id} round "
                                f"{challenge.round}")
        digest = challenge.model_digest if direction == "model" else header.model_digest
        context = EnvelopeContext(direction, challenge.run_id, challenge.round,  # type: ignore[arg-type]
                                  self.runtime.site, digest)
        try:
            arrays = open_model(sealed, keys, context)  # checks the model digest
        except ProtocolError as exc:
            raise ProtocolError(f"the {direction} received is not the model "
                                + ("bound in this round's attestation" if direction == "model"
                                   else "its header names") + f": {exc}") from None
        return session, arrays

    # ------------------------------------------------------------------ train
    def train(self, blob: SessionBlob | None, sealed: Sealed,
              strategy_config: Mapping[str, Any],
              aggregator: tuple[bytes, bytes] | None = None,
              secagg_request: bytes | None = None) -> tuple[Sealed, SessionBlob | None]:
        """Train on the sealed global model; returns the sealed update and report (and,
        under secure aggregation, the re-sealed session: the update leaves masked).
        ``aggregator``: the coordinator's aggregator evidence; verified before any budget is
        reserved (a :class:`SiteRefusal` when the site's trust settings are not met)."""
        runtime = self.runtime
        session, arrays = self._open(blob, sealed, "model")
        challenge = session.challenge
        self._verify_aggregator(session, aggregator, "model")
        secagg = None
        if challenge.plan.secure_aggregation:
            if secagg_request is None:
                raise ProtocolError("the plan uses secure aggregation but the instruction "
                                    "carries no masked-input request")
            secagg = self._secagg(session)
        settings = decide_settings(runtime, challenge, self.memo)
        plan = challenge.plan
        if settings.noise_multiplier is not None:
            runtime.ledger.reserve(challenge.run_id, challenge.round, settings.noise_multiplier,
                                   settings.sample_rate, settings.local_steps)
        outcome = self.trainer.train(runtime, plan, arrays, settings,
                                     round_seed(runtime.config.seed, challenge.round),
                                     strategy_config)
        privacy = None
        if settings.noise_multiplier is not None:
            if outcome.noise_multiplier != settings.noise_multiplier or \
                    outcome.sample_rate != settings.sample_rate:
                raise ProtocolError("training did not use the DP settings this site decided; "
                                    "the update is withheld")
            projection = runtime.ledger.commit(challenge.run_id, challenge.round, outcome.steps)
            privacy = PrivacySpend(
                noise_multiplier=settings.noise_multiplier, sample_rate=settings.sample_rate,
                steps=outcome.steps, epsilon_round=projection.epsilon_round,
                epsilon_run=projection.epsilon_run,
                epsilon_lifetime=projection.epsilon_lifetime, delta=settings.delta,
                ledger_records=runtime.ledger.state()[0])
            if challenge.round < plan.rounds:  # Opacus is loaded now: answer the next
                runtime.ledger.project(  # round's budget check ahead, for its attestation
                    challenge.run_id, challenge.round + 1, settings.noise_multiplier,
                    settings.sample_rate, settings.local_steps)
        report = TrainReport(num_examples=outcome.num_examples, steps=outcome.steps,
                             privacy=privacy,
                             train_loss=None if settings.dp else outcome.train_loss)
        runtime.activity.record("trained", challenge.run_id, challenge.round,
                                steps=outcome.steps,
                                epsilon_run=privacy.epsilon_run if privacy else None)
        context = EnvelopeContext("update", challenge.run_id, challenge.round, runtime.site,
                                  challenge.model_digest)
        if secagg is None:
            return seal_update(outcome.parameters, report, challenge.coordinator_public_key,
                               context, session.signer), None
        masked = self._mask(secagg, secagg_request, challenge.plan, arrays,  # type: ignore[arg-type]
                            outcome.parameters, report)
        return (seal_masked_update(masked, report, challenge.coordinator_public_key, context,
                                   session.signer), self._with_secagg(session, secagg))

    def _mask(self, secagg: SiteSecAgg, request: bytes, plan: TrainPlan,
              model: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray],
              report: TrainReport) -> Any:
        """The masked input: this site's delta, checked against its own update bound here in
        the attested site (the aggregator only ever sees the masked sum), clipped to the
        central DP clip when there is one (then every site weighs 1)."""
        from cleanroom.bounds import update_bound
        from cleanroom.errors import UpdateRejected
        from cleanroom.protocol import secagg_wire as wire
        from cleanroom.protocol.secagg import flatten_arrays

        if list(update) != list(model):
            raise UpdateRejected("the trained parameters do not match the model's names")
        delta, _ = flatten_arrays({k: np.asarray(update[k], np.float64) - model[k]
                                   for k in model})
        norm = float(np.linalg.norm(delta))
        sigma = report.privacy.noise_multiplier if report.privacy is not None else None
        bound = update_bound(plan, noise_multiplier=sigma, n_examples=max(1, report.num_examples),
                             n_params=int(delta.size))
        if not np.isfinite(norm) or norm > bound:
            raise UpdateRejected(f"update norm {norm:.4g} exceeds this site's bound "
                                 f"{bound:.4g}: withheld")
        weight = report.num_examples
        if plan.central_clip is not None:
            delta = delta * min(1.0, plan.central_clip / norm) if norm > 0 else delta
            weight = 1
        return secagg.masked_input(wire.decode(wire.MaskedInputRequest, request), delta, weight)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, blob: SessionBlob | None, sealed: Sealed,
                 next_challenge: AttestChallenge | None,
                 aggregator: tuple[bytes, bytes] | None = None,
                 ) -> tuple[Sealed | Refusal, Answer | None]:
        """Evaluate the sealed model; answer the piggybacked next-round challenge, if any.
        The site's own metrics go to an operator only if its policy shares them; else only to
        an attested aggregator (a :class:`Refusal` in place of the report otherwise)."""
        session, arrays = self._open(blob, sealed, "evaluate")
        challenge = session.challenge
        digest = sealed.header.model_digest
        if next_challenge is not None and (next_challenge.run_id, next_challenge.round,
                                           next_challenge.model_digest) != (
                challenge.run_id, challenge.round + 1, digest):
            raise ProtocolError("the piggybacked challenge is not for the next round of this "
                                "run and the model being evaluated")
        share = self.runtime.config.policy.share_metrics
        try:
            attested = self._verify_aggregator(session, aggregator, "evaluation")
            if not share and not attested:
                raise SiteRefusal("metrics-not-shared", "this site shares its own metrics "
                                  "only with an attested aggregator (policy.share_metrics = "
                                  "false)")
        except SiteRefusal as refusal:
            answer = self.answer(next_challenge) if next_challenge is not None else None
            return Refusal(code=refusal.code, detail=refusal.detail), answer
        report = self.trainer.evaluate(self.runtime, challenge.plan, arrays)
        report = report.model_copy(update={"share": share})
        sealed_report = seal_metrics(report, challenge.coordinator_public_key,
                                     EnvelopeContext("metrics", challenge.run_id,
                                                     challenge.round, self.runtime.site, digest),
                                     session.signer)
        answer = self.answer(next_challenge) if next_challenge is not None else None
        return sealed_report, answer
