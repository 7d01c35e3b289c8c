"""Test doubles for the protocol core: simulated sites and a gate that trusts them, so the
coordinator's round state machine and the site's protocol meet with no Flower in between."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleanroom.attestation.validate.policy import Policy
from cleanroom.coordinator.config import TrainingSettings
from cleanroom.coordinator.gate import AttestationGate, NonceStore, SiteDirectory
from cleanroom.coordinator.watermarks import LedgerWatermarks
from cleanroom.enclave import SimulatedProvider
from cleanroom.protocol.wire import TrainPlan
from cleanroom.site_agent.config import (
    ApprovedTask,
    EnclaveConfig,
    PrivacyConfig,
    SiteConfig,
    SitePolicyConfig,
)
from cleanroom.site_agent.runtime import SiteRuntime, build_runtime, code_measurement
from cleanroom.task import load_task

MEASUREMENT = code_measurement()
TASK = load_task("synthetic")  # 200 training rows per site
ROWS = 200


def plan(**overrides: Any) -> TrainPlan:
    """The tuned defaults (logistic regression, DP, 1 full-batch step per round)."""
    fields = {"task": "synthetic", "rounds": 3, **overrides}
    return TrainingSettings(**fields).plan(TASK)


def site(tmp: Path, root_dir: Path, root: Any, name: str = "alpha", index: int = 0, *,
         measurement: bytes = MEASUREMENT, debug: bool = False, register: bool = True,
         **config: Any) -> SiteRuntime:
    """A simulated site that approved the synthetic task and registered its data, with its
    own chip and sealed state under ``tmp``."""
    state = tmp / "sites" / name
    policy = config.pop("policy", SitePolicyConfig(tasks=[ApprovedTask(digest=TASK.digest)],
                                                   share_metrics=True))
    cfg = SiteConfig(site=name, state_dir=state,
                     enclave=EnclaveConfig(provider="simulated", simulated_root=root_dir),
                     privacy=config.pop("privacy", PrivacyConfig()), policy=policy, seed=index,
                     **config)
    provider = SimulatedProvider.launch(root, state / "enclave", measurement, debug=debug)
    runtime = build_runtime(cfg, provider)
    if register:
        runtime.datasets.register_simulated(TASK.task, index, 8)
    return runtime


def gate(tmp: Path, root: Any, names: dict[int, str] | None = None, *, strict: bool = True,
         keys: dict[int, bytes] | None = None, **kw: Any) -> AttestationGate:
    """A coordinator gate trusting the simulated root and the honest site code."""
    policy = Policy(name="test", environment="simulation", simulated_root=root.bundle_path,
                    measurements=[MEASUREMENT], tasks=[TASK.digest])
    return AttestationGate(policy, NonceStore(tmp / "coordinator" / "nonces.jsonl"),
                           coordinator_id="test-coordinator",
                           directory=SiteDirectory(names=names or {}, keys=keys,
                                                   strict=strict),
                           watermarks=LedgerWatermarks(tmp / "coordinator" / "marks.json"),
                           **kw)
