"""The site's Flower ClientApp for deployments. The SuperNode's node config names the site
configuration file (``site-config``).

It runs in a child the site's executor (:mod:`cleanroom.site_agent.executor`) forks per
message from its warm process, after the task's FAB passed the site's gate; the warm process
built the site runtime once (:data:`SITES`), so a message pays neither imports nor key
derivation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleanroom.errors import ConfigError
from cleanroom.site_agent.app import make_client_app


class DeployedSites:
    """Site runtime from ``context.node_config['site-config']`` (cached per process)."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def runtime_for_path(self, path: str) -> Any:
        runtime = self._cache.get(path)
        if runtime is None:
            from cleanroom.site_agent.config import load_site_config
            from cleanroom.site_agent.runtime import build_runtime

            runtime = build_runtime(load_site_config(Path(path)))
            self._cache[path] = runtime
        return runtime

    def __call__(self, ctx: Any) -> Any:
        path = str(ctx.node_config.get("site-config", ""))
        if not path:
            raise ConfigError("SuperNode node config has no 'site-config' entry")
        return self.runtime_for_path(path)


SITES = DeployedSites()
app = make_client_app(SITES)
