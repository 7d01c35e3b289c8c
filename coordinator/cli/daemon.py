"""``cleanroom coordinator``: run the consortium's coordinator daemon."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("coordinator", help="run the coordinator daemon (SuperLink + API)",
                       description="Start Flower's SuperLink (TLS, SuperNode authentication, "
                       "no runtime dependency installation), register the provisioned sites "
                       "and serve the coordinator API until SIGTERM/SIGINT.")
    p.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    p.set_defaults(func=cmd_coordinator)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from cleanroom.coordinator.daemon import serve_coordinator

    def ready(config: object, nodes: dict[str, int]) -> None:
        c = config  # CoordinatorConfig
        print(f"coordinator ready: SuperLink {c.superlink.address} (TLS, node auth), "  # type: ignore[attr-defined]
              f"API http://{c.api.host}:{c.api.port}, sites {sorted(nodes)}", flush=True)  # type: ignore[attr-defined]

    return serve_coordinator(args.config, on_ready=ready)
