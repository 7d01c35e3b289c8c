"""The observers of a federated run (:mod:`cleanroom.coordinator.run`), one concern each
(the audit chain's is :class:`cleanroom.coordinator.receipts.AuditObserver`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cleanroom.coordinator.run import ClosedRun, FederatedRun, RoundEvent, RunObserver

log = logging.getLogger(__name__)


class CheckpointObserver(RunObserver):
    """After each round: the global model and the inner strategy's state, crash-safe; the
    round's receipt names the checkpoint's SHA-256 (a resume trusts only a receipted one)."""

    def opened(self, run: FederatedRun) -> None:
        from cleanroom.coordinator.checkpoint import write_rounds

        write_rounds(run.spec.stores.checkpoints, run.prior)  # (a fresh run: none)

    def round_closed(self, run: FederatedRun, event: RoundEvent) -> None:
        from cleanroom.coordinator.checkpoint import (
            Checkpoint,
            append_round,
            strategy_state,
            write_checkpoint,
        )

        if event.model is None:
            return
        directory = run.spec.stores.checkpoints
        append_round(directory, event.entry)
        event.checkpoint_sha256 = write_checkpoint(directory, Checkpoint(
            run_id=event.record.run_id, round=event.record.round, rounds=run.spec.plan.rounds,
            model=event.model, state=strategy_state(run.inner), meta=run.spec.checkpoint_meta))


def site_samples(records: list[Any]) -> dict[str, dict[str, int]]:
    """Train and test sample counts per site (from the sites' authenticated reports)."""
    samples: dict[str, dict[str, int]] = {}
    for record in records:
        for site, s in record.sites.items():
            entry = samples.setdefault(site, {})
            if s.train is not None:
                entry["train"] = s.train.num_examples
            if s.evaluation is not None:
                entry["test"] = s.evaluation.num_examples
    return samples


class ReportObserver(RunObserver):
    """report.json, report.png and the model card, at the end of the run."""

    def closed(self, run: FederatedRun, result: ClosedRun) -> None:
        from cleanroom.coordinator.model_card import build_model_card, write_model_card
        from cleanroom.coordinator.report import build_report, plot_report, write_report

        spec, out = run.spec, run.out
        plan = spec.plan
        report = build_report(
            result.records, prior=run.prior, run_id=run.run_id,
            audit_log=str(run.audit_path), audit_head=run.audit_head,
            mlflow=dict(run.tracking_info),
            policy={"name": spec.policy.name, "digest": run.gate.policy_digest,
                    "measurements": [m.hex() for m in spec.policy.measurements],
                    "simulated_root": str(spec.policy.simulated_root)
                    if spec.policy.simulated_root else None},
            model_card=str(out / "model_card.md"),
            privacy={"dp": plan.dp.enabled, "delta": plan.dp.delta,
                     "epsilon_target_per_run": plan.dp.epsilon if plan.dp.enabled else None},
            task=task_summary(spec.task), plan=plan.model_dump(mode="json"),
            strategy=spec.strategy, aggregator=run.aggregator_summary(),
            seconds=round(time_since(run.started), 3), **spec.report_extra)
        result.report = report
        result.paths["report"] = write_report(report, out)
        result.paths["plot"] = plot_report(report, out / "report.png")
        card = build_model_card(report, plan=report["plan"], task=report["task"],
                                site_samples=site_samples(result.records),
                                final_model_sha256=result.final_digest)
        result.paths["model_card.md"], result.paths["model_card.json"] = \
            write_model_card(card, out)
        if result.final_model is not None:
            import numpy as np

            path = out / "final_model.npz"
            np.savez(path, **result.final_model)
            result.paths["final_model"] = path


def task_summary(task: Any) -> dict[str, Any]:
    """report.json's ``task``: what ran (digests; never code)."""
    return {"name": task.name, "digest": task.digest,
            "architecture_digest": task.architecture_digest,
            "dataset": task.task.dataset_name, "description": task.task.description,
            "metrics": [*task.task.metrics, "loss"]}


def time_since(start: float) -> float:
    import time

    return time.time() - start


def round_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of one report round entry: counts, the task's metrics (client average
    as ``<name>_mean`` and per site as ``<name>.<site>``), epsilon per site."""
    metrics: dict[str, float] = {
        "attested": len(entry["attested"]), "quarantined": len(entry["quarantined"]),
        "bytes_sent": entry["bytes_sent"], "bytes_received": entry["bytes_received"],
        "round_seconds": entry["seconds"]}
    for name, value in (entry.get("means") or {}).items():
        if value is not None:
            metrics[f"{name}_mean"] = value
    for site, values in entry["metrics"].items():
        for name, value in values.items():
            metrics[f"{name}.{site}"] = value
    for site, eps in entry["epsilon"].items():
        if eps is not None:
            metrics[f"epsilon.{site}"] = eps
    return metrics


class TrackingObserver(RunObserver):
    """MLflow: parameters at the start, metrics per round, artifacts and the registered model
    at the end (never a site's update, a row or a key)."""

    def __init__(self) -> None:
        self.tracker: Any = None

    def opened(self, run: FederatedRun) -> None:
        from cleanroom.coordinator.tracking import MlflowTracker, default_tracking_uri

        spec, plan = run.spec, run.spec.plan
        self.tracker = MlflowTracker(spec.tracking_uri or default_tracking_uri(run.out),
                                     run.out / "mlartifacts", run_name=spec.run_name)
        run.tracking_info = {"tracking_uri": self.tracker.tracking_uri,
                             "run_id": self.tracker.run_id}
        self.tracker.log_params({
            "run_label": spec.label, "task": plan.task.name, "task_digest": plan.task.digest,
            "dataset": plan.task.dataset, "sites": ",".join(spec.sites),
            "rounds": plan.rounds, "strategy": spec.strategy, "dp": plan.dp.enabled,
            "epsilon": plan.dp.epsilon, "delta": plan.dp.delta,
            "local_steps": plan.local_steps, "sample_rate": plan.sample_rate, "lr": plan.lr,
            "optimizer": plan.optimizer, "max_grad_norm": plan.dp.max_grad_norm,
            "max_update_norm": plan.max_update_norm, "confidential": spec.confidential,
            "policy_digest": run.gate.policy_digest, **spec.params})
        tags = {"flower_run_id": str(run.run_id)}
        if spec.resume is not None:
            tags["resumed_after_round"] = str(spec.resume.checkpoint.round)
        self.tracker.set_tags(tags)

    def round_closed(self, run: FederatedRun, event: RoundEvent) -> None:
        self.tracker.log_metrics(round_metrics(event.entry), step=event.record.round)

    def failed(self, run: FederatedRun) -> None:
        if self.tracker is not None:
            self.tracker.end("FAILED")

    def closed(self, run: FederatedRun, result: ClosedRun) -> None:
        from cleanroom.coordinator.receipts import code_version

        tracker, spec = self.tracker, run.spec
        tracker.set_tags({"audit_head": run.audit_head, "audit_entries": str(run.audit_entries),
                          "code_version": code_version()})
        for name in ("model_card.md", "model_card.json"):
            if name in result.paths:
                tracker.log_artifact(result.paths[name], "model_card")
        if result.final_model is not None:
            import numpy as np

            tracker.log_artifact(result.paths["final_model"])
            model = torch_model(spec.task, result.final_model)
            tracker.log_model(model, registered_name=f"cleanroom-{spec.task.name}",
                              input_example=np.zeros((1, spec.task.n_features),
                                                     dtype=np.float32))
        for name in ("report", "plot", "audit"):
            if name in result.paths:
                tracker.log_artifact(result.paths[name])
        final = result.report.get("final", {})
        tracker.log_metrics({f"final_{name}_mean": value for name, value in final.items()
                             if isinstance(value, float) and name != "accuracy_mean"},
                            step=spec.plan.rounds)
        tracker.end("FINISHED")


def torch_model(task: Any, model: Any) -> Any:
    """The task's model holding the final global parameters (for the model registry)."""
    from cleanroom.models import set_parameters
    from cleanroom.task import build_task_model

    net = build_task_model(task.task)
    set_parameters(net, {k: v.astype("float32", copy=False) for k, v in model.items()})
    return net


class ProgressObserver(RunObserver):
    """Hands each round's report entry to a callback (progress bars, progress.jsonl)."""

    def __init__(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self.callback = callback

    def round_closed(self, run: FederatedRun, event: RoundEvent) -> None:
        self.callback(event.entry)
