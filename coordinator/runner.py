"""One federated run, wherever it executes: gate, strategy, audit chain, tracking, report.

The simulation engine and the deployed ServerApp both describe a run with a :class:`RunSpec`
and hand :func:`run_federation` a callback that starts the strategy on their Grid (in-process,
Flower's simulation runtime, or a SuperLink). Everything else is here, once: the attestation
gate, the confidential strategy, the signed audit chain (run start, a receipt per round, run
end), MLflow, report.json/report.png, the model card and the registered model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleanroom.attestation.validate.policy import Policy
from cleanroom.protocol.wire import TrainPlan

log = logging.getLogger(__name__)

Execute = Callable[[Any], Any]  # (strategy) -> final ArrayRecord | None


@dataclass
class RunSpec:
    """Everything that defines one run on the coordinator side."""

    run_id: str  # label until the protocol's run id is known (deployments: the same)
    out: Path
    policy: Policy
    plan: TrainPlan
    strategy: str
    dataset: str
    audit_key: Path
    strategy_options: dict[str, float] = field(default_factory=dict)
    min_nodes: int = 2
    confidential: bool = True
    tracking: bool = True
    tracking_uri: str | None = None
    run_name: str = "cleanroom"
    coordinator_id: str = ""
    node_keys: dict[int, bytes] | None = None  # deployment: Flower node auth keys (PEM SPKI)
    node_sites: dict[int, str] | None = None  # deployment / baseline: node id -> site name
    sites: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # extra MLflow parameters
    report_extra: dict[str, Any] = field(default_factory=dict)
    nonce_file: Path | None = None
    watermark_file: Path | None = None  # site ledger watermarks (keep across runs)
    expected_nodes: int | None = None  # nodes to wait for each round (default: len(sites))
    checkpoint_dir: Path | None = None  # round checkpoints (default: out/checkpoint)
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)  # to rebuild the run
    resume: Any = None  # a coordinator.checkpoint.Checkpoint to continue from
    protocol_run_id: str | None = None  # the run id sites see (default: the engine's)
    previous_audit: Path | None = None  # a resume's earlier audit chain (default: out's)


@dataclass
class RunOutcome:
    report: dict[str, Any]
    report_path: Path
    plot_path: Path
    audit_path: Path
    seconds: float


def open_audit(path: Path, key_path: Path) -> Any:
    """The coordinator's audit log, with its signing key created on first use (mode 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cleanroom.coordinator.audit import AuditLog, load_signing_key
    from cleanroom.fsutil import write_private

    if not key_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return AuditLog(path, load_signing_key(key_path))


def round_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of one report round entry."""
    metrics: dict[str, float] = {
        "attested": len(entry["attested"]), "quarantined": len(entry["quarantined"]),
        "bytes_sent": entry["bytes_sent"], "bytes_received": entry["bytes_received"],
        "round_seconds": entry["seconds"]}
    if entry["accuracy_mean"] is not None:
        metrics["accuracy_mean"] = entry["accuracy_mean"]
        metrics["loss_mean"] = entry["loss_mean"]
    for site, m in entry["metrics"].items():
        metrics[f"accuracy.{site}"] = m["accuracy"]
        metrics[f"loss.{site}"] = m["loss"]
    for site, eps in entry["epsilon"].items():
        if eps is not None:
            metrics[f"epsilon.{site}"] = eps
    return metrics


def site_samples(records: list[Any]) -> dict[str, dict[str, int]]:
    samples: dict[str, dict[str, int]] = {}
    for record in records:
        for site, s in record.sites.items():
            entry = samples.setdefault(site, {})
            if "num-examples" in s.train_metrics:
                entry["train"] = int(s.train_metrics["num-examples"])
            if "num-examples" in s.eval_metrics:
                entry["test"] = int(s.eval_metrics["num-examples"])
    return samples


def run_federation(spec: RunSpec, execute: Execute,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> RunOutcome:
    """Run ``spec`` with ``execute`` and write every output into ``spec.out``."""
    from cleanroom.coordinator.audit import public_key_hex
    from cleanroom.coordinator.checkpoint import (
        Checkpoint,
        RoundOffset,
        append_round,
        check_against_audit,
        restore_strategy_state,
        strategy_state,
        write_checkpoint,
        write_rounds,
    )
    from cleanroom.coordinator.gate import AttestationGate, NonceStore
    from cleanroom.coordinator.model_card import build_model_card, write_model_card
    from cleanroom.coordinator.receipts import code_version, round_receipt
    from cleanroom.coordinator.report import build_report, plot_report, round_entry, write_report
    from cleanroom.coordinator.strategies import build_strategy
    from cleanroom.coordinator.strategy import ConfidentialStrategy, ObservedStrategy, RoundRecord
    from cleanroom.coordinator.tracking import MlflowTracker, NullTracker, default_tracking_uri
    from cleanroom.coordinator.watermarks import LedgerWatermarks
    from cleanroom.protocol.arrays import arrays_digest

    started = time.time()
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    gate = AttestationGate(spec.policy, NonceStore(spec.nonce_file or out / "nonces.jsonl"),
                           coordinator_id=spec.coordinator_id, node_keys=spec.node_keys,
                           node_sites=spec.node_sites if spec.node_keys is not None else None,
                           watermarks=LedgerWatermarks(
                               spec.watermark_file or out / "ledger_watermarks.json"),
                           site_hints=spec.node_sites)
    inner = build_strategy(spec.strategy, min_nodes=spec.min_nodes, **spec.strategy_options)
    resume = spec.resume
    prior: list[dict[str, Any]] = list(resume.meta.get("report_rounds", [])) if resume else []
    previous_head = ""
    if resume is not None:
        previous_head = resume.audit_head or check_against_audit(  # (load_resumable checked)
            resume, spec.previous_audit or out / "audit.jsonl")
        restore_strategy_state(inner, resume.state)
    checkpoint_dir = spec.checkpoint_dir or out / "checkpoint"
    if spec.confidential:
        write_rounds(checkpoint_dir, prior)  # (a fresh run: none)
    audit = open_audit(out / "audit.jsonl", spec.audit_key)

    tracker: Any = NullTracker()
    if spec.tracking:
        tracker = MlflowTracker(spec.tracking_uri or default_tracking_uri(out),
                                out / "mlartifacts", run_name=spec.run_name)
        plan = spec.plan
        tracker.log_params({
            "run_label": spec.run_id, "dataset": spec.dataset,
            "sites": ",".join(spec.sites),
            "rounds": plan.rounds, "strategy": spec.strategy, "dp": plan.dp.enabled,
            "epsilon": plan.dp.epsilon, "delta": plan.dp.delta, "model": plan.model,
            "local_steps": plan.local_steps, "sample_rate": plan.sample_rate, "lr": plan.lr,
            "optimizer": plan.optimizer, "max_grad_norm": plan.dp.max_grad_norm,
            "max_update_norm": plan.max_update_norm, "confidential": spec.confidential,
            "policy_digest": gate.policy_digest, **spec.params})

    started_run: dict[str, str] = {}

    def on_start(run_id: str) -> None:
        """First round, before anything is sent: the protocol's run id is now known."""
        if started_run:
            return
        started_run["run_id"] = run_id
        common = {"coordinator_public_key": public_key_hex(audit.key),
                  "code_version": code_version(), "run_id": run_id,
                  "policy_digest": gate.policy_digest}
        if resume is not None:
            audit.append("run-resume", {
                **common, "from_round": resume.round, "rounds": resume.rounds,
                "checkpoint_sha256": resume.sha256, "previous_audit_head": previous_head,
                "checkpoint_model_sha256": arrays_digest(resume.model)})
            tracker.set_tags({"flower_run_id": run_id, "resumed_after_round": str(resume.round)})
            return
        audit.append("run-start", {
            **common, "strategy": spec.strategy, "sites": spec.sites,
            "policy_name": spec.policy.name,
            "measurements": [m.hex() for m in spec.policy.measurements],
            "plan": spec.plan.model_dump(mode="json")})
        tracker.set_tags({"flower_run_id": run_id})

    epsilon_so_far: dict[str, float | None] = {}
    for prior_entry in prior:
        epsilon_so_far.update(prior_entry.get("epsilon", {}))

    def record_round(record: RoundRecord) -> None:
        receipt = round_receipt(record, policy_digest=gate.policy_digest)
        entry = round_entry(record, epsilon_so_far)
        model = getattr(strategy, "model_after_round", None)
        if model is not None and spec.confidential:
            append_round(checkpoint_dir, entry)
            receipt["checkpoint_sha256"] = write_checkpoint(checkpoint_dir, Checkpoint(
                run_id=record.run_id, round=record.round, rounds=spec.plan.rounds,
                model=model, state=strategy_state(inner), meta=spec.checkpoint_meta))
        audit.append("round-receipt", receipt)
        tracker.log_metrics(round_metrics(entry), step=record.round)
        if on_round is not None:
            on_round(entry)

    if spec.confidential:
        strategy: Any = ConfidentialStrategy(inner, gate=gate, plan=spec.plan,
                                             expected_nodes=spec.expected_nodes
                                             or len(spec.sites) or None,
                                             on_round=record_round, on_start=on_start,
                                             run_id=spec.protocol_run_id)
    else:  # the plaintext baseline of the benchmarks: same run, no attestation, no HPKE
        strategy = ObservedStrategy(inner, on_round=record_round, node_sites=spec.node_sites,
                                    on_start=on_start)
    runnable = RoundOffset(strategy, resume.round) if resume is not None else strategy
    try:
        final_arrays = execute(runnable)
        if final_arrays is not None and len(final_arrays) == 0:
            final_arrays = None  # no round trained: Flower returns an empty ArrayRecord
    except BaseException:
        gate.watermarks.flush()
        on_start(spec.run_id)
        audit.append("run-end", {"status": "failed", "rounds": len(strategy.records)})
        tracker.end("FAILED")
        raise

    from cleanroom.protocol.flower import arrays_to_numpy, numpy_to_arrays

    if final_arrays is None and resume is not None:  # no round aggregated after the resume
        final_arrays = numpy_to_arrays(resume.model)
    gate.watermarks.flush()  # the last round's ledger counts (from its train replies)
    on_start(spec.run_id)  # (no round ran)
    run_id = started_run["run_id"]
    final_digest = arrays_digest(arrays_to_numpy(final_arrays)) if final_arrays else None
    last = strategy.records[-1] if strategy.records else None
    last_round = last.round if last else (resume.round if resume else 0)
    head = audit.append("run-end", {
        "status": "completed" if last_round >= spec.plan.rounds else "paused",
        "last_round": last_round, "rounds": len(strategy.records),
        "final_model_sha256": final_digest,
        "attested_last_round": last.attested if last else [],
        "epsilon": dict(epsilon_so_far)})
    tracker.set_tags({"audit_head": head, "audit_entries": str(audit.seq),
                      "code_version": code_version()})
    report = build_report(
        strategy.records, prior=prior, run_id=run_id, audit_log=str(audit.path), audit_head=head,
        mlflow={"tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id},
        policy={"name": spec.policy.name, "digest": gate.policy_digest,
                "measurements": [m.hex() for m in spec.policy.measurements],
                "simulated_root": str(spec.policy.simulated_root)
                if spec.policy.simulated_root else None},
        model_card=str(out / "model_card.md"),
        privacy={"dp": spec.plan.dp.enabled, "delta": spec.plan.dp.delta,
                 "epsilon_target_per_run": spec.plan.dp.epsilon if spec.plan.dp.enabled
                 else None},
        seconds=round(time.time() - started, 3), **spec.report_extra)
    report_path = write_report(report, out)
    plot_path = plot_report(report, out / "report.png")
    card = build_model_card(report, site_samples=site_samples(strategy.records),
                            architecture_digest=spec.plan.model_architecture_digest,
                            final_model_sha256=final_digest)
    for path in write_model_card(card, out):
        tracker.log_artifact(path, "model_card")
    if final_arrays is not None:
        tracker.log_artifact(save_model(final_arrays, out / "final_model.npz"))
        import numpy as np

        model = torch_model(spec.plan.model, final_arrays)
        n_features = next(iter(model.parameters())).shape[-1]
        tracker.log_model(model, registered_name=f"cleanroom-{spec.dataset}-{spec.plan.model}",
                          input_example=np.zeros((1, n_features), dtype=np.float32))
    for path in (report_path, plot_path, audit.path):
        tracker.log_artifact(path)
    if report["final"]["accuracy_mean"] is not None:
        tracker.log_metrics({"final_accuracy_mean": report["final"]["accuracy_mean"]},
                            step=spec.plan.rounds)
    tracker.end("FINISHED")
    return RunOutcome(report, report_path, plot_path, audit.path, time.time() - started)


def torch_model(name: str, arrays: Any) -> Any:
    from cleanroom.models import build_model, set_parameters
    from cleanroom.protocol.flower import arrays_to_numpy

    model = build_model(name)
    set_parameters(model, {k: v.astype("float32", copy=False)
                           for k, v in arrays_to_numpy(arrays).items()})
    return model


def save_model(arrays: Any, path: Path) -> Path:
    import numpy as np

    from cleanroom.protocol.flower import arrays_to_numpy

    np.savez(path, **arrays_to_numpy(arrays))
    return path
