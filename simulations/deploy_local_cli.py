"""``cleanroom deploy-local``: a whole federation on this machine, as separate OS processes."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

from cleanroom.coordinator.strategies import STRATEGIES

HEART = ("cleveland", "hungary", "switzerland", "va")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "deploy-local", help="provision and run a real local federation (separate processes)",
        description="Provision into --out, start the coordinator daemon and N site daemons as "
        "separate OS processes on 127.0.0.1 (TLS, node authentication, simulated enclaves), "
        "run R rounds through Flower's deployment engine (heart-disease hospitals for N <= 4, "
        "synthetic partitions above), write --out/report.json, then stop every process.")
    p.add_argument("--sites", type=int, default=2, help="number of sites (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for the federation (keys, configs, logs) and report.json")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=None,
                   help="Flower strategy to wrap (default fedadam)")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before the run is abandoned (default 1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_deploy_local)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except OSError:
        return False


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from cleanroom.coordinator.cli.run import submit_and_follow
    from cleanroom.coordinator.provision import ProvisionRequest, provision
    from cleanroom.errors import ConfigError
    from cleanroom.process import Supervisor, free_port, wait_for

    if not 1 <= args.sites <= 64:
        raise ConfigError("--sites must be between 1 and 64")
    names = list(HEART[:args.sites]) if args.sites <= len(HEART) else \
        [f"site{i:02d}" for i in range(args.sites)]
    ports = [free_port() for _ in range(3 + 2 * args.sites)]
    out = args.out.resolve()
    started = time.time()
    site_ports = {name: (ports[3 + 2 * i], ports[4 + 2 * i]) for i, name in enumerate(names)}
    prov = provision(ProvisionRequest(
        out=out, sites=names, task="heart-disease" if args.sites <= len(HEART) else
        "synthetic", superlink_port=ports[0], api_port=ports[1], control_port=ports[2],
        site_ports=site_ports,
        rounds=args.rounds, site_torch_threads=1))  # many sites share this machine
    sup = Supervisor(out / "logs")
    cli = [sys.executable, "-m", "cleanroom", "-v"]
    print(f"federation of {len(names)} site(s) provisioned in {out}", flush=True)
    try:
        sup.start("coordinator", [*cli, "coordinator", "--config",
                                  str(prov.coordinator_config)])
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{ports[1]}/health"), 120,
                 "the coordinator daemon", sup)
        for name in names:
            sup.start(f"site-{name}", [*cli, "site", "--config", str(prov.site_configs[name])])
        for name in names:
            url = f"http://127.0.0.1:{site_ports[name][1]}/health"
            wait_for(lambda url=url: _http_ok(url), 120, f"site {name}", sup)
        print(f"coordinator and {len(names)} site daemon(s) up after "
              f"{time.time() - started:.1f}s", flush=True)
        options: dict[str, object] = {"rounds": args.rounds}
        if args.strategy:
            options["strategy"] = args.strategy
        if args.no_dp:
            options["dp"] = False
        code = submit_and_follow(prov.coordinator_config, options, out, args.timeout,
                                 not args.no_progress)
    finally:
        killed = sup.stop(timeout=30)
        print(f"stopped every process ({len(killed)} had to be killed) after "
              f"{time.time() - started:.1f}s", flush=True)
    return code
