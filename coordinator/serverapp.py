"""The coordinator's Flower ServerApp for deployments (runs under the SuperLink).

It reads the coordinator configuration named in the run config, waits for the registered
sites to come online, binds each node's authentication key into the attestation check, and
runs the federation with :func:`cleanroom.coordinator.run.run_federation` (the same code path as the
simulation). Outputs land in ``<state_dir>/runs/<run_id>/``; ``progress.jsonl`` gets one line
per round for ``cleanroom run`` and the coordinator API.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cleanroom.coordinator.fastgrid import FastPollGrid
from cleanroom.errors import ConfigError

log = logging.getLogger(__name__)
app = ServerApp()

OVERRIDES = {  # run-config key -> TrainingSettings field
    "rounds": "rounds", "strategy": "strategy", "dp": "dp", "epsilon": "epsilon",
    "local-steps": "local_steps", "lr": "lr", "sample-rate": "sample_rate",
}


def wait_for_sites(grid: Grid, expected: set[str], timeout: float) -> dict[int, Any]:
    """Node id -> NodeInfo of the registered sites online, waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = {n.node_id: n for n in grid.get_nodes() if n.name in expected}
        online = {nid: n for nid, n in nodes.items() if n.status in ("online", "")}
        if {n.name for n in online.values()} >= expected or time.monotonic() > deadline:
            return online
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from cleanroom.attestation.validate.policy import load_policy
    from cleanroom.coordinator.config import load_coordinator_config
    from cleanroom.coordinator.gate import SiteDirectory
    from cleanroom.coordinator.run import Resume, RunSpec, Stores, run_federation, start_rounds
    from cleanroom.pki import spki_der

    logging.getLogger("flwr").setLevel(logging.WARNING)
    path = str(context.run_config.get("coordinator-config", ""))
    if not path:
        raise ConfigError("run config 'coordinator-config' is not set")
    config = load_coordinator_config(Path(path))
    updates = {field: context.run_config[key] for key, field in OVERRIDES.items()
               if key in context.run_config and context.run_config[key] != ""}
    training = config.training.model_validate({**config.training.model_dump(), **updates})
    seed = int(context.run_config.get("seed", 0))  # type: ignore[arg-type]
    run_id = str(context.run_id)
    checkpoint, earlier = None, None
    resume_run = str(context.run_config.get("resume-run", "") or "")
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
    pause_after = int(context.run_config.get("pause-after", 0) or 0)  # type: ignore[arg-type]
    out = config.runs_dir() / run_id
    out.mkdir(parents=True, exist_ok=True)
    expected = {s.name for s in config.sites}
    nodes = wait_for_sites(grid, expected, config.site_wait_seconds)
    log.info("run %s: %d of %d sites online", run_id, len(nodes), len(expected))
    policy = load_policy(config.policy)
    from cleanroom.task import load_task

    task_spec = training.task
    task = load_task(Path(task_spec) if Path(task_spec).is_dir() else task_spec)
    plan = training.plan(task)
    progress = out / "progress.jsonl"

    def on_round(entry: dict[str, Any]) -> None:
        with open(progress, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    spec = RunSpec(
        label=run_id, out=out, policy=policy, plan=plan, task=task,
        strategy=training.strategy, strategy_options=training.strategy_kwargs(),
        stores=Stores(audit_key=config.audit_key, nonces=config.state_dir / "nonces.jsonl",
                      watermarks=config.state_dir / "ledger_watermarks.json",
                      checkpoints=out / "checkpoint"),
        # node id -> the name and key the operator registered (never what a node claims)
        directory=SiteDirectory(
            names={nid: n.name for nid, n in nodes.items()},
            keys={nid: spki_der(bytes(n.public_key)) for nid, n in nodes.items()}),
        min_nodes=training.min_sites, tracking_uri=config.tracking_uri,
        tdx_collateral=config.tdx_collateral,
        run_name=f"run-{run_id}-{training.strategy}", coordinator_id=config.name,
        sites=sorted(expected), expected_nodes=max(1, len(nodes)),
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
        return start_rounds(strategy, _SitesOnly(grid, set(nodes)), spec, seed=seed,
                            pause_after=pause_after, timeout=600)

    run_federation(spec, execute, on_round=on_round)


class _SitesOnly(FastPollGrid):
    """Only the registered sites that were online when the run started are asked."""

    def __init__(self, grid: Grid, node_ids: set[int]) -> None:
        super().__init__(grid)
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return [nid for nid in self._grid.get_node_ids() if nid in self._ids]
