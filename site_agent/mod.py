"""The confidential client mod: the site's protocol (:mod:`cleanroom.site_agent.session`) as a
Flower mod, so a ClientApp becomes attested, encrypted and privacy-accounted by adding it.

Usage::

    mod = ConfidentialMod(runtime_for)        # runtime_for(context) -> SiteRuntime
    app = mod.install(ClientApp(mods=[mod]))  # registers the attestation query

The mod answers ``query.cleanroom_attest``, and it answers train and evaluate messages itself
with the site's trusted trainer (the app's own handlers never see the model: the site, not the
app, owns the data and the DP). This module only moves bytes between Flower records and the
protocol; every decision is in :class:`~cleanroom.site_agent.session.SiteProtocol`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from cleanroom.errors import ProtocolError
from cleanroom.protocol.flower import (
    ATTEST_ACTION,
    ATTEST_MESSAGE_TYPE,
    attest_content,
    attest_record,
    has_challenge,
    read_challenge,
    read_envelope,
    reply_content,
    strategy_config,
)
from cleanroom.site_agent.ledger import EpsilonMemo
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.session import Answer, SessionBlob, SiteProtocol, SiteTrainer

log = logging.getLogger(__name__)

SESSION_RECORD = "cleanroom.session"  # node context: this round's sealed session blob
CACHE_RECORD = "cleanroom.cache"  # node context: MACed memo of costly answers


class ConfidentialMod:
    """Flower client mod adding attestation, end-to-end encryption and DP accounting."""

    def __init__(self, runtime_for: Callable[[Context], SiteRuntime],
                 trainer: SiteTrainer | None = None) -> None:
        if trainer is None:
            from cleanroom.site_agent.trainers import TaskTrainer

            trainer = TaskTrainer()
        self.runtime_for = runtime_for
        self.trainer = trainer

    def __call__(self, msg: Message, ctx: Context,
                 call_next: Callable[[Message, Context], Message]) -> Message:
        mtype = msg.metadata.message_type
        if mtype == ATTEST_MESSAGE_TYPE:
            return self._attest(msg, ctx)
        category = mtype.split(".")[0]
        if category == "train":
            return self._train(msg, ctx)
        if category == "evaluate":
            return self._evaluate(msg, ctx)
        return call_next(msg, ctx)

    def install(self, app: ClientApp) -> ClientApp:
        """Register the attestation query on ``app`` (the mod itself answers it)."""

        @app.query(ATTEST_ACTION)
        def _attest_query(msg: Message, ctx: Context) -> Message:
            raise ProtocolError("attestation query reached the app: ConfidentialMod must be "
                                "in ClientApp(mods=[...])")

        return app

    def _protocol(self, ctx: Context) -> SiteProtocol:
        runtime = self.runtime_for(ctx)
        if CACHE_RECORD not in ctx.state.config_records:
            ctx.state[CACHE_RECORD] = ConfigRecord()
        memo = EpsilonMemo(ctx.state.config_records[CACHE_RECORD],
                           runtime.provider.sealing_key(b"eps-memo"))
        return SiteProtocol(runtime, self.trainer, memo)

    @staticmethod
    def _keep(ctx: Context, answer: Answer | None) -> None:
        if answer is not None and answer.session is not None:
            blob = answer.session
            ctx.state[SESSION_RECORD] = ConfigRecord({"run_id": blob.run_id,
                                                      "round": blob.round,
                                                      "sealed": blob.sealed})

    @staticmethod
    def _blob(ctx: Context) -> SessionBlob | None:
        record = ctx.state.config_records.get(SESSION_RECORD)
        if record is None:
            return None
        sealed = record.get("sealed")
        if not isinstance(sealed, bytes):
            raise ProtocolError("the node's session record is damaged")
        return SessionBlob(str(record.get("run_id")), int(record.get("round", 0)),  # type: ignore[arg-type]
                           sealed)

    def _attest(self, msg: Message, ctx: Context) -> Message:
        answer = self._protocol(ctx).answer(read_challenge(msg.content))
        self._keep(ctx, answer)
        return Message(attest_content(answer.response, answer.evidence, answer.endorsement),
                       reply_to=msg)

    def _train(self, msg: Message, ctx: Context) -> Message:
        sealed = self._protocol(ctx).train(self._blob(ctx), read_envelope(msg.content),
                                           dict(strategy_config(msg.content)))
        return Message(reply_content(sealed), reply_to=msg)

    def _evaluate(self, msg: Message, ctx: Context) -> Message:
        next_challenge = read_challenge(msg.content) if has_challenge(msg.content) else None
        sealed, answer = self._protocol(ctx).evaluate(self._blob(ctx),
                                                      read_envelope(msg.content),
                                                      next_challenge)
        attest = None
        if answer is not None:
            self._keep(ctx, answer)
            attest = attest_record(answer.response, answer.evidence, answer.endorsement)
        return Message(reply_content(sealed, attest), reply_to=msg)
