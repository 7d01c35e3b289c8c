"""The confidential client mod: the site's protocol (:mod:`cleanroom.site_agent.session`) as a
Flower mod, so a ClientApp becomes attested, encrypted and privacy-accounted by adding it.

Usage (in a Flower App's ClientApp; see docs/public-api.md)::

    from cleanroom import ConfidentialMod
    from my_app.task import task

    app = ClientApp(mods=[ConfidentialMod(task)])

The site is the ``cleanroom site`` daemon the SuperNode belongs to, or a simulated site under
Flower's simulation (:mod:`cleanroom.site_agent.appsites`).

The mod answers ``query.cleanroom_attest``, and it answers train and evaluate messages itself
with the site's trusted trainer (the app's own handlers never see the model: the site, not the
app, owns the data and the DP). This module only moves bytes between Flower records and the
protocol; every decision is in :class:`~cleanroom.site_agent.session.SiteProtocol`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from cleanroom.errors import ProtocolError, SecAggError, SiteRefusal
from cleanroom.protocol.flower import (
    ATTEST_ACTION,
    ATTEST_MESSAGE_TYPE,
    ATTEST_RECORD,
    SECAGG_ACTION,
    SECAGG_MESSAGE_TYPE,
    attest_content,
    attest_record,
    has_challenge,
    read_aggregator,
    read_challenge,
    read_envelope,
    read_secagg,
    refusal_content,
    reply_content,
    secagg_content,
    strategy_config,
)
from cleanroom.protocol.wire import Refusal
from cleanroom.site_agent.ledger import EpsilonMemo
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.session import Answer, SessionBlob, SiteProtocol, SiteTrainer

log = logging.getLogger(__name__)

SESSION_RECORD = "cleanroom.session"  # node context: this round's sealed session blob
CACHE_RECORD = "cleanroom.cache"  # node context: MACed memo of costly answers


class ConfidentialMod:
    """Flower client mod adding attestation, end-to-end encryption and DP accounting."""

    def __init__(self, task: Any = None, trainer: SiteTrainer | None = None, *,
                 runtime_for: Callable[[Context], SiteRuntime] | None = None) -> None:
        """``task``: the app's :class:`cleanroom.task.Task` (or its folder). The site's
        trusted trainer trains it by its approved digest; the app's own train/evaluate
        handlers are never called with the model. (Internally: a ``runtime_for(context)``
        callable in its place picks the site runtime.)"""
        from cleanroom.task import Task

        if runtime_for is None and callable(task) and not isinstance(task, Task):
            runtime_for, task = task, None  # ConfidentialMod(runtime_for): the internal form
        if runtime_for is None:
            if task is None:
                raise ValueError("ConfidentialMod needs the app's task: "
                                 "ClientApp(mods=[ConfidentialMod(task)])")
            from cleanroom.site_agent.appsites import AppSites

            runtime_for = AppSites(task)
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
        if mtype == SECAGG_MESSAGE_TYPE:
            return self._secagg(msg, ctx)
        category = mtype.split(".")[0]
        if category == "train":
            return self._train(msg, ctx)
        if category == "evaluate":
            return self._evaluate(msg, ctx)
        return call_next(msg, ctx)

    def install(self, app: ClientApp) -> ClientApp:
        """Register the attestation query (and train/evaluate handlers, if the app has none)
        on ``app``: Flower routes a message to a mod only through a registered handler. The
        mod answers them itself."""

        registered = getattr(app, "_registered_funcs", {})
        app.query(ATTEST_ACTION)(_unreachable)
        app.query(SECAGG_ACTION)(_unreachable)
        for category in ("train", "evaluate"):
            if f"{category}.default" not in registered:
                getattr(app, category)()(_unreachable)
        return app

    def _protocol(self, ctx: Context) -> SiteProtocol:
        runtime = self.runtime_for(ctx)
        if CACHE_RECORD not in ctx.state.config_records:
            ctx.state[CACHE_RECORD] = ConfigRecord()
        memo = EpsilonMemo(ctx.state.config_records[CACHE_RECORD],
                           runtime.provider.sealing_key(b"eps-memo"))
        return SiteProtocol(runtime, self.trainer, memo)

    @staticmethod
    def _keep(ctx: Context, answer: Answer | SessionBlob | None) -> None:
        blob = answer.session if isinstance(answer, Answer) else answer
        if blob is not None:
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
        secagg = read_secagg(msg.content)
        try:
            sealed, blob = self._protocol(ctx).train(
                self._blob(ctx), read_envelope(msg.content), dict(strategy_config(msg.content)),
                read_aggregator(msg.content), secagg[1] if secagg else None)
        except SiteRefusal as refusal:  # typed: the coordinator records why, per site
            return _refused(msg, refusal.code, refusal.detail)
        except SecAggError as exc:
            return _refused(msg, f"secagg-{exc.code}", str(exc))
        self._keep(ctx, blob)
        return Message(reply_content(sealed), reply_to=msg)

    def _secagg(self, msg: Message, ctx: Context) -> Message:
        request = read_secagg(msg.content)
        if request is None:
            raise ProtocolError("a secure-aggregation query without its record")
        try:
            reply, blob = self._protocol(ctx).secagg_step(self._blob(ctx), *request)
        except SecAggError as exc:  # the site's part in the round ends; typed, with a code
            return _refused(msg, f"secagg-{exc.code}", str(exc))
        self._keep(ctx, blob)
        return Message(secagg_content(request[0], reply), reply_to=msg)

    def _evaluate(self, msg: Message, ctx: Context) -> Message:
        next_challenge = read_challenge(msg.content) if has_challenge(msg.content) else None
        result, answer = self._protocol(ctx).evaluate(self._blob(ctx),
                                                      read_envelope(msg.content),
                                                      next_challenge,
                                                      read_aggregator(msg.content))
        attest = None
        if answer is not None:
            self._keep(ctx, answer)
            attest = attest_record(answer.response, answer.evidence, answer.endorsement)
        if isinstance(result, Refusal):
            content = refusal_content(result)
            if attest is not None:
                content[ATTEST_RECORD] = attest
            return Message(content, reply_to=msg)
        return Message(reply_content(result, attest), reply_to=msg)


def _refused(msg: Message, code: str, detail: str) -> Message:
    return Message(refusal_content(Refusal(code=code[:64], detail=detail[:2000])), reply_to=msg)


def _unreachable(msg: Message, ctx: Context) -> Message:
    raise ProtocolError("a message reached the app: ConfidentialMod must be in "
                        "ClientApp(mods=[...])")


class ConfidentialClientApp(ClientApp):
    """A ClientApp made confidential in one call: ``app = ConfidentialClientApp(task)``
    where a plain app has ``app = ClientApp()``.

    Train and evaluate messages are answered by the site's trusted trainer (the task's model,
    loss and metrics, the site's data and DP); handlers the app registers with
    ``@app.train()`` / ``@app.evaluate()`` stay for a plain run of the same code but never
    receive the confidential model. Other ``mods`` run inside the confidential one.
    """

    def __init__(self, task: Any, mods: list[Any] | None = None, **kwargs: Any) -> None:
        self.confidential = ConfidentialMod(task)
        super().__init__(mods=[self.confidential, *(mods or [])], **kwargs)
        self.query(ATTEST_ACTION)(_unreachable)
        self.query(SECAGG_ACTION)(_unreachable)

    def __call__(self, message: Message, context: Context) -> Message:
        registered = self._registered_funcs  # Flower routes to mods via a registered handler
        for category in ("train", "evaluate"):
            if f"{category}.default" not in registered:
                getattr(self, category)()(_unreachable)
        return super().__call__(message, context)
