"""ObservedStrategy: the plaintext baseline of the benchmarks, recorded like a confidential run.

No attestation, no encryption: a pass-through wrapper that only fills a :class:`RoundRecord`
per round from the plain replies, so the baseline is reported the same way as the
confidential run (report.json, MLflow).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from pydantic import ValidationError

from cleanroom.coordinator.records import RoundRecord, SiteRound
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.flower import DP_STEPS, TRAIN_LOSS, arrays_view, records_of
from cleanroom.protocol.reports import NUM_EXAMPLES, EvaluateReport, TrainReport


def _values(reply: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for metrics in records_of(reply.content, MetricRecord).values():
        out.update({k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                    if isinstance(v, (int, float))})
    return out


def plain_train_report(reply: Message) -> TrainReport | None:
    values = _values(reply)
    try:
        return TrainReport(num_examples=int(values.get(NUM_EXAMPLES, 0)),
                           steps=int(values.get(DP_STEPS, 0)),
                           train_loss=values.get(TRAIN_LOSS))
    except ValidationError:
        return None


def plain_evaluate_report(reply: Message) -> EvaluateReport | None:
    values = _values(reply)
    try:
        return EvaluateReport(num_examples=int(values.pop(NUM_EXAMPLES, 0)), metrics=values)
    except ValidationError:
        return None


class ObservedStrategy(Strategy):
    """Pass-through wrapper that only records rounds."""

    def __init__(self, inner: Strategy, *, node_sites: dict[int, str] | None = None) -> None:
        self.inner = inner
        self.node_sites = node_sites or {}
        self._current: RoundRecord | None = None
        self._finished: RoundRecord | None = None

    def _site(self, node_id: int) -> str:
        return self.node_sites.get(node_id, f"node-{node_id}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = RoundRecord(round=server_round, run_id=str(grid.run.run_id),
                                    model_digest=arrays_digest(arrays_view(arrays)))
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
                                           reason="plain" if ok else reply.error.reason,
                                           train=plain_train_report(reply) if ok else None)
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
                record.sites[site].evaluation = plain_evaluate_report(reply)
        result = self.inner.aggregate_evaluate(server_round, replies)
        import time

        record.seconds = time.time() - record.started_at
        self._finished, self._current = record, None
        return result

    def finished(self) -> RoundRecord | None:
        """The round whose last Flower step just ran (handed out once)."""
        record, self._finished = self._finished, None
        return record

    def summary(self) -> None:
        self.inner.summary()
