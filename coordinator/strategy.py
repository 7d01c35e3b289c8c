"""ConfidentialStrategy: attestation and end-to-end encryption around any Flower strategy.

A thin Flower adapter over the round state machine (:mod:`cleanroom.coordinator.rounds`). It
wraps an ``flwr.serverapp.strategy`` strategy (FedAvg, FedProx, FedAdam, FedYogi, FedMedian,
Krum, ...), hands the inner strategy only attested nodes and plaintext it can aggregate, and
changes nothing else:

* ``configure_train``: challenge every connected node (or use its answer to the challenge
  that rode on last round's evaluation), let the inner strategy configure *attested nodes
  only*, and seal each message's model to the key that node's evidence bound;
* ``aggregate_train``: judge every reply on its own (an error, extra records, a bad envelope,
  a bad report or a bad update rejects that one site), give the inner strategy the plaintext
  updates with the sample counts from the sites' authenticated reports;
* ``configure_evaluate`` / ``aggregate_evaluate``: the same for evaluation, with next round's
  challenges riding on it; the run takes each finished round (:meth:`finished`) and
  closes it.

With an attested aggregator (``aggregator=``), this process never opens an update: replies go
to the aggregator enclave, and the inner strategy receives what it releases: the mean of the
accepted updates as one reply (strategies that aggregate by a weighted mean, plus any server
step they apply on it: FedAvg, FedProx, FedAvgM, FedAdam...), or, for strategies that need
every update (Krum, FedMedian...), the output of the same strategy run inside the enclave.

Example (in a Flower App's ServerApp; see docs/public-api.md)::

    from cleanroom import ConfidentialStrategy
    from my_app.task import task

    strategy = ConfidentialStrategy(FedAvg(), task=task)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=5)

With only ``task``, :meth:`ConfidentialStrategy.start` builds everything around the run
(policy, gate, plan, audit chain, MLflow, report): from the coordinator's configuration when
the app runs on a ``cleanroom coordinator``'s SuperLink, else as a local simulation
(:mod:`cleanroom.coordinator.standalone`). Internally the run machinery passes ``gate`` and
``plan`` itself.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from cleanroom.coordinator.fastgrid import DelegatingGrid
from cleanroom.coordinator.gate import AttestationGate
from cleanroom.coordinator.rounds import CoordinatorRound, Reply
from cleanroom.coordinator.secagg_round import SecAggExchange
from cleanroom.errors import ProtocolError
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.flower import (
    ATTEST_RECORD,
    ENVELOPE_RECORD,
    REFUSAL_RECORD,
    arrays_view,
    attest_answer,
    drop_content,
    error_reason,
    has_attest,
    instruction_content,
    numpy_to_arrays,
    plain_evaluate_reply,
    plain_train_reply,
    read_envelope,
    read_refusal,
    read_reply,
    send_challenges,
    synthetic_reply,
)
from cleanroom.protocol.payload import encode_model
from cleanroom.protocol.reports import EvaluateReport, TrainReport
from cleanroom.protocol.wire import TrainPlan

log = logging.getLogger(__name__)

def required_nodes(inner: Strategy, phase: str = "train") -> int:
    """How many nodes the inner strategy insists on for ``phase`` ('train' or 'evaluate'):
    Flower's ``sample_nodes`` waits, with no timeout, until that many are listed."""
    need = 1
    for attr in ("min_available_nodes", f"min_{phase}_nodes"):
        value = getattr(inner, attr, None)
        if isinstance(value, int):
            need = max(need, value)
    return need


def train_reply(reply: Message) -> Reply:
    """A train reply's sealed update or the site's refusal; else why it is rejected (an
    error, extra records, a bad envelope)."""
    if reply.has_error():
        return f"site error: {error_reason(reply)}"
    try:
        refusal = read_refusal(reply.content)
        if refusal is not None:
            read_reply(reply.content, allowed={REFUSAL_RECORD})
            return refusal
        read_reply(reply.content, allowed={ENVELOPE_RECORD})
        return read_envelope(reply.content)
    except ProtocolError as exc:
        return f"update rejected: {exc}"


class AttestedGrid(DelegatingGrid):
    """A view of a Grid that lists only the nodes attested this round."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        super().__init__(grid)
        self._nodes = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[Any]:
        return [n for n in self._grid.get_nodes() if n.node_id in self._nodes]


class ConfidentialStrategy(Strategy):
    """Wraps ``inner`` so that only attested sites train, on encrypted models and updates."""

    def __init__(self, inner: Strategy, *, task: Any = None,
                 gate: AttestationGate | None = None, plan: TrainPlan | None = None,
                 attest_timeout: float = 120.0, expected_nodes: int | None = None,
                 node_wait: float = 60.0, piggyback: bool = True,
                 run_id: str | None = None, aggregator: Any = None) -> None:
        """``inner``: any ``flwr.serverapp.strategy`` strategy. ``task``: the task this run
        trains (a :class:`cleanroom.task.Task` or a task folder); with it alone,
        :meth:`start` builds the run around the rounds. ``gate`` and ``plan``: given
        together by the run machinery (:mod:`cleanroom.coordinator.run`), and
        ``aggregator``: the attested aggregator's handle (updates go there unopened)."""
        if not isinstance(inner, Strategy):
            raise ValueError("inner must be a flwr.serverapp.strategy.Strategy (e.g. "
                             "FedAvg()), got " + type(inner).__name__)
        if isinstance(inner, ConfidentialStrategy):
            raise ValueError("inner is already confidential")
        if attest_timeout <= 0:
            raise ValueError("attest_timeout must be > 0")
        if (gate is None) != (plan is None):
            raise ValueError("give gate and plan together, or neither (task=... alone)")
        if gate is None and task is None:
            raise ValueError("ConfidentialStrategy needs the task it trains: "
                             "ConfidentialStrategy(FedAvg(), task=task)")
        self.inner = inner
        self.task = task
        self.gate = gate  # type: ignore[assignment]
        self.plan = plan  # type: ignore[assignment]
        self.attest_timeout = attest_timeout
        self.min_sites = required_nodes(inner)
        self.expected_nodes = expected_nodes or self.min_sites
        self.node_wait = node_wait
        self._answered_once = False  # a run's first attestation waits up to node_wait
        self.piggyback = piggyback
        self.protocol_run_id = run_id  # a resumed deployed run keeps its first run's id
        self.aggregator = aggregator
        self.model_after_round: OrderedDict[str, np.ndarray] | None = None
        self._round: CoordinatorRound | None = None
        self._next: CoordinatorRound | None = None
        self._finished: CoordinatorRound | None = None  # for the run to take and close
        self._global: OrderedDict[str, np.ndarray] | None = None
        self._eval_digest = ""
        self._secagg: SecAggExchange | None = None  # this round's, with secure aggregation

    def attach(self, *, gate: AttestationGate, plan: TrainPlan, expected_nodes: int | None,
               run_id: str | None, aggregator: Any = None,
               min_sites: int = 1) -> ConfidentialStrategy:
        """Give a public-API strategy the run machinery's gate, plan and aggregator;
        ``min_sites``: the operator's floor (the inner strategy's own minimum still holds)."""
        self.gate, self.plan, self.aggregator = gate, plan, aggregator
        self.min_sites = max(required_nodes(self.inner), min_sites)
        self.expected_nodes = expected_nodes or self.min_sites
        self.protocol_run_id = run_id
        return self

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              ) -> Any:
        """Flower's round loop, around the confidential rounds. A strategy made with
        ``task=`` only builds its run first (policy, gate, plan, audit, MLflow, report)."""
        if self.gate is None:
            from cleanroom.coordinator.standalone import run_standalone

            return run_standalone(self, grid, initial_arrays, num_rounds=num_rounds,
                                  timeout=timeout, train_config=train_config,
                                  evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        self._answered_once = False
        return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    # ------------------------------------------------------------------ attestation
    def _connected(self, grid: Grid) -> list[int]:
        """Node ids, waiting (like Flower's sampling) until the expected nodes connected."""
        deadline = time.monotonic() + self.node_wait
        while len(node_ids := list(grid.get_node_ids())) < self.expected_nodes and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        return node_ids

    def _attest(self, round_: CoordinatorRound, grid: Grid) -> list[int]:
        """Admit this round's sites: answers that rode on last round's evaluation, and a
        fresh attestation query for every other connected node (the round sends them on the
        Grid, :func:`~cleanroom.protocol.flower.send_challenges`, and judges the answers)."""
        # The first attestation of a run (fresh or resumed) waits up to node_wait: after a
        # restart of the coordinator the SuperNodes are still reconnecting, and rounds that
        # time out at once would each be lost (seen in the coordinator-kill drill).
        timeout = self.attest_timeout if self._answered_once else \
            max(self.attest_timeout, self.node_wait)
        admitted = round_.attest_nodes(self._connected(grid), partial(
            send_challenges, grid, group_id=str(round_.round), timeout=timeout))
        self._answered_once = self._answered_once or bool(admitted)
        return admitted

    def _seal(self, round_: CoordinatorRound, messages: Iterable[Message], direction: str,
              model: Any, digest: str,
              look_ahead: CoordinatorRound | None = None) -> list[Message]:
        """The model encrypted once for every addressed, admitted node; each message keeps
        the strategy's config records and gets the shared ciphertext and its own key."""
        messages = list(messages)
        masked = self._secagg.masked_input if self._secagg and direction == "model" else None
        sent = round_.instructions([m.metadata.dst_node_id for m in messages], model,
                                   direction=direction, model_digest=digest,
                                   look_ahead=look_ahead, masked=masked)
        out = []
        for msg in messages:
            item = sent.get(msg.metadata.dst_node_id)
            if item is not None:
                msg.content = instruction_content(item.sealed, msg.content, item.challenge,
                                                  item.aggregator, item.masked_input)
                out.append(msg)
        return out

    # ------------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays_view(arrays)  # read-only views of Flower's bytes: no copy
        self.model_after_round = self._global  # replaced by the aggregate, if any
        encoded = encode_model(self._global)  # encoded and hashed once for the round
        digest = encoded.digest
        run_id = self.protocol_run_id or str(grid.run.run_id)
        ahead, self._next = self._next, None
        if ahead is not None and (ahead.round, ahead.model_digest) == (server_round, digest):
            round_ = ahead
        else:
            if ahead is not None:
                ahead.discard()
            round_ = CoordinatorRound(gate=self.gate, plan=self.plan, run_id=run_id,
                                      round=server_round, model_digest=digest,
                                      aggregator=self.aggregator, model=self._global)
        self._round, self._secagg = round_, None
        attested = self._attest(round_, grid)
        if self.plan.secure_aggregation and len(attested) >= self.min_sites:
            self._secagg = SecAggExchange(round_, grid, self.attest_timeout)
            attested = self._secagg.share_keys()
        if len(attested) < self.min_sites:
            round_.skip(f"only {len(attested)} site(s) attested, the strategy needs "
                        f"{self.min_sites}: no training this round")
            return []
        inner_msgs = self.inner.configure_train(server_round, arrays, config,
                                                AttestedGrid(grid, attested))
        return self._seal(round_, inner_msgs, "model", encoded, digest)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = self._round
        if round_ is None or self._global is None or round_.record.skipped:
            return None, None
        kept: list[Message] = []  # without the aggregator, the replies its opened updates replace

        def parsed() -> Iterator[tuple[int, Any]]:
            for reply in replies:  # one at a time: the aggregator folds each as it comes
                if round_.aggregator is None:
                    kept.append(reply)
                yield reply.metadata.src_node_id, train_reply(reply)
                if round_.aggregator is not None:
                    drop_content(reply)  # handed on: its ciphertext must not wait for the GC

        updates = round_.updates(parsed(), self._global, release=self._secagg is None)
        if self._secagg is not None:
            self._secagg.unmask()
        if round_.aggregator is not None:
            released = updates.aggregate if self._secagg is None else round_.aggregate()
            del updates
            # the release's numpy arrays go into Flower's record and are dropped at once
            record = None
            if released.arrays is not None:
                record = numpy_to_arrays(released.arrays)
                released = replace(released, arrays=None)
            arrays, metrics = self._released(server_round, record, released)
        else:
            plain = []
            for reply, opened in zip(kept, updates.opened, strict=True):
                if opened is not None:
                    reply.content = plain_train_reply(*opened)
                    plain.append(reply)
            del updates, kept
            arrays, metrics = (self.inner.aggregate_train(server_round, plain) if plain
                               else (None, None))
        aggregate = None
        if arrays is not None:
            aggregate, arrays = self._keep_schema(arrays)
            self.model_after_round = aggregate
        round_.end_training(arrays_digest(aggregate) if aggregate is not None else None)
        return arrays, metrics

    def _released(self, server_round: int, record: ArrayRecord | None, result: Any,
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregator's release (``record``, and the rest of its ``Aggregate``) for the
        inner strategy: its robust output as is, or the mean of the accepted updates as one
        reply the inner strategy aggregates (its server step, e.g. FedAdam's, applies)."""
        if record is None:
            return None, None
        if self._inside:
            return record, None
        report = TrainReport(num_examples=max(1, result.total_examples),
                             steps=self.plan.local_steps, train_loss=result.train_loss)
        reply = synthetic_reply(plain_train_reply(record, report), "train")
        arrays, metrics = self.inner.aggregate_train(server_round, [reply])
        # what the inner strategy returned is kept; the rest would wait for a GC pass (a
        # Flower strategy views the reply through its self-referencing record views)
        drop_content(reply, keep=(arrays, metrics))
        return arrays, metrics

    @property
    def _inside(self) -> bool:
        """The inner strategy aggregates inside the enclave (it needs every update)."""
        from cleanroom.coordinator.strategies import aggregates_by_sum

        return not aggregates_by_sum(self.inner)

    def _keep_schema(self, arrays: ArrayRecord,
                     ) -> tuple[OrderedDict[str, np.ndarray], ArrayRecord]:
        """Keep the model's parameter dtypes: server optimisers (FedAdam...) compute in
        float64, but the sites' model (and its digest) is defined in the original dtypes.
        Returns the aggregate (numpy) and the record for Flower: ``arrays`` itself, viewed
        without a copy, when its dtypes already match."""
        assert self._global is not None
        aggregated = arrays_view(arrays)
        if list(aggregated) != list(self._global):
            raise ProtocolError("the inner strategy changed the model's parameter names")
        if all(value.dtype == self._global[name].dtype for name, value in aggregated.items()):
            return aggregated, arrays
        record = numpy_to_arrays(  # one parameter cast at a time
            (name, value.astype(self._global[name].dtype)) for name, value in aggregated.items())
        return arrays_view(record), record

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        round_ = self._round
        if round_ is None or round_.record.skipped or not round_.admitted:
            return []
        need = required_nodes(self.inner, "evaluate")
        if getattr(self.inner, "fraction_evaluate", 1.0) == 0.0:
            need = 0  # the inner strategy evaluates nothing (and samples nothing)
        if len(round_.admitted) < need:
            # Sites rejected or silent in training leave too few for the inner strategy's
            # sampling, which would wait for them forever: the round closes unevaluated
            # (next round's challenges go out fresh).
            log.warning("round %d: %d site(s) left after training, the strategy evaluates "
                        "with %d: no evaluation this round", server_round,
                        len(round_.admitted), need)
            return []
        inner_msgs = self.inner.configure_evaluate(server_round, arrays, config,
                                                   AttestedGrid(grid, round_.admitted))
        numpy = arrays_view(arrays)
        model = encode_model(numpy)
        self._eval_digest = model.digest
        if self.piggyback and server_round < self.plan.rounds:
            self._next = round_.look_ahead(self._eval_digest, numpy)
        return self._seal(round_, inner_msgs, "evaluate", model, self._eval_digest, self._next)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        round_ = self._round
        ok, answers = [], {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if self._next is not None and self._next.awaiting(node_id) and (
                    reply.has_error() or has_attest(reply.content)):
                answers.setdefault(node_id, attest_answer(reply))  # next round's admission
            if round_ is None or round_.site(node_id) is None:
                continue
            site = round_.site(node_id)
            if reply.has_error():
                log.warning("round %d: evaluation error at %s: %s", server_round, site,
                            error_reason(reply))
                continue
            try:
                refusal = read_refusal(reply.content)
                if refusal is not None:
                    read_reply(reply.content, allowed={REFUSAL_RECORD, ATTEST_RECORD})
                    log.warning("round %d: %s refused its evaluation: %s: %s", server_round,
                                site, refusal.code, refusal.detail)
                    round_.record.evaluation_refusals[str(site)] = \
                        f"{refusal.code}: {refusal.detail}"
                    continue
                read_reply(reply.content, allowed={ENVELOPE_RECORD, ATTEST_RECORD})
                sealed = read_envelope(reply.content)
            except ProtocolError as exc:
                log.warning("round %d: %s: evaluation reply refused: %s", server_round, site,
                            exc)
                continue
            if round_.aggregator is not None:
                round_.submit_metrics(node_id, sealed, self._eval_digest)
                continue
            report = round_.open_metrics(node_id, sealed, self._eval_digest)
            if report is not None:
                reply.content = plain_evaluate_reply(report)
                ok.append(reply)
        if self._next is not None:
            self._next.judge(answers.items())  # durable once judged (the gate's phase end)
        result = self._evaluated(server_round, round_, ok)
        if round_ is not None:
            self._round, self._finished = None, round_
        return result

    def finished(self) -> CoordinatorRound | None:
        """The round whose last Flower step just ran, for the run to close (handed out once)."""
        round_, self._finished = self._finished, None
        return round_

    def _evaluated(self, server_round: int, round_: CoordinatorRound | None,
                   ok: list[Message]) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate: from the plaintext replies, or from the
        aggregator's release (one reply: the example-weighted means over all sites)."""
        if round_ is None or round_.aggregator is None:
            return self.inner.aggregate_evaluate(server_round, ok) if ok else None
        if not round_.evaluating:
            return None  # nothing was sent for evaluation (a skipped round)
        released = round_.release_metrics()
        if not released.sites:
            return None
        report = EvaluateReport(num_examples=max(1, released.num_examples),
                                metrics=dict(released.weighted))
        return self.inner.aggregate_evaluate(
            server_round, [synthetic_reply(plain_evaluate_reply(report), "evaluate")])

    def summary(self) -> None:
        log.info("ConfidentialStrategy: attested, HPKE-encrypted rounds around %s",
                 type(self.inner).__name__)
        self.inner.summary()


