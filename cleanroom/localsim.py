"""Where a confidential Flower App keeps its simulated federation when it runs under Flower's
own simulation (``flwr run`` against a local SuperLink): both sides derive the same folder
from the task's digest, so the coordinator's policy trusts the simulated root its simulated
sites' enclaves are issued from, and a site's sealed state (its ledger) persists across runs
of that task. ``CLEANROOM_SIMULATION_DIR`` overrides the base folder.
"""

from __future__ import annotations

import os
from pathlib import Path

SIMULATION_ENV = "CLEANROOM_SIMULATION_DIR"


def simulation_home(task_digest: str) -> Path:
    """The simulated federation of task ``task_digest`` (created on demand by its users)."""
    base = os.environ.get(SIMULATION_ENV) or Path.home() / ".cache" / "cleanroom-fl" / \
        "flower-simulation"
    return Path(base) / task_digest[:16]


def simulated_site_name(sites: tuple[str, ...], partition_id: int, partitions: int) -> str:
    """The name of simulated site ``partition_id``: the task's own site names when they
    match the simulation's size, else ``site00``, ``site01``..."""
    if len(sites) == partitions and 0 <= partition_id < partitions:
        return sites[partition_id]
    return f"site{partition_id:0{max(2, len(str(partitions - 1)))}d}"


def aggregator_trust(home: Path) -> Path:
    """The simulated sites' trust policy for the coordinator's aggregator enclave (the
    honest aggregator code's measurement under the federation's simulated root), written on
    first use by whichever side needs it first."""
    from cleanroom.attestation.measure import aggregator_measurement, write_aggregator_trust
    from cleanroom.attestation.simulated import ensure_simulated_root

    root = ensure_simulated_root(home / "simulated-root")
    path = home / "aggregator-trust.json"
    if not path.exists():
        write_aggregator_trust(path, simulated_root=root.bundle_path,
                               measurements=[aggregator_measurement()])
    return path
