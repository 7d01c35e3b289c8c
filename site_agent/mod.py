"""The confidential client mod: makes an existing Flower ClientApp attested, encrypted and
privacy-accounted, without changing its train/evaluate functions.

Usage::

    mod = ConfidentialMod(runtime_for)        # runtime_for(context) -> SiteRuntime
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg, context): ...              # sees plaintext arrays and a
                                              # "cleanroom.train" ConfigRecord with the DP
                                              # settings it must use
    @app.evaluate()
    def evaluate(msg, context): ...

    mod.install(app)                          # registers the attestation query

Per round the mod: answers ``query.cleanroom_attest`` (site policy and budget checks, a fresh
ephemeral key, evidence binding nonce + key + model digest + node key); opens the encrypted
model only with that round's key and only if it is the model the evidence bound; reserves the
DP charge in the sealed ledger before training and commits the steps actually taken before the
update leaves; seals the update to the coordinator's round key. Keys live for one round.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cleanroom.errors import ProtocolError, SiteRefusal
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.binding import Binding
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
from cleanroom.protocol.flower import (
    ATTEST_ACTION,
    ATTEST_MESSAGE_TYPE,
    ATTEST_RECORD,
    CHALLENGE_RECORD,
    attest_content,
    envelope_header,
    open_arrays,
    read_challenge,
    seal_arrays,
)
from cleanroom.protocol.wire import AttestChallenge, AttestResponse, Refusal
from cleanroom.site_agent.ledger import EpsilonMemo
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.sealed import seal_blob, unseal_blob

log = logging.getLogger(__name__)

SESSION_RECORD = "cleanroom.session"
CACHE_RECORD = "cleanroom.cache"
TRAIN_SETTINGS_RECORD = "cleanroom.train"
METRIC_STEPS = "dp-steps"
METRIC_NOISE = "dp-noise-multiplier"
METRIC_RATE = "dp-sample-rate"


@lru_cache(maxsize=256)
def noise_for(epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    from cleanroom.site_agent.training import calibrate_noise

    return float(calibrate_noise(epsilon, delta, sample_rate, total_steps))


@lru_cache(maxsize=16)
def _architecture_digest(model: str) -> str:
    from cleanroom.models import architecture_digest

    return architecture_digest(model)


@dataclass(frozen=True)
class RoundSettings:
    """What this site will do this round, decided by the site from its own config."""

    noise_multiplier: float | None  # None: no DP (only if the site allows it)
    sample_rate: float
    local_steps: int
    epsilon_target: float | None
    delta: float


def _cached(memo: EpsilonMemo | None, key: str, compute: Callable[[], object]) -> object:
    """A value kept in the node's Flower context across messages (each message may run in a
    fresh process: this spares the attestation query importing torch and Opacus). The context
    is outside the enclave's control: entries are MACed (see EpsilonMemo), a bad one is
    recomputed."""
    if memo is not None:
        text = memo.get_text(key)
        if text is not None:
            return json.loads(text)
    value = compute()
    if memo is not None:
        memo.put_text(key, json.dumps(value))
    return value


def decide_settings(runtime: SiteRuntime, challenge: AttestChallenge,
                    memo: EpsilonMemo | None = None) -> RoundSettings:
    """Apply the site's policy and budget to the coordinator's plan (raises SiteRefusal);
    ``memo`` keeps the costly answers across messages."""
    plan, privacy, policy = challenge.plan, runtime.config.privacy, runtime.config.policy
    if policy.coordinators and challenge.coordinator_id not in policy.coordinators:
        raise SiteRefusal("coordinator-not-allowed", f"coordinator {challenge.coordinator_id[:16]}"
                          "... is not in this site's policy")
    if policy.models and plan.model_architecture_digest not in policy.models:
        raise SiteRefusal("model-not-allowed", f"model {plan.model} (architecture "
                          f"{plan.model_architecture_digest[:16]}...) is not allowed by this "
                          "site's policy")
    if policy.require_approval and not runtime.approvals.is_approved(challenge.run_id):
        raise SiteRefusal("approval-required", f"run {challenge.run_id} is not approved by "
                          f"site {runtime.site}: approve it with 'cleanroom site approve "
                          f"{challenge.run_id}'")
    digest = _cached(memo, f"arch:{plan.model}", lambda: _architecture_digest(plan.model))
    if digest != plan.model_architecture_digest:
        raise SiteRefusal("model-mismatch", f"plan names model {plan.model} but its digest "
                          "differs from this site's definition")
    if not plan.dp.enabled:
        if not privacy.allow_no_dp:
            raise SiteRefusal("dp-required", "this site only trains with differential privacy")
        return RoundSettings(None, plan.sample_rate, plan.local_steps, None, privacy.delta)
    epsilon = min(plan.dp.epsilon, privacy.max_epsilon_per_run)
    steps = plan.rounds * plan.local_steps
    sigma = float(_cached(memo, f"sigma:{epsilon!r}:{privacy.delta!r}:{plan.sample_rate!r}:"  # type: ignore[arg-type]
                          f"{steps}", lambda: noise_for(epsilon, privacy.delta,
                                                        plan.sample_rate, steps)))
    return RoundSettings(sigma, plan.sample_rate, plan.local_steps, epsilon, privacy.delta)


class ConfidentialMod:
    """Flower client mod adding attestation, end-to-end encryption and DP accounting."""

    def __init__(self, runtime_for: Callable[[Context], SiteRuntime]) -> None:
        self.runtime_for = runtime_for

    # Flower calls mods as mod(message, context, call_next)
    def __call__(self, msg: Message, ctx: Context,
                 call_next: Callable[[Message, Context], Message]) -> Message:
        mtype = msg.metadata.message_type
        if mtype == ATTEST_MESSAGE_TYPE:
            return self._attest(msg, ctx)
        if mtype.split(".")[0] == "train":
            return self._train(msg, ctx, call_next)
        if mtype.split(".")[0] == "evaluate":
            return self._evaluate(msg, ctx, call_next)
        return call_next(msg, ctx)

    def install(self, app: ClientApp) -> ClientApp:
        """Register the attestation query on ``app`` (the mod itself answers it)."""

        @app.query(ATTEST_ACTION)
        def _attest_query(msg: Message, ctx: Context) -> Message:
            raise ProtocolError("attestation query reached the app: ConfidentialMod must be "
                                "in ClientApp(mods=[...])")

        return app

    # ------------------------------------------------------------------ attestation
    def _attest(self, msg: Message, ctx: Context) -> Message:
        return Message(self._answer(read_challenge(msg.content), ctx), reply_to=msg)

    def _answer(self, challenge: AttestChallenge, ctx: Context) -> RecordDict:
        """The attestation answer to ``challenge`` (or a typed refusal); on success the new
        round's session key is sealed into the node's context."""
        runtime = self.runtime_for(ctx)
        response_base = {"site": runtime.site, "run_id": challenge.run_id,
                         "round": challenge.round, "nonce": challenge.nonce.hex(),
                         "provider": runtime.provider.name,
                         "node_public_key": runtime.node_public_key.hex()}
        try:
            settings = decide_settings(runtime, challenge, _use_memo(runtime, ctx))
            if settings.noise_multiplier is not None:
                runtime.ledger.check(challenge.run_id, challenge.round,
                                     settings.noise_multiplier, settings.sample_rate,
                                     settings.local_steps)
        except SiteRefusal as refusal:
            log.info("site %s refuses run %s round %d: %s", runtime.site, challenge.run_id,
                     challenge.round, refusal.code)
            runtime.activity.record("refused", challenge.run_id, challenge.round,
                                    code=refusal.code, detail=refusal.detail)
            response = AttestResponse.model_validate(
                {**response_base, "refusal": Refusal(code=refusal.code, detail=refusal.detail)})
            return attest_content(response)

        keys = KeyPair.generate()
        ledger_records, ledger_head = runtime.ledger.state()
        anchor = challenge.ledger_anchor
        anchor_head = runtime.ledger.head_at(anchor.records) if anchor else None
        binding = Binding(run_id=challenge.run_id, round=challenge.round, site=runtime.site,
                          nonce=challenge.nonce, site_public_key=keys.public_bytes,
                          model_digest=challenge.model_digest,
                          node_public_key=runtime.node_public_key,
                          ledger_records=ledger_records, ledger_head=ledger_head,
                          ledger_anchor_head=anchor_head or "" if anchor else "")
        evidence = runtime.provider.evidence(binding.report_data())
        session = {"run_id": challenge.run_id, "round": challenge.round,
                   "private_key": keys.private_bytes().hex(),
                   "challenge": challenge.model_dump_json()}
        ctx.state[SESSION_RECORD] = ConfigRecord({
            "run_id": challenge.run_id, "round": challenge.round,
            "sealed": seal_blob(runtime.session_key(), json.dumps(session).encode(),
                                self._session_label(runtime, challenge.run_id))})
        response = AttestResponse.model_validate(
            {**response_base, "site_public_key": keys.public_bytes.hex(),
             "ledger_records": ledger_records, "ledger_head": ledger_head,
             "ledger_anchor_head": anchor_head})
        log.info("site %s attested run %s round %d (evidence sha256 prefix %s)", runtime.site,
                 challenge.run_id, challenge.round, _digest(evidence.data)[:16])
        runtime.activity.record("attested", challenge.run_id, challenge.round,
                                evidence_sha256=_digest(evidence.data),
                                model_digest=challenge.model_digest,
                                coordinator=challenge.coordinator_id)
        return attest_content(response, evidence.data, evidence.endorsement)

    @staticmethod
    def _session_label(runtime: SiteRuntime, run_id: str) -> bytes:
        return f"session/{runtime.site}/{run_id}".encode()

    def _session(self, ctx: Context, runtime: SiteRuntime) -> tuple[KeyPair, AttestChallenge]:
        record = ctx.state.config_records.get(SESSION_RECORD)
        if record is None:
            raise ProtocolError("no attested session for this round: the site must attest "
                                "before it receives a model")
        raw = unseal_blob(runtime.session_key(), record["sealed"],  # type: ignore[arg-type]
                          self._session_label(runtime, str(record["run_id"])))
        session = json.loads(raw)
        return (KeyPair.from_private_bytes(bytes.fromhex(session["private_key"])),
                AttestChallenge.model_validate_json(session["challenge"]))

    # ------------------------------------------------------------------ train
    def _train(self, msg: Message, ctx: Context,
               call_next: Callable[[Message, Context], Message]) -> Message:
        runtime = self.runtime_for(ctx)
        keys, challenge = self._session(ctx, runtime)
        header = envelope_header(msg.content)
        if (header.run_id, header.round) != (challenge.run_id, challenge.round):
            raise ProtocolError(f"model for run {header.run_id} round {header.round} but the "
                                f"attested session is run {challenge.run_id} round "
                                f"{challenge.round}")
        context = EnvelopeContext("model", challenge.run_id, challenge.round, runtime.site,
                                  challenge.model_digest)
        plain, arrays = open_arrays(msg.content, keys, context)
        if arrays_digest(arrays) != challenge.model_digest:
            raise ProtocolError("decrypted model differs from the model digest bound in this "
                                "round's attestation")
        settings = decide_settings(runtime, challenge, _use_memo(runtime, ctx))
        plan = challenge.plan
        if settings.noise_multiplier is not None:
            runtime.ledger.reserve(challenge.run_id, challenge.round, settings.noise_multiplier,
                                   settings.sample_rate, settings.local_steps)
        plain[TRAIN_SETTINGS_RECORD] = ConfigRecord({
            "model": plan.model, "local-steps": settings.local_steps,
            "sample-rate": settings.sample_rate, "lr": plan.lr, "optimizer": plan.optimizer,
            "momentum": plan.momentum, "max-grad-norm": plan.dp.max_grad_norm,
            "noise-multiplier": settings.noise_multiplier or 0.0,
            "dp": settings.noise_multiplier is not None,
            "seed": (runtime.config.seed * 1_000_003 + challenge.round) % (2**31),
            "secure-noise": not runtime.config.reproducible_noise,
        })
        msg.content = plain
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        metrics = _single_metrics(reply)
        if settings.noise_multiplier is not None:
            steps = int(metrics.get(METRIC_STEPS, -1))  # type: ignore[arg-type]
            if steps < 0 or abs(float(metrics.get(METRIC_NOISE, 0.0)) -  # type: ignore[arg-type]
                                settings.noise_multiplier) > 1e-9:
                raise ProtocolError("training did not report the DP steps and noise it used; "
                                    "the update is withheld")
            projection = runtime.ledger.commit(challenge.run_id, challenge.round, steps)
            metrics["epsilon-round"] = projection.epsilon_round
            metrics["epsilon-run"] = projection.epsilon_run
            metrics["epsilon-lifetime"] = projection.epsilon_lifetime
            metrics["delta"] = settings.delta
            metrics["ledger-records"] = runtime.ledger.state()[0]
            if challenge.round < plan.rounds:  # Opacus is loaded now: answer the next
                runtime.ledger.project(  # round's budget check ahead, for its attestation
                    challenge.run_id, challenge.round + 1, settings.noise_multiplier,
                    settings.sample_rate, settings.local_steps)
        runtime.activity.record("trained", challenge.run_id, challenge.round,
                                steps=int(metrics.get(METRIC_STEPS, 0)),  # type: ignore[arg-type]
                                epsilon_run=metrics.get("epsilon-run"))
        sealed, _ = seal_arrays(reply.content, challenge.coordinator_public_key,
                                EnvelopeContext("update", challenge.run_id, challenge.round,
                                                runtime.site, challenge.model_digest))
        reply.content = sealed
        return reply

    # ------------------------------------------------------------------ evaluate
    def _evaluate(self, msg: Message, ctx: Context,
                  call_next: Callable[[Message, Context], Message]) -> Message:
        runtime = self.runtime_for(ctx)
        keys, challenge = self._session(ctx, runtime)
        header = envelope_header(msg.content)
        if (header.run_id, header.round) != (challenge.run_id, challenge.round):
            raise ProtocolError("evaluation model is not for this round's attested session")
        context = EnvelopeContext("evaluate", challenge.run_id, challenge.round, runtime.site,
                                  header.model_digest)
        plain, arrays = open_arrays(msg.content, keys, context)
        if arrays_digest(arrays) != header.model_digest:
            raise ProtocolError("decrypted evaluation model differs from its header digest")
        next_challenge = read_challenge(msg.content) \
            if CHALLENGE_RECORD in msg.content.config_records else None
        if next_challenge is not None and (next_challenge.run_id, next_challenge.round,
                                           next_challenge.model_digest) != (
                challenge.run_id, challenge.round + 1, header.model_digest):
            raise ProtocolError("the piggybacked challenge is not for the next round of this "
                                "run and the model being evaluated")
        msg.content = plain
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        if reply.content.array_records:
            raise ProtocolError("evaluation reply must not carry arrays")
        if next_challenge is not None:  # attest for the next round in the same reply
            answer = self._answer(next_challenge, ctx)
            reply.content[ATTEST_RECORD] = answer[ATTEST_RECORD]
        return reply


def _use_memo(runtime: SiteRuntime, ctx: Context) -> EpsilonMemo:
    """The MACed memo over the node's context for this message (see EpsilonMemo), shared by
    the settings cache and the ledger's accountant answers."""
    memo = EpsilonMemo(_cache(ctx), runtime.provider.sealing_key(b"eps-memo"))
    runtime.ledger.memo = memo
    return memo


def _cache(ctx: Context) -> ConfigRecord:
    if CACHE_RECORD not in ctx.state.config_records:
        ctx.state[CACHE_RECORD] = ConfigRecord()
    return ctx.state.config_records[CACHE_RECORD]


def _single_metrics(reply: Message) -> MetricRecord:
    records = list(reply.content.metric_records.values())
    if len(records) != 1:
        raise ProtocolError(f"train reply must carry one MetricRecord, found {len(records)}")
    return records[0]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

