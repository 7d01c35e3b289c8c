"""Coordinator configuration (``coordinator.toml``), written by ``cleanroom provision``.

Paths are resolved relative to the file. Unknown keys are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from cleanroom.config import Section, load_model, paths
from cleanroom.errors import ConfigError
from cleanroom.protocol.wire import DpPlan, SiteName, TaskRef, TrainPlan

if TYPE_CHECKING:
    from cleanroom.task import LoadedTask

NO_DP_UPDATE_NORM = 1.0  # without DP nothing clips: measured honest updates are 0.03-0.2

# Server-optimiser settings per strategy (docs/dp-tuning.md); others use Flower's defaults.
STRATEGY_OPTIONS: dict[str, dict[str, float]] = {"fedadam": {"eta": 0.3},
                                                 "fedyogi": {"eta": 0.1}}


class TrainingSettings(Section):
    """Defaults for runs (chosen in docs/dp-tuning.md: full-batch DP-SGD, few steps, FedAdam);
    ``cleanroom run`` / ``cleanroom simulate`` options override them per run."""

    task: str = Field("heart-disease", description="the task: an installed task's name or a "
                      "task folder (docs/tasks.md)")
    strategy: str = "fedadam"
    rounds: int = Field(5, ge=1, le=1000)
    local_steps: int = Field(1, ge=1)
    sample_rate: float = Field(1.0, gt=0, le=1)
    lr: float = Field(0.3, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(0.5, gt=0)
    max_update_norm: float | None = Field(
        None, gt=0, description="L2 bound on a site's update. Under DP each site's bound is "
        "derived from the plan (docs/architecture.md, update bounds) and this can only tighten "
        f"it; without DP it is the bound (default {NO_DP_UPDATE_NORM}).")
    dp: bool = True
    epsilon: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    strategy_options: dict[str, float] = Field(
        default_factory=dict, description="Overrides of the strategy's own options; the "
        "tuned defaults in STRATEGY_OPTIONS apply otherwise.")
    min_sites: int = Field(2, ge=1, description="Fewest attested sites a round needs.")
    reply_timeout: float = Field(600.0, gt=0, le=86400, description="Seconds the coordinator "
                                 "waits for the sites' replies in each phase of a round "
                                 "(attestation waits at most 120); a site that has not "
                                 "answered by then is quarantined for that round with a "
                                 "timeout reason and asked again the next round.")
    secure_aggregation: bool = Field(False, description="Sites mask their updates (SecAgg "
                                     "with dropouts): the aggregator learns only their sum. "
                                     "Needs the attested aggregator and a strategy that "
                                     "aggregates by a mean (FedAvg, FedProx, FedAdam...).")

    def strategy_kwargs(self) -> dict[str, float]:
        return {**STRATEGY_OPTIONS.get(self.strategy, {}), **self.strategy_options}

    def plan(self, task: LoadedTask, *, central_clip: float | None = None) -> TrainPlan:
        """The plan of a run of ``task`` (loaded by the coordinator: the consortium's code);
        ``central_clip`` when the aggregator adds central DP."""
        return TrainPlan(rounds=self.rounds, local_steps=self.local_steps,
                         secure_aggregation=self.secure_aggregation, central_clip=central_clip,
                         sample_rate=self.sample_rate, lr=self.lr, optimizer=self.optimizer,
                         momentum=self.momentum,
                         dp=DpPlan(enabled=self.dp, epsilon=self.epsilon, delta=self.delta,
                                   max_grad_norm=self.max_grad_norm),
                         task=task_ref(task),
                         max_update_norm=self.max_update_norm if self.max_update_norm is not None
                         or self.dp else NO_DP_UPDATE_NORM)


FIELDS = (  # the settings a task's recommended plan may name
    "strategy", "rounds", "local_steps", "sample_rate", "lr", "optimizer", "momentum",
    "max_grad_norm", "max_update_norm", "strategy_options")


def task_plan(plan: Mapping[str, Any], dp: bool) -> dict[str, Any]:
    """A task's recommended coordinator settings for a DP (or non-DP) run, checked."""
    values = {k: v for k, v in plan.items() if k not in ("dp", "no_dp")}
    nested = plan.get("dp" if dp else "no_dp") or {}
    if not isinstance(nested, Mapping):
        raise ConfigError("the task's plan: 'dp' and 'no_dp' must be mappings")
    values.update(nested)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"the task's plan names unknown settings {unknown}; known: "
                          f"{', '.join(FIELDS)}")
    return values


def task_ref(task: LoadedTask) -> TaskRef:
    """How a plan names a loaded task (digests, dataset, the fields it reads)."""
    return TaskRef(name=task.name, digest=task.digest,
                   architecture_digest=task.architecture_digest, dataset=task.task.dataset_name,
                   fields=tuple(f.name for f in task.task.fields))


MIB = 1024 * 1024


class SuperLinkSettings(Section):
    """The SuperLink and its public face.

    The SuperLink itself listens on loopback only (``control_port``: its Control API, used by
    ``cleanroom run`` and the coordinator API, and its Runtime API). ``host:port`` is served
    by the coordinator's Fleet proxy (:mod:`cleanroom.coordinator.proxy`): TLS with the same
    certificate, only the Fleet calls a SuperNode makes are forwarded."""

    host: str = Field("127.0.0.1", description="public address the Fleet proxy listens on")
    port: int = Field(9400, ge=1, le=65535, description="public (Fleet-only) port")
    control_port: int = Field(9402, ge=1, le=65535, description="loopback port of the "
                              "SuperLink itself (Control and Runtime APIs); never exposed")
    advertised_address: str | None = Field(None, description="host:port sites connect to "
                                           "(default host:port)")
    max_request_bytes: int = Field(512 * MIB, ge=1024, description="largest request body "
                                   "the Fleet proxy forwards (a model update is one request)")
    request_timeout: float = Field(300.0, gt=0, description="seconds one Fleet request may "
                                   "take through the proxy, body included")
    ca_cert: Path
    cert: Path
    key: Path
    database: Path = Path("state/superlink.db")

    _paths = paths("ca_cert", "cert", "key", "database")

    @property
    def address(self) -> str:
        return self.advertised_address or f"{self.host}:{self.port}"

    @property
    def control_address(self) -> str:
        """Where ``flwr`` reaches the Control API: loopback, on the coordinator's host."""
        return f"127.0.0.1:{self.control_port}"

    @model_validator(mode="after")
    def _distinct_ports(self) -> SuperLinkSettings:
        if self.control_port == self.port:
            raise ValueError(f"control_port must differ from the public port {self.port}")
        return self


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(9401, ge=1, le=65535)
    tokens: Path = Path("api_tokens.json")

    _paths = paths("tokens")


class RegisteredSite(Section):
    name: SiteName
    public_key: Path = Field(description="The site's SuperNode auth public key (OpenSSH).")

    _paths = paths("public_key")


class AggregatorSettings(Section):
    """The attested aggregator enclave: the only place a site's update or own metrics are
    opened (docs/architecture.md, trust both ways). Sites verify its evidence every round."""

    provider: Literal["simulated", "configfs-tsm"] = Field(
        "simulated", description="simulated (its chip provisioned by 'cleanroom provision') "
        "or configfs-tsm (the aggregator's own confidential VM)")
    state_dir: Path = Field(Path("state/aggregator-enclave"), description="simulated: the "
                            "chip's key and VCEK")
    tsm_root: Path = Field(Path("/sys/kernel/config/tsm/report"), description="configfs-tsm")
    central_epsilon: float | None = Field(None, gt=0, description="user-level DP added to the "
                                          "mean inside the aggregator (the run's epsilon)")
    central_clip: float = Field(1.0, gt=0, description="central DP: L2 clip of each site's "
                                "update delta")

    _paths = paths("state_dir", "tsm_root")

    def launch(self) -> Any:
        """How the aggregator's enclave process starts (an AggregatorLaunch)."""
        from cleanroom.coordinator.aggregator_enclave import AggregatorLaunch

        return AggregatorLaunch(provider=self.provider, state_dir=self.state_dir,
                                tsm_root=self.tsm_root)

    def central_dp(self, *, rounds: int, delta: float) -> Any:
        """The calibrated central DP (a CentralDp) or None."""
        if self.central_epsilon is None:
            return None
        from cleanroom.coordinator.aggregator import CentralDp

        return CentralDp.calibrated(self.central_epsilon, delta, rounds, self.central_clip)


class CoordinatorConfig(Section):
    name: str = "cleanroom-consortium"
    state_dir: Path = Path("state")
    superlink: SuperLinkSettings
    api: ApiSettings = ApiSettings()
    audit_key: Path = Path("audit_signing_key.pem")
    policy: Path = Path("policy.toml")
    sites: list[RegisteredSite] = Field(min_length=1)
    training: TrainingSettings = TrainingSettings()
    tracking_uri: str | None = Field(None, description="MLflow URI (default: SQLite in state)")
    site_wait_seconds: float = Field(120.0, gt=0, description="How long a run waits for "
                                     "registered sites to come online.")
    tdx_collateral: Path | None = Field(None, description="Folder of Intel PCS collateral "
                                        "(TCB info, QE identity, CRLs) for TDX sites; loaded "
                                        "at start, reloaded when its files change.")
    aggregator: AggregatorSettings | None = Field(
        None, description="The attested aggregator enclave. Without it the coordinator's own "
        "process opens every update (sites that require an attested aggregator refuse).")

    _paths = paths("state_dir", "audit_key", "policy", "tdx_collateral")

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[RegisteredSite]) -> list[RegisteredSite]:
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return sites

    def runs_dir(self) -> Path:
        return self.state_dir / "runs"


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    return load_model(CoordinatorConfig, Path(path))
