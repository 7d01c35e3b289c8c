"""ConfidentialStrategy: adds attestation and end-to-end encryption to any Flower strategy.

It wraps an ``flwr.serverapp.strategy`` strategy (FedAvg, FedProx, FedAdam, FedYogi, FedMedian,
Krum, ...) and changes only the steps confidentiality touches:

* ``configure_train``: challenge every connected node with a fresh nonce; verify the evidence
  (:class:`coordinator.gate.AttestationGate`); quarantine the failures for this round; let the
  inner strategy sample and configure *only attested nodes*; replace each message's plaintext
  ArrayRecord by an HPKE ciphertext to the key that node's evidence bound.
* ``aggregate_train``: open each reply with this round's coordinator key, validate the update
  (names, shapes, dtypes, finite, norm bound), hand the plaintext to the inner strategy.
* ``configure_evaluate``: the same encryption for the evaluation model, attested nodes only.
* ``aggregate_evaluate`` / ``summary``: passed through, plus the round record.

Example::

    strategy = ConfidentialStrategy(FedAdam(), gate=AttestationGate(policy), plan=plan)
    strategy.start(grid, initial_arrays, num_rounds=5)
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from cleanroom.coordinator.fastgrid import DelegatingGrid
from cleanroom.coordinator.gate import Admission, AttestationGate
from cleanroom.coordinator.validation import validate_update
from cleanroom.errors import CleanroomError, ProtocolError
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
from cleanroom.protocol.flower import (
    ATTEST_MESSAGE_TYPE,
    ATTEST_RECORD,
    CHALLENGE_RECORD,
    ENVELOPE_RECORD,
    arrays_to_numpy,
    challenge_content,
    envelope_header,
    numpy_to_arrays,
    open_arrays,
    read_attest,
    seal_arrays,
)
from cleanroom.protocol.wire import AttestChallenge, TrainPlan

log = logging.getLogger(__name__)


@dataclass
class SiteRound:
    """What happened with one site in one round (digests and metrics only)."""

    site: str
    node_id: int
    admission: dict[str, Any]
    admitted: bool
    reason: str
    model_ciphertext_sha256: str | None = None
    update_ciphertext_sha256: str | None = None
    update_norm: float | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundRecord:
    """Everything the coordinator knows about one round; feeds reports, MLflow and the audit."""

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

    @property
    def attested(self) -> list[str]:
        return sorted(s.site for s in self.sites.values() if s.admitted)

    @property
    def quarantined(self) -> dict[str, str]:
        return {s.site: s.reason for s in sorted(self.sites.values(), key=lambda s: s.site)
                if not s.admitted}


class AttestedGrid(DelegatingGrid):
    """A view of a Grid that lists only the nodes attested this round."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        super().__init__(grid)
        self._nodes = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[Any]:
        return [n for n in self._grid.get_nodes() if n.node_id in self._nodes]


@dataclass
class _Session:
    node_id: int
    site: str
    public_key: bytes


_FLOWER_EXC = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", re.S)


def error_reason(reply: Message) -> str:
    """A site's error as 'ErrorType: message' (Flower's deployment runtime wraps it as
    "<class 'pkg.ErrorType'>:<'message'>")."""
    reason = str(reply.error.reason)
    match = _FLOWER_EXC.match(reason.strip())
    return f"{match.group(1)}: {match.group(2)}" if match else reason


def required_nodes(inner: Strategy) -> int:
    """How many nodes the inner strategy insists on (it would wait forever for fewer)."""
    need = 1
    for attr in ("min_available_nodes", "min_train_nodes"):
        value = getattr(inner, attr, None)
        if isinstance(value, int):
            need = max(need, value)
    return need


class ConfidentialStrategy(Strategy):
    """Wraps ``inner`` so that only attested sites train, on encrypted models and updates."""

    def __init__(self, inner: Strategy, *, gate: AttestationGate, plan: TrainPlan,
                 attest_timeout: float = 120.0, expected_nodes: int | None = None,
                 node_wait: float = 60.0, piggyback: bool = True,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 on_start: Callable[[str], None] | None = None,
                 run_id: str | None = None) -> None:
        if not isinstance(inner, Strategy):
            raise ValueError("inner must be a flwr.serverapp.strategy.Strategy")
        if isinstance(inner, ConfidentialStrategy):
            raise ValueError("inner is already confidential")
        if attest_timeout <= 0:
            raise ValueError("attest_timeout must be > 0")
        self.inner = inner
        self.gate = gate
        self.plan = plan
        self.attest_timeout = attest_timeout
        self.on_round = on_round
        self.min_sites = required_nodes(inner)
        self.expected_nodes = expected_nodes or self.min_sites
        self.node_wait = node_wait
        self.piggyback = piggyback
        self.on_start = on_start
        self.protocol_run_id = run_id  # a resumed deployed run keeps its first run's id
        self.records: list[RoundRecord] = []
        self._current: RoundRecord | None = None
        self._keys: KeyPair | None = None
        self._sessions: dict[int, _Session] = {}
        self._global: OrderedDict[str, np.ndarray] | None = None
        self.model_after_round: OrderedDict[str, np.ndarray] | None = None
        self._site_names: dict[int, str] = {}
        # Next round's attestation, answered together with this round's evaluation:
        self._next_keys: KeyPair | None = None
        self._next_challenges: dict[int, AttestChallenge] = {}
        self._pending: dict[int, Admission] = {}
        self._pending_for: tuple[int, str] | None = None

    # ------------------------------------------------------------------ helpers
    def _run_id(self, grid: Grid) -> str:
        return self.protocol_run_id or str(grid.run.run_id)

    def _label(self, node_id: int, claimed: str | None = None) -> str:
        if claimed:
            self._site_names[node_id] = claimed
        return self._site_names.get(node_id, f"node-{node_id}")

    def _quarantine(self, record: RoundRecord, admission: Admission) -> None:
        site = self._label(admission.node_id, admission.site)
        record.sites[site] = SiteRound(site=site, node_id=admission.node_id,
                                       admission=admission.summary(), admitted=False,
                                       reason=admission.reason)
        log.warning("round %d: %s quarantined: %s", record.round, site, admission.reason)

    # ------------------------------------------------------------------ attestation
    def _connected(self, grid: Grid) -> list[int]:
        """Node ids, waiting (like Flower's sampling) until the expected nodes connected."""
        deadline = time.monotonic() + self.node_wait
        while len(node_ids := list(grid.get_node_ids())) < self.expected_nodes and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        return node_ids

    def _challenge(self, server_round: int, node_id: int, run_id: str, model_digest: str,
                   keys: KeyPair) -> AttestChallenge:
        return self.gate.challenge(run_id=run_id, round=server_round, node_id=node_id,
                                   model_digest=model_digest,
                                   coordinator_public_key=keys.public_bytes, plan=self.plan)

    def _judge(self, reply: Message, challenge: AttestChallenge, taken: set[str],
               record: RoundRecord) -> Admission:
        """Admission for one attestation answer (a query reply or a piggybacked one)."""
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            return Admission(node_id, None, False, f"site error: {error_reason(reply)}")
        try:
            response, evidence, endorsement = read_attest(reply.content)
        except ProtocolError as exc:
            return Admission(node_id, None, False, f"protocol: {exc}")
        record.bytes_received += len(evidence) + len(endorsement)
        if response.site in taken:
            return Admission(node_id, None, False, f"identity: site name {response.site!r} "
                             "already answered this round")
        admission = self.gate.admit(node_id, challenge, response, evidence, endorsement)
        record.verify_seconds += admission.verify_seconds
        return admission

    def _apply(self, record: RoundRecord, admission: Admission) -> None:
        if not admission.admitted:
            self._quarantine(record, admission)
            return
        site = self._label(admission.node_id, admission.site)
        self._sessions[admission.node_id] = _Session(
            admission.node_id, site, admission.site_public_key)  # type: ignore[arg-type]
        record.sites[site] = SiteRound(site=site, node_id=admission.node_id,
                                       admission=admission.summary(), admitted=True,
                                       reason="attested")

    def _attest(self, server_round: int, grid: Grid, record: RoundRecord) -> None:
        """Admissions for this round: those answered with last round's evaluation (bound to
        this round's model and key), and a fresh attestation query for every other node."""
        node_ids = self._connected(grid)
        pending = self._pending if (self._pending_for == (server_round, record.model_digest)) \
            else {}
        self._pending, self._pending_for = {}, None
        for node_id in node_ids:
            if node_id in pending:
                self._apply(record, pending[node_id])
        challenges = {node_id: self._challenge(server_round, node_id, record.run_id,
                                               record.model_digest, self._keys)  # type: ignore[arg-type]
                      for node_id in node_ids if node_id not in pending}
        messages = []
        for node_id, challenge in challenges.items():
            record.bytes_sent += len(challenge.model_dump_json())
            messages.append(Message(challenge_content(challenge), node_id, ATTEST_MESSAGE_TYPE,
                                    group_id=str(server_round)))
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=self.attest_timeout)) \
            if messages else []
        record.attestation_seconds = time.perf_counter() - start
        answered: set[int] = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id not in challenges or node_id in answered:
                continue
            answered.add(node_id)
            taken = {s.site for s in record.sites.values()}
            self._apply(record, self._judge(reply, challenges[node_id], taken, record))
        for node_id in challenges:
            if node_id not in answered:
                self._quarantine(record, Admission(node_id, None, False,
                                                   "no attestation reply before the timeout"))
        self.gate.nonces.flush()
        self.gate.watermarks.flush()

    def _seal_messages(self, messages: Iterable[Message], direction: str, record: RoundRecord,
                       model_digest: str) -> list[Message]:
        sealed = []
        for msg in messages:
            session = self._sessions.get(msg.metadata.dst_node_id)
            if session is None:  # inner strategy chose a node we did not admit: never send
                log.error("inner strategy addressed unattested node %d; message dropped",
                          msg.metadata.dst_node_id)
                continue
            context = EnvelopeContext(direction, record.run_id, record.round,  # type: ignore[arg-type]
                                      session.site, model_digest)
            content, header = seal_arrays(msg.content, session.public_key, context)
            ciphertext = content.config_records[ENVELOPE_RECORD]["ciphertext"]
            record.bytes_sent += len(ciphertext)  # type: ignore[arg-type]
            if direction == "model":
                record.sites[session.site].model_ciphertext_sha256 = header.ciphertext_sha256
            msg.content = content
            sealed.append(msg)
        return sealed

    # ------------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays_to_numpy(arrays)
        self.model_after_round = self._global  # replaced by the aggregate, if any
        record = RoundRecord(round=server_round, run_id=self._run_id(grid),
                             model_digest=arrays_digest(self._global))
        if self.on_start is not None and not self.records:
            self.on_start(record.run_id)
        self._current = record
        # the key the previous evaluation's challenges announced, if any
        self._keys = self._next_keys if self._pending_for == (server_round, record.model_digest) \
            and self._next_keys is not None else KeyPair.generate()
        self._next_keys = None
        self._sessions = {}
        self._attest(server_round, grid, record)
        attested = sorted(self._sessions)
        if len(attested) < self.min_sites:
            record.skipped = (f"only {len(attested)} site(s) attested, the strategy needs "
                              f"{self.min_sites}: no training this round")
            log.error("round %d: %s", server_round, record.skipped)
            return []
        config["model"] = self.plan.model
        inner_msgs = self.inner.configure_train(server_round, arrays, config,
                                                AttestedGrid(grid, attested))
        return self._seal_messages(inner_msgs, "model", record, record.model_digest)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self._current
        assert record is not None and self._keys is not None and self._global is not None
        plain: list[Message] = []
        for reply in replies:
            session = self._sessions.get(reply.metadata.src_node_id)
            if session is None:
                continue
            site_round = record.sites[session.site]
            if reply.has_error():
                self._reject(record, session.site, f"site error: {error_reason(reply)}")
                continue
            try:
                header = envelope_header(reply.content)
                context = EnvelopeContext("update", record.run_id, server_round, session.site,
                                          record.model_digest)
                content, update = open_arrays(reply.content, self._keys, context)
                site_round.update_ciphertext_sha256 = header.ciphertext_sha256
                record.bytes_received += len(
                    reply.content.config_records[ENVELOPE_RECORD]["ciphertext"])  # type: ignore[arg-type]
                site_round.update_norm = validate_update(update, self._global,
                                                         max_norm=self.plan.max_update_norm)
            except CleanroomError as exc:
                self._reject(record, session.site, f"update rejected: {exc}")
                continue
            for metrics in content.metric_records.values():
                site_round.train_metrics = {k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                                            if isinstance(v, (int, float))}
            records = site_round.train_metrics.get("ledger-records")
            if records is not None and math.isfinite(records) and 0 <= records < 2**63:
                # the ledger after this round's charge (a count only: raises the mark)
                self.gate.watermarks.advance(session.site, int(records), None)
            reply.content = content
            plain.append(reply)
        if not plain:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, plain)
        if arrays is not None:
            arrays = self._keep_schema(arrays)
            self.model_after_round = arrays_to_numpy(arrays)
            record.aggregate_digest = arrays_digest(self.model_after_round)
        return arrays, metrics

    def _keep_schema(self, arrays: ArrayRecord) -> ArrayRecord:
        """Keep the model's parameter dtypes: server optimisers (FedAdam...) compute in
        float64, but the sites' model (and its digest) is defined in the original dtypes."""
        assert self._global is not None
        aggregated = arrays_to_numpy(arrays)
        if list(aggregated) != list(self._global):
            raise ProtocolError("the inner strategy changed the model's parameter names")
        return numpy_to_arrays(OrderedDict(
            (name, np.asarray(value).astype(self._global[name].dtype, copy=False))
            for name, value in aggregated.items()))

    def _reject(self, record: RoundRecord, site: str, reason: str) -> None:
        site_round = record.sites[site]
        site_round.admitted = False
        site_round.reason = reason
        self._sessions = {k: v for k, v in self._sessions.items() if v.site != site}
        log.warning("round %d: %s", record.round, reason)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        record = self._current
        if record is None or record.skipped or not self._sessions:
            return []
        config["model"] = self.plan.model
        inner_msgs = self.inner.configure_evaluate(server_round, arrays, config,
                                                   AttestedGrid(grid, sorted(self._sessions)))
        digest = arrays_digest(arrays_to_numpy(arrays))
        sealed = self._seal_messages(inner_msgs, "evaluate", record, digest)
        self._next_challenges = {}
        if self.piggyback and server_round < self.plan.rounds:
            # The evaluated model is the next round's global model: challenge each site for
            # the next round now, saving a message round trip per round.
            self._next_keys = KeyPair.generate()
            for msg in sealed:
                node_id = msg.metadata.dst_node_id
                challenge = self._challenge(server_round + 1, node_id, record.run_id, digest,
                                            self._next_keys)
                self._next_challenges[node_id] = challenge
                msg.content[CHALLENGE_RECORD] = challenge_content(challenge)[CHALLENGE_RECORD]
                record.bytes_sent += len(challenge.model_dump_json())
            self._pending_for = (server_round + 1, digest)
        return sealed

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        record = self._current
        replies = list(replies)
        ok = []
        next_record = RoundRecord(round=server_round + 1, run_id=record.run_id if record else "",
                                  model_digest="")
        for reply in replies:
            node_id = reply.metadata.src_node_id
            challenge = self._next_challenges.get(node_id)
            if challenge is not None and (reply.has_error() or
                                          ATTEST_RECORD in reply.content.config_records):
                taken = {a.site for a in self._pending.values() if a.site}
                self._pending[node_id] = self._judge(reply, challenge, taken, next_record)
            session = self._sessions.get(node_id)
            if session is None or record is None:
                continue
            if reply.has_error():
                log.warning("round %d: evaluation error at %s: %s", server_round, session.site,
                            reply.error.reason)
                continue
            for metrics in reply.content.metric_records.values():
                record.sites[session.site].eval_metrics = {
                    k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                    if isinstance(v, (int, float))}
            ok.append(reply)
        result = self.inner.aggregate_evaluate(server_round, ok) if ok else None
        self.gate.nonces.flush()
        self.gate.watermarks.flush()
        if record is not None:
            record.bytes_received += next_record.bytes_received
            record.verify_seconds += next_record.verify_seconds
            record.seconds = time.time() - record.started_at
            self.records.append(record)
            self._sessions = {}
            self._keys = None  # round keys live for one round
            if self.on_round is not None:
                self.on_round(record)
        return result

    def summary(self) -> None:
        log.info("ConfidentialStrategy: attested, HPKE-encrypted rounds around %s",
                 type(self.inner).__name__)
        self.inner.summary()




class ObservedStrategy(Strategy):
    """Pass-through wrapper that only records rounds (the plaintext baseline of benchmarks).

    No attestation, no encryption: it exists so the baseline is measured and reported the
    same way as the confidential run.
    """

    def __init__(self, inner: Strategy, *, node_sites: dict[int, str] | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 on_start: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self.on_start = on_start
        self.node_sites = node_sites or {}
        self.on_round = on_round
        self.records: list[RoundRecord] = []
        self._current: RoundRecord | None = None

    def _site(self, node_id: int) -> str:
        return self.node_sites.get(node_id, f"node-{node_id}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = RoundRecord(round=server_round, run_id=str(grid.run.run_id),
                                    model_digest=arrays_digest(arrays_to_numpy(arrays)))
        if self.on_start is not None and not self.records:
            self.on_start(self._current.run_id)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record = self._current
        assert record is not None
        for reply in replies:
            site = self._site(reply.metadata.src_node_id)
            ok = not reply.has_error()
            record.sites[site] = SiteRound(site=site, node_id=reply.metadata.src_node_id,
                                           admission={}, admitted=ok,
                                           reason="plain" if ok else reply.error.reason)
            if ok:
                for metrics in reply.content.metric_records.values():
                    record.sites[site].train_metrics = {
                        k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                        if isinstance(v, (int, float))}
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        replies = list(replies)
        record = self._current
        assert record is not None
        for reply in replies:
            site = self._site(reply.metadata.src_node_id)
            if not reply.has_error() and site in record.sites:
                for metrics in reply.content.metric_records.values():
                    record.sites[site].eval_metrics = {
                        k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                        if isinstance(v, (int, float))}
        result = self.inner.aggregate_evaluate(server_round, replies)
        record.seconds = time.time() - record.started_at
        self.records.append(record)
        if self.on_round is not None:
            self.on_round(record)
        return result

    def summary(self) -> None:
        self.inner.summary()
