"""``cleanroom site``: the hospital's site-agent daemon and its local tools."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
examples:
  cleanroom site --config site.toml                 run the daemon (SuperNode + local API)
  cleanroom site keygen --out keys/                 make this site's node key; send the .pub
  cleanroom site approve 123 --config site.toml     approve run 123 (if approval is required)
  cleanroom site status --config site.toml          provider, measurement, budget, recent rounds
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("site", help="site agent daemon, keygen, approvals, status",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Run a hospital's site agent (Flower SuperNode with TLS and "
                       "node auth, the confidential ClientApp, the local API) or manage it.")
    p.add_argument("--config", type=Path, help="site.toml (for the daemon)")
    p.set_defaults(func=cmd_daemon)
    ssub = p.add_subparsers(dest="site_command", metavar="COMMAND")
    k = ssub.add_parser("keygen", help="create this site's SuperNode auth key (private key "
                        "stays here, mode 0600)")
    k.add_argument("--out", type=Path, required=True, metavar="DIR")
    k.set_defaults(func=cmd_keygen)
    a = ssub.add_parser("approve", help="approve a run (sites with require_approval)")
    a.add_argument("run_id")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--revoke", action="store_true", help="withdraw the approval")
    a.set_defaults(func=cmd_approve)
    s = ssub.add_parser("status", help="provider, measurement, budget left, recent rounds")
    s.add_argument("--config", type=Path, required=True)
    s.set_defaults(func=cmd_status)


def _runtime(config_path: Path):  # -> SiteRuntime
    from cleanroom.site_agent.config import load_site_config
    from cleanroom.site_agent.runtime import build_runtime

    return build_runtime(load_site_config(config_path))


def cmd_daemon(args: argparse.Namespace) -> int:
    from cleanroom.errors import ConfigError
    from cleanroom.site_agent.daemon import serve_site

    if args.config is None:
        raise ConfigError("cleanroom site needs --config site.toml (or a COMMAND; see --help)")

    def ready(config: object) -> None:
        c = config
        print(f"site {c.site} ready: SuperNode -> {c.flower.superlink}, API "  # type: ignore[attr-defined]
              f"http://{c.api.host}:{c.api.port}", flush=True)  # type: ignore[attr-defined]

    return serve_site(args.config, on_ready=ready)


def cmd_keygen(args: argparse.Namespace) -> int:
    from cleanroom.pki import generate_node_key

    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "node_auth.key").exists():
        from cleanroom.errors import ConfigError

        raise ConfigError(f"{args.out / 'node_auth.key'} exists; refusing to overwrite a key")
    generate_node_key(args.out)
    print(f"private key: {args.out / 'node_auth.key'} (mode 0600, keep it here)")
    print(f"send to the consortium: {args.out / 'node_auth.pub'}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    runtime = _runtime(args.config)
    if args.revoke:
        runtime.approvals.revoke(args.run_id, by="cli")
        print(f"approval of run {args.run_id} withdrawn at site {runtime.site}")
    else:
        runtime.approvals.approve(args.run_id, by="cli")
        print(f"run {args.run_id} approved at site {runtime.site}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cleanroom.site_agent.api import status_of

    print(json.dumps(status_of(_runtime(args.config)), indent=2))
    return 0
