"""A confidential run built around a public-API strategy: ``ConfidentialStrategy(FedAvg(),
task=task).start(grid, arrays, num_rounds)`` in a Flower App's ServerApp.

Two settings, chosen by where the ServerApp runs:

* on a ``cleanroom coordinator``'s SuperLink (its environment names the coordinator's
  configuration: :data:`cleanroom.coordinator.serverapp.CONFIG_ENV`): the consortium's policy
  (the task must be on its list), audit key, stores, tracking and registered sites, the nodes
  mapped to sites by their registered public keys; outputs under the coordinator's
  ``state_dir/runs/<run id>/``;
* anywhere else (``flwr run`` against a local simulation SuperLink): a local simulated
  federation in :func:`cleanroom.localsim.simulation_home` of the task (a simulated root, a
  policy that trusts it and allows the honest site agent running this task), outputs under
  its ``runs/<run id>/``. The app's ClientApp (``ConfidentialMod(task)``) finds the same
  folder.

Either way the plan is the coordinator's (or the defaults and the task's recommended plan),
with the app's own ``num_rounds``; the inner strategy is the app's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from cleanroom.errors import ConfigError
from cleanroom.task import LoadedTask, Task, folder_of, load_task

log = logging.getLogger(__name__)


def resolve_task(task: Any) -> LoadedTask:
    """The task a run trains, loaded (digested, imported from the digested bytes)."""
    if isinstance(task, LoadedTask):
        return task
    if isinstance(task, Task):
        loaded = load_task(folder_of(task))
        if loaded.task.name != task.name:
            raise ConfigError(f"the folder of task {task.name} defines task {loaded.name}")
        return loaded
    if isinstance(task, (str, Path)):
        return load_task(Path(task) if Path(task).is_dir() else str(task))
    raise ConfigError(f"task must be a cleanroom.task.Task, a task folder or an installed "
                      f"task's name, got {type(task).__name__}")


def strategy_name(inner: Any) -> str:
    return type(inner).__name__.lower()


def simulation_spec(loaded: LoadedTask, inner: Any, num_rounds: int, run_id: str) -> Any:
    """The RunSpec of a local simulated federation (Flower's own simulation runtime)."""
    from cleanroom.attestation.measure import code_measurement
    from cleanroom.attestation.simulated import ensure_simulated_root
    from cleanroom.attestation.validate.policy import Policy
    from cleanroom.coordinator.aggregator_enclave import AggregatorLaunch
    from cleanroom.coordinator.config import TrainingSettings
    from cleanroom.coordinator.gate import SiteDirectory
    from cleanroom.coordinator.run import RunSpec, Stores
    from cleanroom.localsim import aggregator_trust, simulation_home

    home = simulation_home(loaded.digest)
    root = ensure_simulated_root(home / "simulated-root")
    aggregator_trust(home)  # what the simulated sites pin for the aggregator launched here
    policy = Policy(name="local-simulation", environment="simulation",
                    simulated_root=root.bundle_path, measurements=[code_measurement()],
                    tasks=[loaded.digest])
    dp_plan = {k: v for k, v in _task_plan(loaded, dp=True).items()
               if k not in ("strategy", "strategy_options")}
    training = TrainingSettings(task=str(loaded.folder),
                                **{**dp_plan, "rounds": num_rounds})
    out = home / "runs" / run_id
    log.warning("confidential run %s of task %s: outputs in %s", run_id, loaded.name, out)
    return RunSpec(label=run_id, out=out, policy=policy, plan=training.plan(loaded),
                   task=loaded, strategy=strategy_name(inner),
                   stores=Stores(audit_key=home / "coordinator" / "audit_signing_key.pem",
                                 nonces=home / "coordinator" / "nonces.jsonl",
                                 watermarks=home / "coordinator" / "ledger_watermarks.json",
                                 checkpoints=out / "checkpoint"),
                   directory=SiteDirectory(strict=False), coordinator_id="local-simulation",
                   min_nodes=1,  # the app's own strategy says how many nodes it needs
                   run_name=f"local-{loaded.name}-{run_id}",
                   aggregator=AggregatorLaunch(provider="simulated",
                                               state_dir=home / "coordinator" / "aggregator",
                                               simulated_root=root.bundle_path.parent))


def _task_plan(loaded: LoadedTask, dp: bool) -> dict[str, Any]:
    from cleanroom.coordinator.config import task_plan

    return task_plan(loaded.task.plan, dp)


def deployed_spec(config_path: Path, loaded: LoadedTask, inner: Any, num_rounds: int,
                  run_id: str, grid: Grid) -> tuple[Any, Grid, float]:
    """The RunSpec of a run on this coordinator's deployment (its policy, stores, sites, the
    operator's training settings and aggregator: the same builder as the coordinator's own
    ServerApp), the grid that asks only the registered sites online, and the operator's
    reply timeout."""
    from cleanroom.coordinator.config import load_coordinator_config
    from cleanroom.coordinator.serverapp import deployment_spec, online_sites

    config = load_coordinator_config(config_path)
    training = config.training.model_validate({
        **config.training.model_dump(), "task": str(loaded.folder), "rounds": num_rounds})
    sites = online_sites(config, grid, run_id)
    spec = deployment_spec(config, training, loaded, sites, run_id,
                           strategy=strategy_name(inner), run_name=f"run-{run_id}-{loaded.name}",
                           params={"deployment": config.name},
                           report_extra={"deployment": config.name})
    return spec, sites.grid(grid), training.reply_timeout


def run_standalone(strategy: Any, grid: Grid, initial_arrays: ArrayRecord, *, num_rounds: int,
                   timeout: float, train_config: ConfigRecord | None,
                   evaluate_config: ConfigRecord | None,
                   evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
                   ) -> Any:
    """Build the run around ``strategy`` (a ConfidentialStrategy made with ``task=``), run
    its rounds, write every output; returns Flower's Result of the rounds."""
    from cleanroom.coordinator.run import FederatedRun, default_observers
    from cleanroom.coordinator.serverapp import CONFIG_ENV

    loaded = resolve_task(strategy.task)
    run_id = str(grid.run.run_id)
    config_path = os.environ.get(CONFIG_ENV)
    if config_path:  # the operator's reply timeout bounds the app's
        from cleanroom.malloc import release_large_buffers

        release_large_buffers()  # as the coordinator's own ServerApp does
        spec, grid, reply_timeout = deployed_spec(Path(config_path), loaded, strategy.inner,
                                                  num_rounds, run_id, grid)
        timeout = min(timeout, reply_timeout)
    else:
        spec = simulation_spec(loaded, strategy.inner, num_rounds, run_id)
    run = FederatedRun(spec, default_observers(spec), wrapper=strategy)
    holder: dict[str, Any] = {}

    def execute(wrapped: Any) -> Any:
        holder["result"] = wrapped.start(grid, initial_arrays, num_rounds=num_rounds,
                                         timeout=timeout, train_config=train_config,
                                         evaluate_config=evaluate_config,
                                         evaluate_fn=evaluate_fn)
        return holder["result"].arrays

    run.execute(execute)
    return holder["result"]
