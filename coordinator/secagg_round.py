"""Secure aggregation's stages in one round, on the coordinator's side.

With ``--secure-aggregation`` the attested aggregator runs the masking protocol
(:mod:`cleanroom.protocol.secagg`) among a round's admitted sites; the coordinator only relays
its messages. Two pieces, kept apart from the round (:mod:`cleanroom.coordinator.rounds`) and
the Flower adapter (:mod:`cleanroom.coordinator.strategy`):

* :class:`SecAggStages`, Flower-free: the share-keys roster from the keys each site's evidence
  bound, the aggregator's requests for each stage by node, the sites' replies to the
  aggregator, and the dropouts (a site that refuses, errs, stays silent or is left out takes
  no further part in the round, and gets no model);
* :class:`SecAggExchange`, the thin Flower adapter: one message round trip per stage on the
  round's Grid (share-keys before the models go out, consistency and unmask after the masked
  inputs came back).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from cleanroom.coordinator.rounds import CoordinatorRound, RoundStateError
from cleanroom.errors import ProtocolError
from cleanroom.protocol.flower import (
    SECAGG_MESSAGE_TYPE,
    SECAGG_RECORD,
    error_reason,
    read_refusal,
    read_reply,
    read_secagg,
    secagg_content,
)


class SecAggStages:
    """Secure aggregation among ``round_``'s admitted sites (their attested keys)."""

    def __init__(self, round_: CoordinatorRound) -> None:
        if round_.aggregator is None:
            raise RoundStateError("secure aggregation runs inside the attested aggregator")
        self.round = round_
        self.aggregator: Any = round_.aggregator
        self._masked: dict[int, bytes] = {}

    def start(self) -> dict[int, bytes]:
        """The share-keys request for each admitted node; a node whose evidence bound no
        secure-aggregation keys is rejected for the round."""
        round_ = self.round
        sessions = round_.sessions()
        roster = {s.site: s.secagg_keys for s in sessions.values() if s.secagg_keys}
        for node_id in [n for n, s in sessions.items() if s.secagg_keys is None]:
            round_.reject(node_id, "protocol: no secure-aggregation keys this round")
        if len(roster) < 2:
            round_.record.secure_aggregation = {"failure": "fewer than 2 sites with keys"}
            return {}
        request = self.aggregator.secagg_begin(round_.round, roster)
        round_.record.secure_aggregation = {"sites": sorted(roster)}
        return {n: request for n in round_.sessions()}

    def receive(self, node_id: int, stage: str, message: bytes) -> None:
        """A node's reply to a stage, handed to the aggregator; a bad one drops the site."""
        site = self.round.site(node_id)
        if site is None:
            return
        self.round.record.bytes_received += len(message)
        verdict = self.aggregator.secagg_receive(self.round.round, site, stage, message)
        if not verdict.accepted:
            self.drop(node_id, verdict.reason)

    def drop(self, node_id: int, reason: str) -> None:
        """A site out of this round's secure aggregation (no answer, a refusal, a bad reply):
        no model goes to it; masks it shared are removed from the sum by the others."""
        site = self.round.site(node_id)
        if site is None:
            return
        info = self.round.record.secure_aggregation
        dropped = info.setdefault("dropped", {})  # type: ignore[union-attr]
        dropped[site] = reason
        self.round.reject(node_id, f"secure aggregation: {reason}")

    def requests(self, stage: str) -> dict[int, bytes]:
        """The aggregator's requests for ``stage`` (masked-input, consistency, unmask), by
        node; for masked-input, admitted sites the protocol left out get no model."""
        by_site = {s.site: n for n, s in self.round.sessions().items()}
        requests = self.aggregator.secagg_requests(self.round.round, stage)
        out = {by_site[site]: data for site, data in requests.items() if site in by_site}
        if stage == "masked-input":
            for node_id in set(by_site.values()) - set(out):
                self.drop(node_id, "left out after sharing keys (too few neighbours)")
            self._masked = out
        for data in out.values():
            self.round.record.bytes_sent += len(data)
        return out

    def masked_input(self, node_id: int) -> bytes | None:
        """The masked-input request that rides on ``node_id``'s train instruction."""
        return self._masked.get(node_id)


class SecAggExchange:
    """The stages of :class:`SecAggStages` as message round trips on one round's Grid."""

    def __init__(self, round_: CoordinatorRound, grid: Grid, timeout: float) -> None:
        self.stages = SecAggStages(round_)
        self.grid = grid
        self.timeout = timeout

    def share_keys(self) -> list[int]:
        """Share-keys among the attested sites; the nodes that get a masked-input request."""
        self._exchange("share-keys", self.stages.start())
        return sorted(self.stages.requests("masked-input"))

    def masked_input(self, node_id: int) -> bytes | None:
        return self.stages.masked_input(node_id)

    def unmask(self) -> None:
        """After the masked inputs: the consistency and unmask stages (two more round trips),
        then the aggregator can unmask the sum."""
        for stage in ("consistency", "unmask"):
            self._exchange(stage, self.stages.requests(stage))

    def _exchange(self, stage: str, requests: dict[int, bytes]) -> None:
        """One stage: a query to each node, its reply to the aggregator; a node that refuses,
        errs or stays silent drops out of the round's sum."""
        stages, round_ = self.stages, self.stages.round.round
        messages = [Message(secagg_content(stage, data), node_id, SECAGG_MESSAGE_TYPE,
                            group_id=str(round_)) for node_id, data in requests.items()]
        answered = set()
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node_id = reply.metadata.src_node_id
            if node_id not in requests or node_id in answered:
                continue
            answered.add(node_id)
            if reply.has_error():
                stages.drop(node_id, f"site error: {error_reason(reply)}")
                continue
            try:
                refusal = read_refusal(reply.content)
                if refusal is not None:
                    stages.drop(node_id, f"refused: {refusal.code}: {refusal.detail}")
                    continue
                read_reply(reply.content, allowed={SECAGG_RECORD})
                answer = read_secagg(reply.content)
                if answer is None or answer[0] != stage:
                    raise ProtocolError(f"no {stage} reply")
            except ProtocolError as exc:
                stages.drop(node_id, f"protocol: {exc}")
                continue
            stages.receive(node_id, stage, answer[1])
        for node_id in set(requests) - answered:
            stages.drop(node_id, f"no {stage} reply before the timeout")
