"""``cleanroom coordinator``: the consortium's daemon.

Starts Flower's SuperLink (TLS on, SuperNode authentication on, runtime dependency installation
off, persistent state), registers the provisioned sites' node keys (only those may connect),
and serves the coordinator API until SIGTERM/SIGINT; then stops everything it started,
descendants included.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from cleanroom.attestation.validate.policy import load_policy
from cleanroom.coordinator.config import CoordinatorConfig, load_coordinator_config
from cleanroom.coordinator.flower_cli import FlowerCli
from cleanroom.coordinator.serverapp import CONFIG_ENV
from cleanroom.errors import ConfigError
from cleanroom.http import load_tokens, serve_until_signal
from cleanroom.process import DaemonError, Supervisor, https_health, require_free_ports, wait_for

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
    require_free_ports((config.superlink.host, config.superlink.port, "SuperLink"),
                       (config.api.host, config.api.port, "coordinator API"))


class RunControl:
    """What the API and ``cleanroom run`` do through Flower."""

    def __init__(self, config: CoordinatorConfig, cli: FlowerCli, config_path: Path) -> None:
        self.config = config
        self.cli = cli
        self.config_path = Path(config_path).resolve()

    def app_dir(self) -> Path:
        """The run's Flower App: the configured task's folder (a task is a Flower App)."""
        from cleanroom.task import installed_folder, is_flower_app

        spec = self.config.training.task
        folder = Path(spec) if Path(spec).is_dir() else installed_folder(spec)
        if not is_flower_app(folder):
            raise ConfigError(f"task {spec} ({folder}) is not a Flower App: it needs a "
                              "pyproject.toml with [tool.flwr.app] to run in a deployment")
        return folder

    def submit(self, options: dict[str, Any]) -> int:
        """Submit a run of the configured task with ``options`` (checked: RunOptions)."""
        from cleanroom.coordinator.serverapp import OPTIONS_KEY, RunOptions

        checked = RunOptions.model_validate(options)
        return self.cli.submit(self.app_dir(), {OPTIONS_KEY: checked.model_dump_json(
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
        return f"https://{self.config.superlink.host}:{self.config.superlink.port}/health"


def control_for(config_path: Path, env: dict[str, str] | None = None) -> RunControl:
    """A RunControl for a running coordinator (used by ``cleanroom run``)."""
    config = load_coordinator_config(config_path)
    sup = Supervisor(config.state_dir / "logs")
    cli = FlowerCli(config.state_dir / "flwr-home-cli", config.superlink.address,
                    config.superlink.ca_cert, env or sup.env())
    return RunControl(config, cli, config_path)


def start_superlink(config: CoordinatorConfig, config_path: Path, sup: Supervisor) -> None:
    link = config.superlink
    link.database.parent.mkdir(parents=True, exist_ok=True)
    env = sup.env({"FLWR_HOME": str(config.state_dir / "flwr-home-link"),
                   CONFIG_ENV: str(config_path.resolve())})
    sup.start("superlink", [
        "flower-superlink", "--ssl-ca-certfile", str(link.ca_cert),
        "--ssl-certfile", str(link.cert), "--ssl-keyfile", str(link.key),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--host", link.host, "--port", str(link.port), "--database", str(link.database),
    ], env)
    url = f"https://{link.host}:{link.port}/health"
    wait_for(lambda: https_health(url, link.ca_cert) == 200, 60, "the SuperLink to answer",
             sup)


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
    preflight(config)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(config.state_dir / "logs")
    try:
        start_superlink(config, config_path, sup)
        cli = FlowerCli(config.state_dir / "flwr-home-cli", config.superlink.address,
                        config.superlink.ca_cert, sup.env())
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
        sup.stop()
    return 0
