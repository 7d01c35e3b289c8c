"""The site's Flower ClientApp for deployments (runs under the SuperNode, one process per
message). The SuperNode's node config names the site configuration file (``site-config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleanroom.errors import ConfigError
from cleanroom.site_agent.app import make_client_app


class DeployedSites:
    """Site runtime from ``context.node_config['site-config']`` (cached per process)."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __call__(self, ctx: Any) -> Any:
        path = str(ctx.node_config.get("site-config", ""))
        if not path:
            raise ConfigError("SuperNode node config has no 'site-config' entry")
        runtime = self._cache.get(path)
        if runtime is None:
            from cleanroom.site_agent.config import load_site_config
            from cleanroom.site_agent.runtime import build_runtime

            runtime = build_runtime(load_site_config(Path(path)))
            self._cache[path] = runtime
        return runtime


app = make_client_app(DeployedSites())
