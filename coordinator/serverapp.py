"""The coordinator's Flower ServerApp for deployments (runs under the SuperLink).

It reads the coordinator configuration the daemon names in its environment
(:data:`CONFIG_ENV`, set for the SuperLink's process tree; never something a run submitter
chooses), the run's options from the run config (``options``: JSON, strictly typed:
:class:`RunOptions`), waits for the registered sites to come online, maps each node to its
site by the public key the operator registered (never by a name a node claims), binds each
node's key into the attestation check, and runs the federation with
:func:`cleanroom.coordinator.run.run_federation` (the same code path as the simulation).
Outputs land in ``<state_dir>/runs/<run_id>/``; ``progress.jsonl`` gets one line per round for
``cleanroom run`` and the coordinator API.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cleanroom.coordinator.fastgrid import FastPollGrid
from cleanroom.errors import ConfigError

log = logging.getLogger(__name__)
app = ServerApp()

CONFIG_ENV = "CLEANROOM_COORDINATOR_CONFIG"
OPTIONS_KEY = "options"


class RunOptions(BaseModel):
    """What a run may change of the coordinator's training settings (``cleanroom run``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rounds: int | None = Field(None, ge=1, le=1000)
    strategy: str | None = None
    dp: bool | None = None
    epsilon: float | None = Field(None, gt=0)
    local_steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    sample_rate: float | None = Field(None, gt=0, le=1)
    secure_aggregation: bool | None = None
    seed: int = 0
    pause_after: int = Field(0, ge=0)
    resume_run: str = Field("", pattern=r"^[0-9]*$")

    @classmethod
    def from_run_config(cls, run_config: Any) -> RunOptions:
        raw = run_config.get(OPTIONS_KEY, "{}") or "{}"
        try:
            return cls.model_validate_json(str(raw))
        except ValidationError as exc:
            from cleanroom.config import format_validation_error

            raise ConfigError(format_validation_error(exc, "run options")) from None

    def training_updates(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items()
                if v is not None and k not in ("seed", "pause_after", "resume_run")}


def coordinator_config_path(context: Context) -> Path:
    """The coordinator configuration: the daemon's environment (its own SuperLink), else a
    run config key (runs submitted to a SuperLink this daemon did not start)."""
    path = os.environ.get(CONFIG_ENV) or str(context.run_config.get("coordinator-config", ""))
    if not path:
        raise ConfigError(f"no coordinator configuration: {CONFIG_ENV} is not set (start the "
                          "SuperLink with 'cleanroom coordinator')")
    return Path(path)


def wait_for_sites(grid: Grid, expected: dict[bytes, str], timeout: float) -> dict[int, Any]:
    """Node id -> (NodeInfo, site) of the registered sites online, waiting up to ``timeout``.
    ``expected``: each registered site's public key (DER SPKI) -> its name: a node is the
    site whose key it authenticated with, whatever name it was registered or claims."""
    from cleanroom.pki import spki_der

    deadline = time.monotonic() + timeout
    ignored: set[int] = set()
    while True:
        online: dict[int, Any] = {}
        holder: dict[bytes, int] = {}  # site key -> the node id standing for it
        for node in sorted(grid.get_nodes(), key=lambda n: n.node_id):
            try:
                key = spki_der(bytes(node.public_key))
            except ConfigError:
                key = b""
            if key not in expected:
                if node.node_id not in ignored:  # e.g. a second key registered as a site's name
                    ignored.add(node.node_id)
                    log.warning("node %d (registered as %r) does not hold any configured "
                                "site's key: it takes no part in the run", node.node_id,
                                str(getattr(node, "name", ""))[:64])
                continue
            if node.status not in ("online", ""):
                continue
            if key in holder:  # one site, one node: a second would count (and weigh) twice
                if node.node_id not in ignored:
                    ignored.add(node.node_id)
                    log.warning("node %d holds the key of site %s, already online as node "
                                "%d: it takes no part in the run", node.node_id,
                                expected[key], holder[key])
                continue
            holder[key] = node.node_id
            online[node.node_id] = (node, expected[key])
        if len(online) >= len(expected) or time.monotonic() > deadline:
            return online
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from cleanroom.coordinator.config import load_coordinator_config
    from cleanroom.coordinator.run import Resume, run_federation, start_rounds
    from cleanroom.malloc import release_large_buffers

    logging.getLogger("flwr").setLevel(logging.WARNING)
    release_large_buffers()  # the coordinator holds model-sized buffers between phases
    config = load_coordinator_config(coordinator_config_path(context))
    options = RunOptions.from_run_config(context.run_config)
    training = config.training.model_validate({**config.training.model_dump(),
                                               **options.training_updates()})
    seed = options.seed
    run_id = str(context.run_id)
    checkpoint, earlier = None, None
    resume_run = options.resume_run
    if resume_run:  # continue an interrupted or paused run: its settings, its run id
        from cleanroom.coordinator.checkpoint import load_resumable

        earlier = config.runs_dir() / resume_run
        checkpoint = load_resumable(earlier / "checkpoint", earlier / "audit.jsonl")
        saved = checkpoint.meta.get("deployment") or {}
        training = config.training.model_validate(saved.get("training", {}))
        seed = int(saved.get("seed", 0))
        if checkpoint.round >= training.rounds:
            raise ConfigError(f"run {resume_run} already completed its {training.rounds} "
                              "rounds")
    pause_after = options.pause_after
    out = config.runs_dir() / run_id
    out.mkdir(parents=True, exist_ok=True)
    sites = online_sites(config, grid, run_id)
    from cleanroom.task import load_task

    task_spec = training.task
    task = load_task(Path(task_spec) if Path(task_spec).is_dir() else task_spec)
    progress = out / "progress.jsonl"

    def on_round(entry: dict[str, Any]) -> None:
        with open(progress, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    spec = deployment_spec(
        config, training, task, sites, run_id,
        strategy=training.strategy, strategy_options=training.strategy_kwargs(),
        run_name=f"run-{run_id}-{training.strategy}",
        params={"seed": seed, "deployment": config.name},
        report_extra={"config": {**training.model_dump(mode="json"), "seed": seed,
                                 "deployment": config.name},
                      "resumed_from_run": resume_run or None},
        checkpoint_meta={"deployment": {"training": training.model_dump(mode="json"),
                                        "seed": seed}},
        resume=Resume(checkpoint, earlier / "audit.jsonl")
        if checkpoint is not None and earlier is not None else None,
    )

    def execute(strategy: Any) -> Any:
        return start_rounds(strategy, sites.grid(grid), spec, seed=seed,
                            pause_after=pause_after, timeout=training.reply_timeout)

    run_federation(spec, execute, on_round=on_round)


@dataclass(frozen=True)
class OnlineSites:
    """The registered sites online when a run starts: node id -> (NodeInfo, site name)."""

    nodes: dict[int, tuple[Any, str]]
    registered: list[str]  # every configured site's name

    def grid(self, grid: Grid) -> FastPollGrid:
        """The run's grid: polls fast and asks only these nodes."""
        return _SitesOnly(grid, set(self.nodes))


def online_sites(config: Any, grid: Grid, run_id: str) -> OnlineSites:
    """Wait (up to the configured ``site_wait_seconds``) for the registered sites."""
    from cleanroom.pki import NodePublicKey

    expected = {NodePublicKey.load(s.public_key).identity: s.name for s in config.sites}
    nodes = wait_for_sites(grid, expected, config.site_wait_seconds)
    log.info("run %s: %d of %d sites online", run_id, len(nodes), len(expected))
    return OnlineSites(nodes=nodes, registered=sorted(expected.values()))


def deployment_spec(config: Any, training: Any, task: Any, sites: OnlineSites, run_id: str,
                    *, strategy: str, run_name: str, **extra: Any) -> Any:
    """The RunSpec of a run on this coordinator's deployment, whoever wrote the ServerApp
    (ours, or a consortium's own app around ``ConfidentialStrategy``): its policy, stores and
    sites; the operator's training settings (``min_sites``, ``reply_timeout``); its aggregator
    enclave and central DP. ``extra``: further RunSpec fields (options, resume, report)."""
    from cleanroom.attestation.validate.policy import load_policy
    from cleanroom.coordinator.gate import SiteDirectory
    from cleanroom.coordinator.run import RunSpec, Stores
    from cleanroom.pki import spki_der

    aggregator = config.aggregator
    central = aggregator.central_epsilon if aggregator else None
    plan = training.plan(task, central_clip=aggregator.central_clip if central else None)
    out = config.runs_dir() / run_id
    return RunSpec(
        label=run_id, out=out, policy=load_policy(config.policy), plan=plan, task=task,
        strategy=strategy,
        stores=Stores(audit_key=config.audit_key, nonces=config.state_dir / "nonces.jsonl",
                      watermarks=config.state_dir / "ledger_watermarks.json",
                      checkpoints=out / "checkpoint"),
        # node id -> the site whose registered key it authenticated with (never a claim)
        directory=SiteDirectory(
            names={nid: name for nid, (_, name) in sites.nodes.items()},
            keys={nid: spki_der(bytes(n.public_key)) for nid, (n, _) in sites.nodes.items()}),
        min_nodes=training.min_sites, tracking_uri=config.tracking_uri,
        attest_timeout=min(120.0, training.reply_timeout),
        tdx_collateral=config.tdx_collateral,
        aggregator=aggregator.launch() if aggregator else None,
        central_dp=aggregator.central_dp(rounds=plan.rounds, delta=plan.dp.delta)
        if aggregator else None,
        run_name=run_name, coordinator_id=config.name, sites=sites.registered,
        expected_nodes=max(1, len(sites.nodes)), **extra)


class _SitesOnly(FastPollGrid):
    """Only the registered sites that were online when the run started are asked."""

    def __init__(self, grid: Grid, node_ids: set[int]) -> None:
        super().__init__(grid)
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return [nid for nid in self._grid.get_node_ids() if nid in self._ids]
