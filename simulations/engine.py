"""The local multi-site simulation: the whole protocol on one machine.

Builds a simulated consortium (a simulated AMD root, one simulated enclave per hospital, the
coordinator's policy with the honest code measurement), wraps the chosen Flower strategy in
:class:`coordinator.strategy.ConfidentialStrategy`, runs it on either Flower's simulation
runtime (``ray`` backend) or the in-process Grid, and records everything (report.json,
report.png, MLflow).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cleanroom.coordinator.config import STRATEGY_OPTIONS, TrainingSettings
from cleanroom.errors import CleanroomError, ConfigError
from cleanroom.simulations.scenarios import COORDINATOR_SCENARIOS

log = logging.getLogger(__name__)

Backend = Literal["inprocess", "ray"]
_T = TrainingSettings()  # the tuned defaults (docs/dp-tuning.md), shared with deployments
NODE_ID_BASE = 1000  # in-process node ids: NODE_ID_BASE + partition id
SMALL_MODEL = 100_000  # parameters: below this the simulation trains with one torch thread
DEFAULT_WORKERS = 8  # threads serving in-process sites (confidential runs)
# Each site in flight holds ~30 copies of the model's size (the message's chunks, the opened
# model, the site's module and its snapshots, the sealed update): the threads together get
# about this much (100 sites x 1M parameters: 1.74 GB peak with 8 threads, 1.06 GB with 2).
WORKERS_MEMORY = 256 * 2**20


class SimulationConfig(BaseModel):
    """Everything ``cleanroom simulate`` can set (validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(_T.task, description="an installed task's name (heart-disease, "
                      "synthetic) or a task folder")
    sites: int | None = Field(None, ge=1, le=1_000_000, description="simulated sites (default: "
                              "the task's own sites, e.g. heart-disease's 4 hospitals)")
    rounds: int = Field(_T.rounds, ge=1, le=1000)
    strategy: str = _T.strategy
    dp: bool = True
    epsilon: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    scenario: str = "honest"
    hostile_site: str | None = None
    out: Path = Path("runs/latest")
    seed: int = 0
    local_steps: int = Field(_T.local_steps, ge=1)
    sample_rate: float = Field(_T.sample_rate, gt=0, le=1)
    lr: float = Field(_T.lr, gt=0)
    optimizer: Literal["sgd", "adam"] = _T.optimizer
    momentum: float = Field(_T.momentum, ge=0, lt=1)
    max_grad_norm: float = Field(_T.max_grad_norm, gt=0)
    max_update_norm: float | None = Field(_T.max_update_norm, gt=0)
    backend: Backend = "inprocess"
    tracking: bool = True
    tracking_uri: str | None = None
    state_dir: Path | None = None
    site_budget: float | None = Field(None, gt=0)
    confidential: bool = True
    aggregator: bool = Field(True, description="updates go to an attested aggregator enclave "
                             "(a separate process) that every site verifies first; False: "
                             "the coordinator's own process opens them (the protocol before "
                             "issue 13)")
    secure_aggregation: bool = Field(False, description="sites mask their updates (SecAgg "
                                     "with dropouts): the aggregator learns only their sum")
    aggregator_isolation: Literal["process", "inprocess"] = Field(
        "process", description="the aggregator enclave's separation from the operator's "
        "process in a simulation: its own process, or 'inprocess' (tests: no separation)")
    central_epsilon: float | None = Field(None, gt=0, description="user-level DP added to the "
                                          "mean inside the aggregator: the run's epsilon")
    central_clip: float = Field(1.0, gt=0, description="central DP: each site's update delta "
                                "clipped to this L2 norm")
    progress: bool = True
    workers: int | None = Field(None, ge=1, le=64, description="inprocess: sites served in "
                                "parallel (threads; training itself runs one site at a time). "
                                "Default: 8 for confidential runs (fewer for large models: "
                                "about 256 MB of sites in flight), 1 for the plaintext "
                                "baseline: CPython 3.11.7's compile() is not thread safe "
                                "(numpy headers parsed in Flower's Array.numpy(), which only "
                                "the plaintext path calls, raise 'AST constructor recursion "
                                "depth mismatch' under threads)")
    threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads "
                                "while the simulation runs. Default: 1 for models under "
                                f"{SMALL_MODEL:,} parameters (thread hand-offs cost more than "
                                "the tiny kernels, and on a loaded machine OpenMP's waits "
                                "turn microseconds into milliseconds), else torch's own")
    strategy_options: dict[str, float] = Field(
        default_factory=dict, description="overrides of the tuned STRATEGY_OPTIONS")
    resume: Path | None = Field(None, description="continue the run whose output folder this "
                                "is, from its last round checkpoint (in-process backend)")
    sites_process: bool = Field(False, description="inprocess: run every site in one "
                                "separate process (messages one at a time), so that this "
                                "process's memory is the coordinator's alone (benchmarks)")


@dataclass
class SimulationResult:
    report: dict[str, Any]
    report_path: Path
    plot_path: Path | None
    seconds: float
    sites_peak_rss: int | None = None
    """With ``sites_process``: the sites' process's peak resident memory, bytes."""
    aggregator_rss: tuple[int, int] | None = None
    """The attested aggregator enclave process's resident memory once started, and its peak
    (bytes)."""


def site_names(config: SimulationConfig, task: Any) -> list[str]:
    """The simulated sites: the task's own (its hospitals, regions), else ``site00``..."""
    natural = list(task.task.sites)
    if natural and config.sites in (None, len(natural)):
        return natural
    if natural:
        raise ConfigError(f"task {task.name} simulates its {len(natural)} sites "
                          f"({', '.join(natural)}), not {config.sites}")
    count = config.sites or 4
    width = max(2, len(str(count - 1)))
    return [f"site{i:0{width}d}" for i in range(count)]


def _site_configs(config: SimulationConfig, names: list[str], task: Any, state: Path,
                  root_dir: Path, hostile: str | None,
                  aggregator_policy: Path | None = None) -> list[Any]:
    from cleanroom.site_agent.config import (
        AggregatorTrust,
        ApprovedTask,
        EnclaveConfig,
        PrivacyConfig,
        SiteConfig,
        SitePolicyConfig,
    )

    configs = []
    for index, name in enumerate(names):
        lifetime = config.site_budget if config.site_budget is not None else max(
            10.0, 10 * config.epsilon)
        if hostile == name and config.scenario == "over-budget":
            from cleanroom.simulations.scenarios import OVER_BUDGET_EPSILON

            lifetime = OVER_BUDGET_EPSILON
        privacy = PrivacyConfig(delta=config.delta, lifetime_epsilon=lifetime,
                                max_epsilon_per_run=config.epsilon, allow_no_dp=not config.dp)
        # the simulated hospitals reviewed and approved the consortium's task
        # ... and share their own metrics with the researcher running the simulation
        policy = SitePolicyConfig(tasks=[ApprovedTask(digest=task.digest, name=task.name)],
                                  task_dirs=[task.folder], share_metrics=True)
        trust = AggregatorTrust(required=aggregator_policy is not None,
                                policy=aggregator_policy)
        configs.append(SiteConfig(site=name, state_dir=state / "sites" / name,
                                  enclave=EnclaveConfig(provider="simulated",
                                                        simulated_root=root_dir),
                                  privacy=privacy, policy=policy, aggregator=trust,
                                  seed=config.seed * 7919 + index))
    return configs


def _aggregator(config: SimulationConfig, state: Path, root: Any) -> tuple[Any, Path | None]:
    """The aggregator enclave's launch and the trust policy the sites pin for it (the honest
    aggregator code's measurement). ``unattested-coordinator``: the coordinator launches
    modified aggregator code, whose measurement no site pins."""
    if not config.aggregator or not config.confidential:
        if config.scenario in COORDINATOR_SCENARIOS:
            raise ConfigError(f"scenario {config.scenario} needs the attested aggregator")
        return None, None
    from cleanroom.attestation.measure import aggregator_measurement, write_aggregator_trust
    from cleanroom.coordinator.aggregator_enclave import AggregatorLaunch

    measurement = None
    if config.scenario == "unattested-coordinator":
        from cleanroom.simulations.scenarios import tampered_aggregator_measurement

        measurement = tampered_aggregator_measurement()
    trust = write_aggregator_trust(state / "aggregator-trust.json",
                             simulated_root=root.bundle_path,
                             measurements=[aggregator_measurement()])
    launch = AggregatorLaunch(provider="simulated", state_dir=state / "coordinator" /
                              "aggregator-enclave", simulated_root=root.bundle_path.parent,
                              measurement=measurement, isolation=config.aggregator_isolation)
    return launch, trust


def _central_dp(config: SimulationConfig) -> Any:
    """Central DP inside the aggregator, calibrated to ``central_epsilon`` over the run's
    rounds (every site each round: user-level, sampling rate 1)."""
    if config.central_epsilon is None:
        return None
    from cleanroom.coordinator.aggregator import CentralDp

    return CentralDp.calibrated(config.central_epsilon, config.delta, config.rounds,
                                config.central_clip)


def load_simulation_task(spec: str) -> Any:
    """The task to simulate; an unknown name or a broken folder is one clear ConfigError."""
    from cleanroom.task import load_task

    try:
        loaded = load_task(Path(spec) if Path(spec).is_dir() else spec)
    except CleanroomError as exc:
        raise ConfigError(f"--task {spec}: {exc}") from None
    if loaded.task.simulate is None:
        raise ConfigError(f"--task {spec}: task {loaded.name} has no simulate() to give "
                          "simulated sites their data")
    return loaded


def workers_of(config: SimulationConfig, sites: int, params: int = 0) -> int:
    """Threads serving in-process sites: the configured number, else 8 (confidential; fewer
    when ``params`` is large: WORKERS_MEMORY) or 1 (plaintext baseline), never more than the
    sites."""
    if config.workers is not None:
        return min(config.workers, max(1, sites))
    if not config.confidential:
        return 1
    by_memory = WORKERS_MEMORY // max(1, 30 * 4 * params)
    return max(1, min(DEFAULT_WORKERS, by_memory, sites))


def torch_threads(config: SimulationConfig, task: Any) -> int | None:
    """The torch intra-op threads of a run (None: leave torch's setting)."""
    if config.threads is not None:
        return config.threads
    return 1 if task.n_params < SMALL_MODEL else None


def run_simulation(config: SimulationConfig,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   checkpoint: Any = None,
                   on_reply: Callable[[Any, int, int], None] | None = None) -> SimulationResult:
    """Run one simulated federated training and write its report; returns the result.
    ``checkpoint``: what :func:`resumed_config` returned for a resume (else it is loaded).
    ``on_reply(reply, done, total)``: each site's reply as it arrives (in-process backend;
    progress within a round)."""
    import torch

    if config.resume is not None and checkpoint is None:
        config, checkpoint = resumed_config(config)
    task = load_simulation_task(config.task)
    threads = torch_threads(config, task)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_simulation(config, task, on_round, checkpoint, on_reply)
    finally:
        torch.set_num_threads(before)


def _run_simulation(config: SimulationConfig, task: Any,
                    on_round: Callable[[dict[str, Any]], None] | None, checkpoint: Any,
                    on_reply: Callable[[Any, int, int], None] | None) -> SimulationResult:
    from cleanroom.attestation.simulated import ensure_simulated_root
    from cleanroom.attestation.validate.policy import Policy
    from cleanroom.coordinator.gate import SiteDirectory
    from cleanroom.coordinator.run import Resume, RunSpec, Stores, run_federation
    from cleanroom.simulations.scenarios import SCENARIOS, Fault, SimulatedSites
    from cleanroom.site_agent.runtime import code_measurement

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        import flwr.common.logger  # noqa: F401  (configures its logger on import: import first)

        logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every step at INFO
    if config.scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {config.scenario!r}; choose one of "
                          f"{', '.join(SCENARIOS)}")
    if config.scenario == "dropout-after-masking" and not config.secure_aggregation:
        config = config.model_copy(update={"secure_aggregation": True})  # what it is about
    names = site_names(config, task)
    hostile = None
    if config.scenario not in COORDINATOR_SCENARIOS and config.scenario != "honest":
        hostile = config.hostile_site or names[-1]
        if hostile not in names:
            raise ConfigError(f"hostile site {hostile!r} is not one of {names}")
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = Path(config.state_dir).resolve() if config.state_dir else out / "state"
    root_dir = state / "simulated-root"
    root = ensure_simulated_root(root_dir)
    launch, trust = _aggregator(config, state, root)
    sites = SimulatedSites(_site_configs(config, names, task, state, root_dir, hostile, trust),
                           {hostile: Fault(config.scenario)} if hostile else {},
                           task_folder=task.folder)
    # A fresh run id per simulation (as Flower gives each run): the sites' ledgers key
    # charges by run, so a second simulation on the same state spends more budget.
    run_id = int(checkpoint.run_id) if checkpoint is not None else secrets.randbits(63)
    policy = Policy(name="simulation", environment="simulation",
                    simulated_root=root.bundle_path, measurements=[code_measurement()],
                    tasks=[task.digest])
    plan = TrainingSettings(**{name: getattr(config, name) for name in (
        "task", "strategy", "rounds", "local_steps", "sample_rate", "lr",
        "optimizer", "momentum", "max_grad_norm", "max_update_norm", "dp", "epsilon",
        "delta", "secure_aggregation")}).plan(
            task, central_clip=config.central_clip if config.central_epsilon else None)
    node_names = {NODE_ID_BASE + i: name for i, name in enumerate(names)}
    spec = RunSpec(
        label=str(run_id), out=out, policy=policy, plan=plan, task=task,
        strategy=config.strategy,
        strategy_options={**STRATEGY_OPTIONS.get(config.strategy, {}), **config.strategy_options},
        stores=Stores(audit_key=state / "coordinator" / "audit_signing_key.pem",
                      nonces=out / "coordinator" / "nonces.jsonl",
                      watermarks=state / "coordinator" / "ledger_watermarks.json",
                      checkpoints=out / "checkpoint"),
        # In-process, node ids are ours (NODE_ID_BASE + partition); Flower's simulation
        # runtime assigns its own, so there the sites' claimed names are used (unique).
        directory=SiteDirectory(names=node_names, strict=True)
        if config.backend == "inprocess" else SiteDirectory(strict=False),
        confidential=config.confidential, tracking=config.tracking,
        tracking_uri=config.tracking_uri,
        run_name=f"{config.scenario}-{config.strategy}-s{config.seed}",
        coordinator_id="simulation-coordinator", sites=names,
        checkpoint_meta={"simulation_config": config.model_copy(update={
            "state_dir": state, "out": out}).model_dump(mode="json")},  # absolute paths
        resume=Resume(checkpoint, out / "audit.jsonl") if checkpoint is not None else None,
        aggregator=launch, central_dp=_central_dp(config),
        params={"scenario": config.scenario, "hostile_site": hostile, "seed": config.seed,
                "backend": config.backend, "code_measurement": code_measurement().hex()},
        report_extra={"config": config.model_dump(mode="json"),
                      "scenario": {"name": config.scenario, "hostile_site": hostile,
                                   "description": SCENARIOS[config.scenario]}},
    )
    held: dict[str, Any] = {}
    outcome = run_federation(spec, lambda strategy: _execute(config, spec, strategy, sites,
                                                             run_id, on_reply, held),
                             on_round=on_round)
    return SimulationResult(outcome.report, outcome.report_path, outcome.plot_path,
                            outcome.seconds, held.get("sites_peak_rss"),
                            outcome.aggregator_rss)


def resumed_config(config: SimulationConfig) -> tuple[SimulationConfig, Any]:
    """The saved configuration of the run in ``config.resume`` and its last checkpoint."""
    from cleanroom.coordinator.checkpoint import load_resumable

    folder = Path(config.resume).resolve()  # type: ignore[arg-type]
    checkpoint = load_resumable(folder / "checkpoint", folder / "audit.jsonl")
    saved = checkpoint.meta.get("simulation_config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{folder}: its checkpoint holds no simulation configuration")
    resumed = SimulationConfig.model_validate({
        **saved, "out": folder, "resume": folder, "progress": config.progress,
        "tracking_uri": config.tracking_uri or saved.get("tracking_uri")})
    if resumed.backend != "inprocess":
        raise ConfigError("--resume continues in-process simulations only")
    if checkpoint.round >= resumed.rounds:
        raise ConfigError(f"{folder}: the run already completed its {resumed.rounds} rounds")
    state = Path(resumed.state_dir) if resumed.state_dir else folder / "state"
    if resumed.dp and not any((state / "sites").glob("*/privacy_ledger.jsonl")):
        raise ConfigError(f"{state}: the sites' privacy ledgers of this run are missing; a "
                          "resume must continue spending the same ledgers")
    return resumed, checkpoint


def _execute(config: SimulationConfig, spec: Any, strategy: Any, sites: Any,
             run_id: int, on_reply: Callable[[Any, int, int], None] | None = None,
             held: dict[str, Any] | None = None) -> Any:
    """Run the strategy on the chosen backend; returns the final global ArrayRecord."""
    from functools import partial

    from cleanroom.coordinator.run import start_rounds
    from cleanroom.site_agent.app import make_client_app

    plain: dict[str, Any] = _plain_settings(config, spec.plan) if not config.confidential \
        else {}
    if config.scenario == "dropout-after-masking":
        from cleanroom.simulations.scenarios import DropAfterMasking

        hostile = next(i for i, c in enumerate(sites.configs) if c.site in sites.faults)
        plain["outer_mods"] = [DropAfterMasking(hostile)]
    elif config.scenario == "poisoned-update":
        from cleanroom.simulations.scenarios import PoisoningTrainer
        from cleanroom.site_agent.trainers import TaskTrainer

        plain["trainer"] = PoisoningTrainer(TaskTrainer(), next(iter(sites.faults)))
    n = len(sites.configs)
    if config.backend == "inprocess":
        from cleanroom.simulations.inprocess import InProcessGrid

        nodes = {NODE_ID_BASE + i: {"partition-id": i, "num-partitions": n} for i in range(n)}
        factory = partial(make_client_app, sites, confidential=config.confidential, **plain)
        if config.sites_process:  # this process is the coordinator alone
            from cleanroom.malloc import release_large_buffers

            release_large_buffers()
            grid = InProcessGrid.in_subprocess(factory, nodes, run_id=run_id,
                                               on_reply=on_reply)
        else:
            app = factory()
            grid = InProcessGrid.build(lambda _nid: app, nodes, run_id=run_id,
                                       workers=workers_of(config, n, spec.task.n_params),
                                       on_reply=on_reply)
        try:
            return start_rounds(strategy, grid, spec, seed=config.seed)
        finally:
            grid.close()
            if grid.host is not None and held is not None:
                held["sites_peak_rss"] = grid.host.peak_rss_bytes
    return _execute_ray(config, spec, strategy, sites, plain)


def _plain_settings(config: SimulationConfig, plan: Any) -> dict[str, Any]:
    """The plan and settings of the plaintext baseline (no mod decides them)."""
    from cleanroom.site_agent.settings import RoundSettings, noise_for

    sigma = noise_for(config.epsilon, config.delta, config.sample_rate,
                      config.rounds * config.local_steps) if config.dp else None
    return {"plain_plan": plan,
            "plain_settings": RoundSettings(sigma, config.sample_rate, config.local_steps,
                                            config.epsilon if config.dp else None,
                                            config.delta)}


def _execute_ray(config: SimulationConfig, spec: Any, strategy: Any, sites: Any,
                 plain: dict[str, Any]) -> Any:
    import os

    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from cleanroom.coordinator.run import start_rounds
    from cleanroom.site_agent.app import make_client_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["arrays"] = start_rounds(strategy, grid, spec, seed=config.seed)

    client_app = make_client_app(sites, confidential=config.confidential, **plain)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=len(sites.configs),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "log_to_driver": False}})
    return holder.get("arrays")
