"""Shared fixtures: one simulated AMD root per test session (RSA-4096 keys take a second)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture(scope="session")
def sim_root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cleanroom.attestation.simulated import create_simulated_root

    path = tmp_path_factory.mktemp("sim-root")
    create_simulated_root(path)
    return path


@pytest.fixture(scope="session")
def sim_root(sim_root_dir: Path):  # -> SimulatedRoot
    from cleanroom.attestation.simulated import load_simulated_root

    return load_simulated_root(sim_root_dir)
