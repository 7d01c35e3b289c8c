"""Test doubles for the protocol core: simulated sites and a gate that trusts them, so the
coordinator's round state machine and the site's protocol meet with no Flower in between."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleanroom.attestation.validate.policy import Policy
from cleanroom.coordinator.config import TrainingSettings
from cleanroom.coordinator.gate import AttestationGate, NonceStore, SiteDirectory
from cleanroom.coordinator.watermarks import LedgerWatermarks
from cleanroom.protocol.wire import TrainPlan
from cleanroom.site_agent.config import DataConfig, EnclaveConfig, PrivacyConfig, SiteConfig
from cleanroom.site_agent.enclave import SimulatedProvider
from cleanroom.site_agent.runtime import SiteRuntime, build_runtime, code_measurement

MEASUREMENT = code_measurement()


def plan(**overrides: Any) -> TrainPlan:
    """The tuned defaults (logistic regression, DP, 1 full-batch step per round)."""
    fields = {"dataset": "synthetic", "rounds": 3, **overrides}
    return TrainingSettings(**fields).plan()


def site(tmp: Path, root_dir: Path, root: Any, name: str = "alpha", index: int = 0, *,
         measurement: bytes = MEASUREMENT, debug: bool = False, **config: Any) -> SiteRuntime:
    """A simulated site with synthetic data, its own chip and sealed state under ``tmp``."""
    state = tmp / "sites" / name
    cfg = SiteConfig(site=name, state_dir=state,
                     data=DataConfig(kind="synthetic", name=name, index=index, n_train=60,
                                     n_test=30, seed=index),
                     enclave=EnclaveConfig(provider="simulated", simulated_root=root_dir),
                     privacy=config.pop("privacy", PrivacyConfig()), seed=index, **config)
    provider = SimulatedProvider.launch(root, state / "enclave", measurement, debug=debug)
    return build_runtime(cfg, provider)


def gate(tmp: Path, root: Any, names: dict[int, str] | None = None, *, strict: bool = True,
         keys: dict[int, bytes] | None = None, **kw: Any) -> AttestationGate:
    """A coordinator gate trusting the simulated root and the honest site code."""
    policy = Policy(name="test", environment="simulation", simulated_root=root.bundle_path,
                    measurements=[MEASUREMENT])
    return AttestationGate(policy, NonceStore(tmp / "coordinator" / "nonces.jsonl"),
                           coordinator_id="test-coordinator",
                           directory=SiteDirectory(names=names or {}, keys=keys,
                                                   strict=strict),
                           watermarks=LedgerWatermarks(tmp / "coordinator" / "marks.json"),
                           **kw)
