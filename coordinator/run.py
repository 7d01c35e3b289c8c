"""One federated run on the coordinator side, wherever it executes.

A run has explicit steps: :meth:`FederatedRun.open` (the protocol's run id is known, nothing
sent yet), one :meth:`~FederatedRun.round_closed` per round (the run closes the round the
strategy finished, :class:`RunRounds`), then :meth:`~FederatedRun.close` (or
:meth:`~FederatedRun.fail`). What happens at each step is the business of
:class:`RunObserver`\\ s, each with one concern, called in order:

* :class:`CheckpointObserver`: the global model + server-optimiser state after each round
  (it names the checkpoint's digest in the round's receipt before the audit signs it);
* :class:`~cleanroom.coordinator.receipts.AuditObserver`: the signed hash chain (run start or
  resume, the receipt it builds for each round, run end);
* :class:`ReportObserver`: report.json, report.png and the model card at the end;
* :class:`TrackingObserver`: MLflow parameters, per-round metrics, artifacts, the registered
  model;
* :class:`ProgressObserver`: a caller's per-round callback (progress bars, progress.jsonl).

The simulation engine and the deployed ServerApp describe a run with a :class:`RunSpec` and
call :func:`run_federation` with a callback that starts the strategy on their Grid.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from cleanroom.attestation.validate.policy import Policy
from cleanroom.coordinator.checkpoint import Checkpoint
from cleanroom.coordinator.gate import SiteDirectory
from cleanroom.coordinator.records import RoundRecord
from cleanroom.errors import ConfigError
from cleanroom.protocol.wire import TrainPlan
from cleanroom.task import LoadedTask

log = logging.getLogger(__name__)

Execute = Callable[[Any], Any]  # (strategy) -> final ArrayRecord | None


@dataclass(frozen=True)
class Stores:
    """Where the coordinator keeps what outlives a run."""

    audit_key: Path  # Ed25519 signing key of the audit chain (created on first use, 0600)
    nonces: Path  # issued/consumed nonces (replay defence across restarts)
    watermarks: Path  # the sites' privacy-ledger watermarks (kept across runs)
    checkpoints: Path  # round checkpoints of this run


@dataclass(frozen=True)
class Resume:
    """A run continued from its last receipted checkpoint."""

    checkpoint: Checkpoint
    previous_audit: Path  # the audit chain that receipted it


@dataclass
class RunSpec:
    """Everything that defines one run on the coordinator side."""

    label: str  # the run's name until the protocol's run id is known
    out: Path
    policy: Policy
    plan: TrainPlan
    task: LoadedTask  # the consortium's task (the coordinator loads it: initial model, card)
    strategy: str
    stores: Stores
    directory: SiteDirectory = field(default_factory=SiteDirectory)
    strategy_options: dict[str, float] = field(default_factory=dict)
    min_nodes: int = 2
    attest_timeout: float = 120.0  # seconds to wait for attestation (and SecAgg) replies
    sites: list[str] = field(default_factory=list)
    expected_nodes: int | None = None  # nodes to wait for each round (default: len(sites))
    coordinator_id: str = ""
    confidential: bool = True  # False: the plaintext baseline of the benchmarks
    tracking: bool = True
    tracking_uri: str | None = None
    run_name: str = "cleanroom"
    resume: Resume | None = None
    tdx_collateral: Path | None = None  # Intel PCS collateral folder (TDX sites)
    aggregator: Any = None  # AggregatorLaunch: updates go to an attested aggregator enclave
    central_dp: Any = None  # CentralDp: noise added to the mean inside that enclave
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow parameters
    report_extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)  # to rebuild the run

    @property
    def protocol_run_id(self) -> str | None:
        """The run id the sites see: a resumed run keeps its first run's."""
        return self.resume.checkpoint.run_id if self.resume else None


@dataclass
class RunOutcome:
    report: dict[str, Any]
    report_path: Path
    plot_path: Path
    audit_path: Path
    seconds: float
    aggregator_rss: tuple[int, int] | None = None  # the aggregator enclave's (start, peak)


@dataclass
class RoundEvent:
    """One closed round as observers see it; the audit observer signs its receipt, naming
    the checkpoint an earlier observer wrote."""

    record: RoundRecord
    entry: dict[str, Any]  # the round's report entry
    model: OrderedDict[str, np.ndarray] | None  # the global model after the round
    checkpoint_sha256: str | None = None  # set by the checkpoint observer


@dataclass
class ClosedRun:
    """What the run produced, as the close step sees it."""

    final_model: OrderedDict[str, np.ndarray] | None
    final_digest: str | None
    last_round: int
    records: list[RoundRecord]
    report: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # report, plot, model cards...


class RunObserver:
    """One concern of a run; every step is a no-op unless overridden."""

    def opened(self, run: FederatedRun) -> None: ...

    def round_closed(self, run: FederatedRun, event: RoundEvent) -> None: ...

    def closed(self, run: FederatedRun, result: ClosedRun) -> None: ...

    def failed(self, run: FederatedRun) -> None: ...


class RunRounds(Strategy):
    """Flower's round loop as the run sees it: ``opened`` with the protocol's run id before
    anything is sent, and after each round's last step (``aggregate_evaluate``) the round the
    strategy finished handed to ``closed``. Rounds are numbered after ``offset`` (a resumed
    checkpoint's round: Flower counts from 1; sites, nonces, ledgers and the audit must see
    the run's real round numbers)."""

    def __init__(self, strategy: Any, *, offset: int = 0, run_id: str | None = None,
                 opened: Callable[[str], None] | None = None,
                 closed: Callable[[Any], None] | None = None) -> None:
        """``strategy``: a ConfidentialStrategy or ObservedStrategy (``finished()``);
        ``run_id``: the protocol's run id (default: Flower's)."""
        self.strategy = strategy
        self.offset = offset
        self.run_id = run_id
        self.opened, self.closed = opened, closed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.opened is not None:
            self.opened(self.run_id or str(grid.run.run_id))
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        result = self.strategy.aggregate_evaluate(server_round + self.offset, replies)
        finished = self.strategy.finished()
        if finished is not None and self.closed is not None:
            self.closed(finished)
        return result

    def summary(self) -> None:
        self.strategy.summary()


class FederatedRun:
    """A run's state between its steps: the gate, the strategies, the epsilon so far."""

    def __init__(self, spec: RunSpec, observers: Sequence[RunObserver], *,
                 wrapper: Any = None) -> None:
        """``wrapper``: a ConfidentialStrategy built by the caller (the public API's
        ``ConfidentialStrategy(FedAvg(), task=...)``) to run, with its own inner strategy;
        else the inner strategy is built from ``spec.strategy``."""
        from cleanroom.coordinator.checkpoint import restore_strategy_state
        from cleanroom.coordinator.gate import AttestationGate, NonceStore
        from cleanroom.coordinator.strategies import build_strategy
        from cleanroom.coordinator.watermarks import LedgerWatermarks

        check_task(spec)
        self.spec = spec
        self.observers = list(observers)
        self.started = time.time()
        self.out = Path(spec.out)
        self.out.mkdir(parents=True, exist_ok=True)
        collateral = None
        if spec.tdx_collateral is not None:
            from cleanroom.attestation.collateral_folder import CollateralFolder

            collateral = CollateralFolder(spec.tdx_collateral)
        self.gate = AttestationGate(spec.policy, NonceStore(spec.stores.nonces),
                                    coordinator_id=spec.coordinator_id,
                                    directory=spec.directory,
                                    watermarks=LedgerWatermarks(spec.stores.watermarks),
                                    collateral=collateral)
        self.inner = wrapper.inner if wrapper is not None else build_strategy(
            spec.strategy, min_nodes=spec.min_nodes, **spec.strategy_options)
        self.prior: list[dict[str, Any]] = []
        if spec.resume is not None:
            self.prior = list(spec.resume.checkpoint.meta.get("report_rounds", []))
            restore_strategy_state(self.inner, spec.resume.checkpoint.state)
        self.epsilon: dict[str, float | None] = {}
        for entry in self.prior:
            self.epsilon.update(entry.get("epsilon", {}))
        self.run_id: str | None = None
        self._records: list[RoundRecord] = []
        # facts observers hand on to later observers
        self.audit_path = self.out / "audit.jsonl"
        self.audit_head = ""
        self.audit_entries = 0
        self.tracking_info: dict[str, str] = {"tracking_uri": "", "run_id": ""}
        self.aggregator: Any = self._launch_aggregator()
        try:
            self.strategy: Any = self._wrap(wrapper)
        except BaseException:
            self.shutdown()
            raise

    def _launch_aggregator(self) -> Any:
        """Start the attested aggregator's enclave (None: the operator's process opens
        updates, as before)."""
        spec = self.spec
        if spec.aggregator is None or not spec.confidential:
            for wanted, what in ((spec.central_dp is not None, "central DP is added"),
                                 (spec.plan.secure_aggregation, "secure aggregation runs")):
                if wanted:
                    raise ConfigError(f"{what} inside the attested aggregator: it needs one "
                                      "(drop --no-aggregator)")
            return None
        from cleanroom.coordinator.aggregator_enclave import AggregatorHandle
        from cleanroom.coordinator.strategies import aggregates_by_sum

        robust = None if aggregates_by_sum(self.inner) else self.inner
        if robust is not None and spec.plan.secure_aggregation:
            raise ConfigError(f"strategy {type(self.inner).__name__} needs every single "
                              "update; secure aggregation releases only their sum: use a "
                              "strategy that aggregates by a mean (fedavg, fedprox, fedavgm, "
                              "fedadam, fedyogi, fedadagrad) or drop --secure-aggregation")
        if robust is not None and spec.central_dp is not None:
            raise ConfigError(f"central DP adds noise to the mean of the updates; strategy "
                              f"{type(self.inner).__name__} does not aggregate by a mean")
        return AggregatorHandle(spec.aggregator, spec.plan, central_dp=spec.central_dp,
                                robust=robust)

    def aggregator_summary(self) -> dict[str, Any] | None:
        """What reports, receipts and the model card say about the aggregator (no keys)."""
        if self.aggregator is None:
            return None
        launch, central = self.spec.aggregator, self.spec.central_dp
        measurement = getattr(self.aggregator, "measurement", None)
        return {"provider": launch.provider, "isolation": launch.isolation,
                "measurement": measurement.hex() if measurement else None,
                "aggregates_inside": self.aggregator.robust_inside,
                "central_dp": None if central is None else {
                    "noise_multiplier": central.noise_multiplier, "clip": central.clip,
                    "delta": central.delta, "accountant": "RDP, user level: every site "
                    "every round"}}

    def shutdown(self) -> None:
        """Stop the aggregator enclave (its round keys die with it)."""
        if self.aggregator is not None:
            self.aggregator.close()

    def _wrap(self, wrapper: Any) -> Any:
        from cleanroom.coordinator.observed import ObservedStrategy
        from cleanroom.coordinator.strategy import ConfidentialStrategy

        spec = self.spec
        if wrapper is not None:
            strategy: Any = wrapper.attach(
                gate=self.gate, plan=spec.plan,
                expected_nodes=spec.expected_nodes or len(spec.sites) or None,
                run_id=spec.protocol_run_id, aggregator=self.aggregator,
                min_sites=spec.min_nodes)
            strategy.attest_timeout = min(strategy.attest_timeout, spec.attest_timeout)
        elif spec.confidential:
            strategy: Any = ConfidentialStrategy(
                self.inner, gate=self.gate, plan=spec.plan, attest_timeout=spec.attest_timeout,
                expected_nodes=spec.expected_nodes or len(spec.sites) or None,
                run_id=spec.protocol_run_id, aggregator=self.aggregator)
        else:
            strategy = ObservedStrategy(self.inner, node_sites=dict(spec.directory.names))
        self.wrapper = strategy
        return RunRounds(strategy, offset=spec.resume.checkpoint.round if spec.resume else 0,
                         run_id=spec.protocol_run_id, opened=self.open,
                         closed=self.round_closed)

    @property
    def records(self) -> list[RoundRecord]:
        return list(self._records)

    # ------------------------------------------------------------------ steps
    def open(self, run_id: str) -> None:
        """The protocol's run id is known and nothing was sent yet (idempotent)."""
        if self.run_id is not None:
            return
        self.run_id = run_id
        for observer in self.observers:
            observer.opened(self)

    def round_closed(self, finished: Any) -> None:
        """Close the round the strategy finished (a CoordinatorRound; the plaintext baseline
        hands its RoundRecord) and hand it to the observers."""
        from cleanroom.coordinator.report import round_entry

        record = finished if isinstance(finished, RoundRecord) else finished.close()
        self._records.append(record)
        event = RoundEvent(record=record, entry=round_entry(record, self.epsilon),
                           model=getattr(self.wrapper, "model_after_round", None))
        for observer in self.observers:
            observer.round_closed(self, event)

    def fail(self) -> None:
        self.gate.watermarks.flush()
        self.open(self.spec.label)
        for observer in self.observers:
            observer.failed(self)

    def close(self, final_arrays: Any) -> ClosedRun:
        from cleanroom.protocol.arrays import arrays_digest
        from cleanroom.protocol.flower import arrays_to_numpy

        self.gate.watermarks.flush()  # the last round's ledger counts (from its train replies)
        self.open(self.spec.label)  # (no round ran)
        model = arrays_to_numpy(final_arrays) if final_arrays is not None and \
            len(final_arrays) else None
        resume = self.spec.resume
        if model is None and resume is not None:  # no round aggregated after the resume
            model = resume.checkpoint.model
        records = self.records
        last = records[-1].round if records else (resume.checkpoint.round if resume else 0)
        result = ClosedRun(final_model=model,
                           final_digest=arrays_digest(model) if model is not None else None,
                           last_round=last, records=records)
        for observer in self.observers:
            observer.closed(self, result)
        return result

    def execute(self, execute: Execute) -> ClosedRun:
        try:
            final = execute(self.strategy)
        except BaseException:
            self.shutdown()
            self.fail()
            raise
        self.shutdown()
        return self.close(final)


def check_task(spec: RunSpec) -> None:
    """A run starts only for a task the coordinator's policy lists, planned as loaded."""
    task, ref = spec.task, spec.plan.task
    if (ref.digest, ref.architecture_digest) != (task.digest, task.architecture_digest):
        raise ConfigError(f"the plan names task {ref.name} {ref.digest[:16]}..., the run loaded "
                          f"{task.name} {task.digest[:16]}...")
    if task.digest not in spec.policy.tasks:
        raise ConfigError(f"task {task.name} (digest {task.digest}) is not in the coordinator "
                          f"policy's tasks ({spec.policy.name}): add it to 'tasks' in the "
                          "policy to run it")


def default_observers(spec: RunSpec, on_round: Callable[[dict[str, Any]], None] | None = None,
                      ) -> list[RunObserver]:
    from cleanroom.coordinator.observers import (
        CheckpointObserver,
        ProgressObserver,
        ReportObserver,
        TrackingObserver,
    )
    from cleanroom.coordinator.receipts import AuditObserver

    observers: list[RunObserver] = []
    if spec.confidential:
        observers.append(CheckpointObserver())
    observers.append(AuditObserver())
    observers.append(ReportObserver())
    if spec.tracking:
        observers.append(TrackingObserver())
    if on_round is not None:
        observers.append(ProgressObserver(on_round))
    return observers


def run_federation(spec: RunSpec, execute: Execute,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Run ``spec`` with ``execute`` and write every output into ``spec.out``."""
    run = FederatedRun(spec, default_observers(spec, on_round))
    result = run.execute(execute)
    return RunOutcome(report=result.report, report_path=result.paths["report"],
                      plot_path=result.paths["plot"], audit_path=result.paths["audit"],
                      seconds=time.time() - run.started,
                      aggregator_rss=_enclave_rss(run.aggregator))


def _enclave_rss(aggregator: Any) -> tuple[int, int] | None:
    start = getattr(aggregator, "start_rss_bytes", None)
    peak = getattr(aggregator, "peak_rss_bytes", None)
    return None if start is None or peak is None else (start, peak)


def initial_model(spec: RunSpec, seed: int) -> OrderedDict[str, np.ndarray]:
    """Round 1's global model (the task's model, initialised from ``seed``), or the resumed
    checkpoint's."""
    if spec.resume is not None:
        return spec.resume.checkpoint.model
    import torch

    from cleanroom.models import get_parameters
    from cleanroom.task import build_task_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return get_parameters(build_task_model(spec.task.task))
    finally:
        torch.random.set_rng_state(state)


def start_rounds(strategy: Any, grid: Any, spec: RunSpec, *, seed: int,
                 pause_after: int = 0, timeout: float = 3600.0) -> Any:
    """Run the wrapped strategy's rounds on ``grid`` (the one start-up path of simulations and
    deployments): from round 1 or after the resumed checkpoint's round, to the plan's last
    round or ``pause_after``; returns the final ArrayRecord (None if no round trained)."""
    from flwr.app import ArrayRecord

    from cleanroom.protocol.flower import numpy_to_arrays

    done = spec.resume.checkpoint.round if spec.resume else 0
    last = min(spec.plan.rounds, pause_after) if pause_after > done else spec.plan.rounds
    result = strategy.start(grid=grid, initial_arrays=numpy_to_arrays(initial_model(spec, seed)),
                            num_rounds=last - done, timeout=timeout)
    return result.arrays if isinstance(result.arrays, ArrayRecord) else None
