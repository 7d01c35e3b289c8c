"""Which site a public-API ClientApp (``ClientApp(mods=[ConfidentialMod(task)])``) runs as.

* Under a ``cleanroom site`` daemon's SuperNode (its node config names ``site-config``): that
  site, its enclave, sealed ledger, approvals and data room; the app's own folder (the FAB
  Flower installed) is where its task's code is found, by digest.
* Under Flower's simulation (node config ``partition-id`` / ``num-partitions``): simulated
  site ``partition-id`` of a local simulated federation kept in
  :func:`cleanroom.localsim.simulation_home` of the task (the folder the app's
  ``ConfidentialStrategy`` uses too): its own simulated chip, a policy that approves this
  task, and its data registered from the task's ``simulate()``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cleanroom.errors import ConfigError
from cleanroom.site_agent.runtime import SiteRuntime


def app_folder(task: Any) -> Path:
    """The folder a task comes from: a folder given as such, or the Flower App (or folder) of
    the module that defines a Task object's model."""
    from cleanroom.task import Task, folder_of

    if isinstance(task, (str, Path)):
        return Path(task).resolve()
    if isinstance(task, Task):
        return folder_of(task)
    raise ConfigError("ConfidentialMod needs the app's task (a cleanroom.task.Task defined in "
                      "the app's folder, or the folder itself)")


class AppSites:
    """``runtime_for`` of a public-API ConfidentialMod: the deployed or simulated site."""

    def __init__(self, task: Any) -> None:
        self.folder = app_folder(task)
        self._cache: dict[str, SiteRuntime] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable: Flower's simulation ships the app
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder = state["folder"]
        self._cache = {}
        self._lock = threading.Lock()

    def __call__(self, ctx: Any) -> SiteRuntime:
        config = str(ctx.node_config.get("site-config", "") or "")
        key = config or f"sim:{ctx.node_config.get('partition-id')}"
        with self._lock:
            runtime = self._cache.get(key)
            if runtime is None:
                runtime = self._deployed(Path(config)) if config else self._simulated(ctx)
                self._cache[key] = runtime
            return runtime

    def _deployed(self, path: Path) -> SiteRuntime:
        from cleanroom.site_agent.config import load_site_config
        from cleanroom.site_agent.runtime import build_runtime

        runtime = build_runtime(load_site_config(path))
        runtime.task_sources = (self.folder,)
        return runtime

    def _simulated(self, ctx: Any) -> SiteRuntime:
        from cleanroom.attestation.simulated import ensure_simulated_root
        from cleanroom.localsim import aggregator_trust, simulated_site_name, simulation_home
        from cleanroom.site_agent.config import (
            AggregatorTrust,
            ApprovedTask,
            EnclaveConfig,
            SiteConfig,
            SitePolicyConfig,
        )
        from cleanroom.site_agent.runtime import build_runtime
        from cleanroom.task import load_task

        try:
            pid = int(ctx.node_config["partition-id"])
            count = int(ctx.node_config["num-partitions"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError("this node is neither a 'cleanroom site' (node config "
                              "site-config) nor a simulated one (partition-id, "
                              "num-partitions)") from None
        loaded = load_task(self.folder)
        home = simulation_home(loaded.digest)
        ensure_simulated_root(home / "simulated-root")
        name = simulated_site_name(loaded.task.sites, pid, count)
        config = SiteConfig(
            site=name, state_dir=home / "sites" / name,
            enclave=EnclaveConfig(provider="simulated", simulated_root=home / "simulated-root"),
            policy=SitePolicyConfig(tasks=[ApprovedTask(digest=loaded.digest,
                                                        name=loaded.name)],
                                    task_dirs=[self.folder], share_metrics=True),
            aggregator=AggregatorTrust(required=True, policy=aggregator_trust(home)),
            seed=pid)
        runtime = build_runtime(config)
        runtime.datasets.register_simulated(loaded.task, pid, count)
        return runtime
