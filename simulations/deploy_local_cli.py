"""``cleanroom deploy-local``: a whole federation on this machine, as separate OS processes.

The steps are functions the browser tests reuse: :func:`plan_local` (names and free ports),
:func:`provision_local`, :func:`start_local` (the coordinator daemon, then each site daemon,
each waited for on its API's /health), :func:`dashboard_lines` and :func:`hold` (keep the
federation up until Ctrl-C or SIGTERM, ``--keep-running``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from cleanroom.coordinator.strategies import STRATEGIES

if TYPE_CHECKING:
    from cleanroom.coordinator.provision import Provisioned
    from cleanroom.process import Supervisor

HEART = ("cleveland", "hungary", "switzerland", "va")
HOST = "127.0.0.1"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "deploy-local", help="provision and run a real local federation (separate processes)",
        description="Provision into --out, start the coordinator daemon and N site daemons as "
        "separate OS processes on 127.0.0.1 (TLS, node authentication, simulated enclaves), "
        "run R rounds through Flower's deployment engine (heart-disease hospitals for N <= 4, "
        "synthetic partitions above), write --out/report.json, then stop every process. With "
        "--keep-running the federation stays up after the run: the consortium dashboard and "
        "each site's dashboard are printed with the files holding their tokens, until Ctrl-C "
        "or SIGTERM stops every process.")
    p.add_argument("--sites", type=int, default=2, help="number of sites (default 2)")
    p.add_argument("--task", default=None, metavar="NAME|DIR",
                   help="the task: an installed task's name or your task's Flower App folder "
                   "(sites are site00, site01...; the task's 'simulate' hook gives each its "
                   "data). Default: heart-disease on its hospitals (N <= 4), else synthetic")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for the federation (keys, configs, logs) and report.json")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=None,
                   help="Flower strategy to wrap (default fedadam)")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before the run is abandoned (default 1800)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--keep-running", action="store_true",
                   help="after the run, leave the federation up and print the dashboard "
                   "addresses (http://127.0.0.1:PORT/) and where their tokens are; Ctrl-C or "
                   "SIGTERM stops every process")
    p.set_defaults(func=cmd_deploy_local)


@dataclass(frozen=True)
class LocalPlan:
    """Where a local federation lives: its folder, site names and loopback ports."""

    out: Path
    names: tuple[str, ...]
    superlink_port: int
    api_port: int
    control_port: int  # the SuperLink's own loopback port (Control API)
    site_ports: dict[str, tuple[int, int]]  # site -> (SuperNode port, site API port)

    @property
    def coordinator_url(self) -> str:
        return f"http://{HOST}:{self.api_port}/"

    def site_url(self, name: str) -> str:
        return f"http://{HOST}:{self.site_ports[name][1]}/"


def plan_local(out: Path, sites: int | list[str]) -> LocalPlan:
    """``sites``: a count (heart-disease hospitals up to 4, else site00...) or the names."""
    from cleanroom.errors import ConfigError
    from cleanroom.process import free_port

    if isinstance(sites, int):
        if not 1 <= sites <= 64:
            raise ConfigError("--sites must be between 1 and 64")
        names = list(HEART[:sites]) if sites <= len(HEART) else \
            [f"site{i:02d}" for i in range(sites)]
    else:
        names = list(sites)
    ports = [free_port() for _ in range(3 + 2 * len(names))]
    return LocalPlan(out=Path(out).resolve(), names=tuple(names), superlink_port=ports[0],
                     api_port=ports[1], control_port=ports[2],
                     site_ports={name: (ports[3 + 2 * i], ports[4 + 2 * i])
                                 for i, name in enumerate(names)})


def provision_local(plan: LocalPlan, rounds: int, task: str | None = None) -> Provisioned:
    """Provision ``plan``'s federation for ``task`` (an installed task's name or a task
    folder; default heart-disease for its hospitals, else synthetic)."""
    from cleanroom.coordinator.provision import ProvisionRequest, provision

    if task is None:
        task = "heart-disease" if all(n in HEART for n in plan.names) else "synthetic"
    return provision(ProvisionRequest(
        out=plan.out, sites=list(plan.names), task=task, superlink_port=plan.superlink_port,
        api_port=plan.api_port, control_port=plan.control_port, site_ports=plan.site_ports,
        rounds=rounds, site_torch_threads=1))  # many sites share this machine


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except OSError:
        return False


def start_local(plan: LocalPlan, prov: Provisioned, sup: Supervisor,
                timeout: float = 120.0) -> None:
    """Start the coordinator daemon, wait for its API, then every site daemon and theirs."""
    from cleanroom.process import wait_for

    cli = [sys.executable, "-m", "cleanroom", "-v"]
    sup.start("coordinator", [*cli, "coordinator", "--config", str(prov.coordinator_config)])
    wait_for(lambda: _http_ok(f"{plan.coordinator_url}health"), timeout,
             "the coordinator daemon", sup)
    for name in plan.names:
        sup.start(f"site-{name}", [*cli, "site", "--config", str(prov.site_configs[name])])
    for name in plan.names:
        url = f"{plan.site_url(name)}health"
        wait_for(lambda url=url: _http_ok(url), timeout, f"site {name}", sup)


def dashboard_lines(plan: LocalPlan, prov: Provisioned) -> list[str]:
    """Where to look and which file holds the token to sign in with (never the token)."""
    coord = prov.tokens["coordinator-operator"]
    lines = [f"consortium dashboard  {plan.coordinator_url}  token: {coord} "
             f"(read-only: {prov.tokens['coordinator-auditor']})"]
    width = max(len(n) for n in plan.names)
    lines += [f"site {name:<{width}} dashboard  {plan.site_url(name)}  token: "
              f"{prov.tokens[f'{name}-operator']}" for name in plan.names]
    return lines


def hold(sup: Supervisor, stop: threading.Event, say: Callable[[str], None] = print) -> None:
    """Keep the federation up until ``stop`` is set (by Ctrl-C/SIGTERM) or a daemon dies."""
    from cleanroom.process import DaemonError

    while not stop.wait(1.0):
        try:
            sup.check_alive()
        except DaemonError as exc:
            say(f"a daemon stopped: {str(exc).splitlines()[0]}")
            return


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from cleanroom.coordinator.cli.run import submit_and_follow
    from cleanroom.coordinator.daemon import app_takes_options
    from cleanroom.errors import ConfigError
    from cleanroom.process import Supervisor
    from cleanroom.task import task_folder

    sites: int | list[str] = args.sites
    if args.task not in (None, "heart-disease"):
        if not 1 <= args.sites <= 64:
            raise ConfigError("--sites must be between 1 and 64")
        sites = [f"site{i:02d}" for i in range(args.sites)]
        takes_options = app_takes_options(task_folder(args.task))
    else:
        takes_options = True
    plan = plan_local(args.out, sites)
    started = time.time()
    prov = provision_local(plan, args.rounds, args.task)
    sup = Supervisor(plan.out / "logs")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if not holding:  # during start-up and the run: unwind, the finally stops everything
            raise KeyboardInterrupt

    holding = False
    previous = signal.signal(signal.SIGTERM, on_signal)
    previous_int = signal.getsignal(signal.SIGINT)
    print(f"federation of {len(plan.names)} site(s) provisioned in {plan.out}", flush=True)
    try:
        start_local(plan, prov, sup)
        print(f"coordinator and {len(plan.names)} site daemon(s) up after "
              f"{time.time() - started:.1f}s", flush=True)
        options: dict[str, object] = {"rounds": args.rounds}
        if args.strategy:
            options["strategy"] = args.strategy
        if args.no_dp:
            options["dp"] = False
        if not takes_options:  # a user's own Flower App: its ServerApp decides the run
            print("the task's Flower App does not take run options: its own ServerApp "
                  "decides rounds, strategy and DP (--rounds, --strategy, --no-dp unused)",
                  flush=True)
            options = {}
        code = submit_and_follow(prov.coordinator_config, options, plan.out, args.timeout,
                                 not args.no_progress)
        if args.keep_running:
            holding = True
            signal.signal(signal.SIGINT, on_signal)
            print("\n".join(["", "the federation stays up; dashboards (sign in with the "
                             "token in the file named):", *dashboard_lines(plan, prov),
                             "Ctrl-C or SIGTERM stops every process"]), flush=True)
            hold(sup, stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        killed = sup.stop(timeout=30)
        print(f"stopped every process ({len(killed)} had to be killed) after "
              f"{time.time() - started:.1f}s", flush=True)
    return code
