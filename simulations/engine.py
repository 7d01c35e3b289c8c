"""The local multi-site simulation: the whole protocol on one machine.

Builds a simulated consortium (a simulated AMD root, one simulated enclave per hospital, the
coordinator's policy with the honest code measurement), wraps the chosen Flower strategy in
:class:`coordinator.strategy.ConfidentialStrategy`, runs it on either Flower's simulation
runtime (``ray`` backend) or the in-process Grid, and records everything (report.json,
report.png, MLflow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cleanroom.errors import ConfigError

log = logging.getLogger(__name__)

Backend = Literal["inprocess", "ray"]
NODE_ID_BASE = 1000  # in-process node ids: NODE_ID_BASE + partition id


class SimulationConfig(BaseModel):
    """Everything ``cleanroom simulate`` can set (validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Literal["heart-disease", "synthetic"] = "heart-disease"
    sites: int = Field(4, ge=2, le=64, description="synthetic only; heart-disease has 4")
    rounds: int = Field(5, ge=1, le=1000)
    strategy: str = "fedadam"
    dp: bool = True
    epsilon: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    scenario: str = "honest"
    hostile_site: str | None = None
    out: Path = Path("runs/latest")
    seed: int = 0
    model: str = "logreg"
    local_steps: int = Field(10, ge=1)
    sample_rate: float = Field(1.0, gt=0, le=1)
    lr: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_update_norm: float = Field(50.0, gt=0)
    backend: Backend = "inprocess"
    tracking: bool = True
    tracking_uri: str | None = None
    state_dir: Path | None = None
    site_budget: float | None = Field(None, gt=0)
    confidential: bool = True
    progress: bool = True
    workers: int = Field(4, ge=1, le=64, description="inprocess: sites served in parallel "
                         "(threads), as real sites train at the same time")
    strategy_options: dict[str, float] = Field(default_factory=dict)


@dataclass
class SimulationResult:
    report: dict[str, Any]
    report_path: Path
    plot_path: Path | None
    seconds: float


def site_names(config: SimulationConfig) -> list[str]:
    if config.dataset == "heart-disease":
        from site_agent.data import HEART_DISEASE_SITES

        return list(HEART_DISEASE_SITES)
    return [f"site{i:02d}" for i in range(config.sites)]


def _site_configs(config: SimulationConfig, state: Path, root_dir: Path,
                  hostile: str | None) -> list[Any]:
    from site_agent.config import DataConfig, EnclaveConfig, PrivacyConfig, SiteConfig

    configs = []
    for index, name in enumerate(site_names(config)):
        data = DataConfig(kind=config.dataset, name=name, index=index,
                          seed=config.seed * 1000 + index)
        lifetime = config.site_budget if config.site_budget is not None else max(
            10.0, 10 * config.epsilon)
        if hostile == name and config.scenario == "over-budget":
            from simulations.scenarios import OVER_BUDGET_EPSILON

            lifetime = OVER_BUDGET_EPSILON
        privacy = PrivacyConfig(delta=config.delta, lifetime_epsilon=lifetime,
                                max_epsilon_per_run=config.epsilon, allow_no_dp=not config.dp)
        configs.append(SiteConfig(site=name, state_dir=state / "sites" / name, data=data,
                                  enclave=EnclaveConfig(provider="simulated",
                                                        simulated_root=root_dir),
                                  privacy=privacy, seed=config.seed * 7919 + index))
    return configs


def run_simulation(config: SimulationConfig,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> SimulationResult:
    """Run one simulated federated training and write its report; returns the result."""
    from cleanroom.attestation.simulated import ensure_simulated_root
    from cleanroom.attestation.validate.policy import Policy
    from cleanroom.protocol.wire import DpPlan, TrainPlan
    from coordinator.gate import AttestationGate, NonceStore
    from coordinator.model_card import build_model_card, write_model_card
    from coordinator.strategies import build_strategy
    from coordinator.strategy import ConfidentialStrategy, ObservedStrategy, RoundRecord
    from coordinator.tracking import MlflowTracker, NullTracker, default_tracking_uri
    from models import architecture_digest
    from simulations.report import build_report, plot_report, round_entry, write_report
    from simulations.scenarios import SCENARIOS, Fault, SimulatedSites
    from site_agent.runtime import code_measurement

    started = time.time()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every step at INFO
    if config.scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {config.scenario!r}; choose one of "
                          f"{', '.join(SCENARIOS)}")
    names = site_names(config)
    hostile = None
    if config.scenario != "honest":
        hostile = config.hostile_site or names[-1]
        if hostile not in names:
            raise ConfigError(f"hostile site {hostile!r} is not one of {names}")
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = Path(config.state_dir).resolve() if config.state_dir else out / "state"
    root_dir = state / "simulated-root"
    root = ensure_simulated_root(root_dir)
    site_configs = _site_configs(config, state, root_dir, hostile)
    faults = {hostile: Fault(config.scenario)} if hostile else {}
    sites = SimulatedSites(site_configs, faults)

    policy = Policy(name="simulation", environment="simulation",
                    simulated_root=root.bundle_path, measurements=[code_measurement()])
    plan = TrainPlan(rounds=config.rounds, local_steps=config.local_steps,
                     sample_rate=config.sample_rate, lr=config.lr, optimizer=config.optimizer,
                     momentum=config.momentum,
                     dp=DpPlan(enabled=config.dp, epsilon=config.epsilon, delta=config.delta,
                               max_grad_norm=config.max_grad_norm),
                     model=config.model, model_architecture_digest=architecture_digest(
                         config.model), max_update_norm=config.max_update_norm)
    gate = AttestationGate(policy, NonceStore(out / "coordinator" / "nonces.jsonl"),
                           coordinator_id="simulation-coordinator")
    inner = build_strategy(config.strategy, min_nodes=2, **config.strategy_options)
    audit = open_audit(out / "audit.jsonl", state / "coordinator" / "audit_signing_key.pem")

    tracker: Any = NullTracker()
    if config.tracking:
        uri = config.tracking_uri or default_tracking_uri(out)
        tracker = MlflowTracker(uri, out / "mlartifacts", run_name=f"{config.scenario}-"
                                f"{config.strategy}-s{config.seed}")
        tracker.log_params({
            "dataset": config.dataset, "sites": ",".join(names), "rounds": config.rounds,
            "strategy": config.strategy, "dp": config.dp, "epsilon": config.epsilon,
            "delta": config.delta, "scenario": config.scenario, "hostile_site": hostile,
            "model": config.model, "local_steps": config.local_steps,
            "sample_rate": config.sample_rate, "lr": config.lr, "optimizer": config.optimizer,
            "max_grad_norm": config.max_grad_norm, "max_update_norm": config.max_update_norm,
            "backend": config.backend, "seed": config.seed, "confidential": config.confidential,
            "policy_digest": gate.policy_digest,
            "code_measurement": code_measurement().hex(),
        })

    from coordinator.audit import public_key_hex
    from coordinator.receipts import code_version, round_receipt

    audit.append("run-start", {
        "coordinator_public_key": public_key_hex(audit.key), "code_version": code_version(),
        "run_id": str(config.seed + 1), "strategy": config.strategy, "sites": names,
        "scenario": config.scenario, "policy_digest": gate.policy_digest,
        "measurements": [m.hex() for m in policy.measurements],
        "plan": plan.model_dump(mode="json")})
    epsilon_so_far: dict[str, float | None] = {}

    def record_round(record: RoundRecord) -> None:
        audit.append("round-receipt", round_receipt(record, policy_digest=gate.policy_digest))
        entry = round_entry(record, dict(epsilon_so_far))
        for site, s in record.sites.items():
            if "epsilon-run" in s.train_metrics:
                epsilon_so_far[site] = s.train_metrics["epsilon-run"]
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
        tracker.log_metrics(metrics, step=record.round)
        if on_round is not None:
            on_round(entry)

    if config.confidential:
        strategy: Any = ConfidentialStrategy(inner, gate=gate, plan=plan, on_round=record_round)
    else:  # the plaintext baseline of the benchmarks: same run, no attestation, no HPKE
        strategy = ObservedStrategy(inner, on_round=record_round, node_sites={
            NODE_ID_BASE + i: name for i, name in enumerate(names)})
    status = "FAILED"
    try:
        final_arrays = _execute(config, strategy, sites, plan)
        status = "FINISHED"
    finally:
        if status != "FINISHED":
            tracker.end(status)

    final_digest = None
    if final_arrays is not None:
        from cleanroom.protocol.arrays import arrays_digest
        from cleanroom.protocol.flower import arrays_to_numpy

        final_digest = arrays_digest(arrays_to_numpy(final_arrays))
    last = strategy.records[-1] if strategy.records else None
    head = audit.append("run-end", {
        "rounds": len(strategy.records), "final_model_sha256": final_digest,
        "attested_last_round": last.attested if last else [],
        "epsilon": {s: e for s, e in epsilon_so_far.items()}})
    tracker.set_tags({"audit_head": head, "audit_entries": str(audit.seq),
                      "code_version": code_version()})
    report = build_report(
        strategy.records,
        audit_log=str(audit.path), audit_head=head,
        mlflow={"tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id},
        config=config.model_dump(mode="json"),
        scenario={"name": config.scenario, "hostile_site": hostile,
                  "description": SCENARIOS[config.scenario]},
        policy={"name": policy.name, "digest": gate.policy_digest,
                "measurements": [m.hex() for m in policy.measurements],
                "simulated_root": str(root.bundle_path)},
        seconds=round(time.time() - started, 3),
    )
    report["model_card"] = str(out / "model_card.md")
    report_path = write_report(report, out)
    plot_path = plot_report(report, out / "report.png")
    card = build_model_card(report, site_samples=_site_samples(strategy.records),
                            architecture_digest=plan.model_architecture_digest,
                            final_model_sha256=final_digest)
    card_paths = write_model_card(card, out)
    for path in card_paths:
        tracker.log_artifact(path, "model_card")
    if final_arrays is not None:
        model_path = _save_model(final_arrays, out / "final_model.npz")
        tracker.log_artifact(model_path)
        import numpy as np

        torch_model = _torch_model(config.model, final_arrays)
        n_features = next(iter(torch_model.parameters())).shape[-1]
        tracker.log_model(torch_model,
                          registered_name=f"cleanroom-{config.dataset}-{config.model}",
                          input_example=np.zeros((1, n_features), dtype=np.float32))
    tracker.log_artifact(report_path)
    tracker.log_artifact(audit.path)
    tracker.log_artifact(plot_path)
    if report["final"]["accuracy_mean"] is not None:
        tracker.log_metrics({"final_accuracy_mean": report["final"]["accuracy_mean"]},
                            step=config.rounds)
    tracker.end("FINISHED")
    return SimulationResult(report, report_path, plot_path, time.time() - started)


def open_audit(path: Path, key_path: Path) -> Any:
    """The coordinator's audit log, with its signing key created on first use (mode 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cleanroom.attestation.simulated import write_private
    from coordinator.audit import AuditLog, load_signing_key

    if not key_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return AuditLog(path, load_signing_key(key_path))


def _site_samples(records: list[Any]) -> dict[str, dict[str, int]]:
    samples: dict[str, dict[str, int]] = {}
    for record in records:
        for site, s in record.sites.items():
            entry = samples.setdefault(site, {})
            if "num-examples" in s.train_metrics:
                entry["train"] = int(s.train_metrics["num-examples"])
            if "num-examples" in s.eval_metrics:
                entry["test"] = int(s.eval_metrics["num-examples"])
    return samples


def _torch_model(name: str, arrays: Any) -> Any:
    from cleanroom.protocol.flower import arrays_to_numpy
    from models import build_model, set_parameters

    model = build_model(name)
    set_parameters(model, {k: v.astype("float32", copy=False)
                           for k, v in arrays_to_numpy(arrays).items()})
    return model


def _save_model(arrays: Any, path: Path) -> Path:
    import numpy as np

    from cleanroom.protocol.flower import arrays_to_numpy

    np.savez(path, **arrays_to_numpy(arrays))
    return path


def _execute(config: SimulationConfig, strategy: Any, sites: Any, plan: Any) -> Any:
    """Run the strategy on the chosen backend; returns the final global ArrayRecord."""
    from flwr.app import ArrayRecord, ConfigRecord

    from cleanroom.protocol.flower import numpy_to_arrays
    from models import build_model, get_parameters
    from site_agent.app import make_client_app

    initial = numpy_to_arrays(get_parameters(build_model(config.model, seed=config.seed)))
    plain_settings = _plain_settings(config) if not config.confidential else None
    runner = strategy
    n = len(sites.configs)
    if config.backend == "inprocess":
        from simulations.inprocess import InProcessGrid

        app = make_client_app(sites, confidential=config.confidential,
                              plain_settings=plain_settings)
        grid = InProcessGrid.build(lambda _nid: app,
                                   {NODE_ID_BASE + i: {"partition-id": i, "num-partitions": n}
                                    for i in range(n)}, run_id=config.seed + 1,
                                   workers=config.workers)
        result = runner.start(grid=grid, initial_arrays=initial, num_rounds=config.rounds,
                              train_config=ConfigRecord({"model": config.model}),
                              evaluate_config=ConfigRecord({"model": config.model}))
        return result.arrays if isinstance(result.arrays, ArrayRecord) else None
    return _execute_ray(config, runner, sites, initial, plain_settings)


def _plain_settings(config: SimulationConfig) -> dict[str, object]:
    """Training settings for the plaintext baseline (no mod decides them)."""
    from site_agent.mod import noise_for

    sigma = noise_for(config.epsilon, config.delta, config.sample_rate,
                      config.rounds * config.local_steps) if config.dp else 0.0
    return {"model": config.model, "local-steps": config.local_steps,
            "sample-rate": config.sample_rate, "lr": config.lr, "optimizer": config.optimizer,
            "momentum": config.momentum, "max-grad-norm": config.max_grad_norm,
            "noise-multiplier": sigma, "dp": config.dp, "seed": config.seed}


def _execute_ray(config: SimulationConfig, runner: Any, sites: Any, initial: Any,
                 plain_settings: dict[str, object] | None) -> Any:
    import os

    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from site_agent.app import make_client_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result = runner.start(grid=grid, initial_arrays=initial, num_rounds=config.rounds,
                              train_config=ConfigRecord({"model": config.model}),
                              evaluate_config=ConfigRecord({"model": config.model}))
        holder["arrays"] = result.arrays

    client_app = make_client_app(sites, confidential=config.confidential,
                                 plain_settings=plain_settings)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=len(sites.configs),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "log_to_driver": False}})
    return holder.get("arrays")
