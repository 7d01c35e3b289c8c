"""``cleanroom coordinator``: the consortium's daemon.

Starts, as its own children (stopped together, descendants included, on SIGTERM/SIGINT):

* Flower's SuperLink on **loopback only** (``superlink.control_port``): TLS, SuperNode
  authentication, no runtime dependency installation, persistent state, and
  ``--isolation process --superexec-auth-secret-file``: only a SuperExec holding the daemon's
  fresh per-start secret (mode 0600) can take a ServerApp's task token;
* that SuperExec (Flower's ``flower-superexec`` with the same secret; it starts the
  ServerApp of each run, with the coordinator configuration in its environment);
* the Fleet proxy (:mod:`cleanroom.coordinator.proxy`) on the public ``host:port``: only the
  calls a SuperNode makes reach the SuperLink;

then registers the provisioned sites' node keys (only those may connect; the ServerApp maps a
node to its site by that key) and serves the coordinator API. Runs are submitted on the
loopback Control port: ``cleanroom run`` on this host, or the API's ``POST /runs`` with an
operator token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

from cleanroom.attestation.validate.policy import load_policy
from cleanroom.coordinator.config import CoordinatorConfig, load_coordinator_config
from cleanroom.coordinator.flower_cli import FlowerCli
from cleanroom.coordinator.serverapp import CONFIG_ENV
from cleanroom.errors import ConfigError
from cleanroom.fsutil import write_private
from cleanroom.http import load_tokens, serve_until_signal
from cleanroom.process import (
    DAEMON_MARKER,
    DaemonError,
    Supervisor,
    https_health,
    require_free_ports,
    signals_ignored,
    wait_for,
)

log = logging.getLogger(__name__)


def preflight(config: CoordinatorConfig) -> None:
    """Fail early, with the file or field named, before anything starts."""
    for what, path in (("TLS CA certificate", config.superlink.ca_cert),
                       ("TLS certificate", config.superlink.cert),
                       ("TLS key", config.superlink.key), ("audit signing key", config.audit_key),
                       ("policy", config.policy), ("API tokens", config.api.tokens)):
        if not Path(path).is_file():
            raise ConfigError(f"{what} {path} does not exist")
    for site in config.sites:
        if not site.public_key.is_file():
            raise ConfigError(f"site {site.name}: public key {site.public_key} does not exist")
    policy = load_policy(config.policy)
    load_tokens(config.api.tokens)
    if config.tdx_collateral is not None:
        from cleanroom.attestation.collateral_folder import load_collateral

        load_collateral(config.tdx_collateral)  # a broken folder fails here, named
    elif policy.require_collateral and "tdx" in policy.formats:
        log.warning("the policy requires TDX collateral but tdx_collateral is not set: TDX "
                    "sites will be quarantined (set tdx_collateral in coordinator.toml)")
    link = config.superlink
    if len({link.port, link.control_port, config.api.port}) < 3:
        raise ConfigError(f"superlink.port ({link.port}), superlink.control_port "
                          f"({link.control_port}) and api.port ({config.api.port}) must differ")
    require_free_ports((link.host, link.port, "SuperLink public (Fleet proxy)"),
                       ("127.0.0.1", link.control_port, "SuperLink control"),
                       (config.api.host, config.api.port, "coordinator API"))


class RunControl:
    """What the API and ``cleanroom run`` do through Flower."""

    def __init__(self, config: CoordinatorConfig, cli: FlowerCli, config_path: Path) -> None:
        self.config = config
        self.cli = cli
        self.config_path = Path(config_path).resolve()

    def app_dir(self) -> Path:
        """The run's Flower App: the configured task's folder (a task is a Flower App)."""
        from cleanroom.task import is_flower_app, task_folder

        spec = self.config.training.task
        folder = task_folder(spec)
        if not is_flower_app(folder):
            raise ConfigError(f"task {spec} ({folder}) is not a Flower App: it needs a "
                              "pyproject.toml with [tool.flwr.app] to run in a deployment")
        return folder

    def submit(self, options: dict[str, Any]) -> int:
        """Submit a run of the configured task with ``options`` (checked: RunOptions)."""
        from cleanroom.coordinator.serverapp import OPTIONS_KEY, RunOptions

        checked = RunOptions.model_validate(options)
        app = self.app_dir()
        if not app_takes_options(app):
            given = sorted(checked.model_dump(exclude_defaults=True))
            if given:
                raise ConfigError(
                    f"the task's Flower App ({app}) does not declare '{OPTIONS_KEY}' in "
                    "[tool.flwr.app.config]: its own ServerApp decides rounds, strategy and "
                    f"training, so {', '.join(given)} would have no effect; drop them, or "
                    f"declare {OPTIONS_KEY} = \"{{}}\" there and read them in the ServerApp "
                    "(docs/tasks.md, 'Deploying your own app')")
            return self.cli.submit(app, {})
        return self.cli.submit(app, {OPTIONS_KEY: checked.model_dump_json(
            exclude_defaults=True)})

    def stop(self, run_id: int) -> None:
        self.cli.stop(run_id)

    def list_nodes(self) -> list[dict[str, Any]]:
        return self.cli.list_nodes()

    def superlink_up(self) -> bool:
        try:
            return https_health(self.health_url(), self.config.superlink.ca_cert) == 200
        except OSError:
            return False

    def health_url(self) -> str:
        return f"https://{self.config.superlink.control_address}/health"


def app_takes_options(app: Path) -> bool:
    """Whether the Flower App in ``app`` declares the run-options key (Flower refuses a run
    whose run config overrides a key the app does not declare)."""
    from cleanroom.coordinator.serverapp import OPTIONS_KEY
    from cleanroom.task import flower_app_table

    table = flower_app_table(app)
    if table is None:
        raise ConfigError(f"{app / 'pyproject.toml'}: no readable [tool.flwr.app] table (not "
                          "a Flower App)")
    config = table.get("config", {})
    return isinstance(config, dict) and OPTIONS_KEY in config


def control_cli(config: CoordinatorConfig, env: dict[str, str]) -> FlowerCli:
    """``flwr`` pointed at the SuperLink's loopback Control port (never the public one)."""
    return FlowerCli(config.state_dir / "flwr-home-cli", config.superlink.control_address,
                     config.superlink.ca_cert, env)


def control_for(config_path: Path, env: dict[str, str] | None = None) -> RunControl:
    """A RunControl for a running coordinator (used by ``cleanroom run`` on its host)."""
    config = load_coordinator_config(config_path)
    sup = Supervisor(config.state_dir / "logs")
    return RunControl(config, control_cli(config, env or sup.env()), config_path)


SECRET_FILE = "superexec.secret"
SUPEREXEC_POLL = "0.2"  # s between the SuperExec's AcquireTask calls (Flower's default: 1.0)


def new_superexec_secret(state_dir: Path) -> Path:
    """A fresh SuperExec secret for this start (mode 0600; read by Flower as raw bytes)."""
    path = state_dir / SECRET_FILE
    write_private(path, secrets.token_bytes(32))
    return path


def start_superlink(config: CoordinatorConfig, config_path: Path, sup: Supervisor) -> None:
    """SuperLink on loopback + our SuperExec (shared secret) + the public Fleet proxy."""
    link = config.superlink
    link.database.parent.mkdir(parents=True, exist_ok=True)
    secret = new_superexec_secret(config.state_dir)
    env = sup.env({"FLWR_HOME": str(config.state_dir / "flwr-home-link"),
                   CONFIG_ENV: str(config_path.resolve()),
                   "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL})
    sup.start("superlink", [
        "flower-superlink", "--ssl-ca-certfile", str(link.ca_cert),
        "--ssl-certfile", str(link.cert), "--ssl-keyfile", str(link.key),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(link.control_port),
        "--database", str(link.database),
        "--isolation", "process", "--superexec-auth-secret-file", str(secret),
    ], env)
    internal = f"https://{link.control_address}/health"
    wait_for(lambda: https_health(internal, link.ca_cert) == 200, 60,
             "the SuperLink to answer", sup)
    stop_orphaned_runs(control_cli(config, sup.env()))  # before any SuperNode can connect
    sup.start("superexec", [
        "flower-superexec", "--runtime-api-address", link.control_address,
        "--root-certificates", str(link.ca_cert), "--superexec-auth-secret-file", str(secret),
    ], env)
    sup.start("fleet-proxy", [sys.executable, "-m", "cleanroom.coordinator.proxy",
                              "--config", str(config_path.resolve())], env)
    public = f"https://{'127.0.0.1' if link.host in ('0.0.0.0', '::') else link.host}:" \
        f"{link.port}/health"
    wait_for(lambda: https_health(public, link.ca_cert) == 200, 60,
             "the Fleet proxy to answer", sup)


ORPHANED = ("starting", "running")  # a ServerApp was started: it died with the last start


def stop_orphaned_runs(cli: FlowerCli) -> list[int]:
    """Stop the runs a previous start of the daemon left starting or running (its ServerApps
    died with it; a resumed run gets a new Flower run id). Before the Fleet proxy opens:
    the SuperLink's database still holds their undelivered messages, and Flower stops a run
    only when it notices its ServerApp's missed heartbeats, tens of seconds later. A
    SuperNode handed such a message meanwhile stores it, then fails to fetch its content
    once the run ends (flwr 1.42 raises ``RunNotRunningException``, a BaseException, past
    its cleanup); the expired task's error reply then takes the slot of the next real reply
    in its one-reply-per-pull loop, and from then on each reply of that site goes out one
    message late: its rounds time out. Stopping the run deletes its messages and objects."""
    stopped = _orphaned(cli)
    for run_id in stopped:
        cli.stop(run_id)
    # ``flwr stop`` can fail (its outcome is not checked per call): the Fleet proxy must not
    # open while one is still live, or its messages reach the SuperNodes after all.
    left = _orphaned(cli) if stopped else []
    if left:
        raise DaemonError(f"run(s) {left} left running by the previous start could not be "
                          "stopped ('flwr stop' failed; see the SuperLink log)")
    if stopped:
        log.warning("stopped run(s) %s left running by the previous start (their ServerApps "
                    "died with it; resume them with 'cleanroom run --resume')", stopped)
    return stopped


def _orphaned(cli: FlowerCli) -> list[int]:
    """The ids of the runs the SuperLink lists as starting or running."""
    return [int(run["run-id"]) for run in cli.list_runs()
            if run["status"].split(":")[0] in ORPHANED]


def registered_nodes(config: CoordinatorConfig) -> dict[str, int]:
    path = config.state_dir / "nodes.json"
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def register_sites(config: CoordinatorConfig, cli: FlowerCli) -> dict[str, int]:
    known = registered_nodes(config)
    nodes = {site.name: cli.register(site.public_key, site.name, known)
             for site in config.sites}
    (config.state_dir / "nodes.json").write_text(json.dumps(nodes, indent=2) + "\n")
    return nodes


def serve_coordinator(config_path: Path, *, on_ready: Any = None) -> int:
    from cleanroom.coordinator.api import build_coordinator_api

    config = load_coordinator_config(config_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(config.state_dir / "logs")
    sup.take_over(config.state_dir / DAEMON_MARKER, "the coordinator daemon")
    preflight(config)
    try:
        start_superlink(config, config_path, sup)
        cli = control_cli(config, sup.env())
        nodes = register_sites(config, cli)
        log.info("SuperLink up on %s; registered %s", config.superlink.address, nodes)
        control = RunControl(config, cli, config_path)
        app = build_coordinator_api(config, control, load_tokens(config.api.tokens))
        if on_ready is not None:
            on_ready(config, nodes)
        asyncio.run(serve_until_signal(app, config.api.host, config.api.port, sup.check_alive))
    except DaemonError:
        raise
    finally:
        with signals_ignored():  # a second SIGTERM must not orphan the children
            sup.stop()
    return 0
