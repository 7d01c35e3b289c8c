"""What the daemons start, without starting it: the SuperLink only on loopback and in process
isolation with a fresh secret its own SuperExec shares, the Fleet proxy on the public port;
the SuperNode in process isolation with a secret only the site's executor holds; ``flwr``
pointed at the loopback Control port. And the configuration keeps the two ports apart."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from cleanroom.coordinator import daemon as coordinator_daemon
from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.coordinator.serverapp import CONFIG_ENV
from cleanroom.errors import ConfigError


class FakeSupervisor:
    def __init__(self) -> None:
        self.started: dict[str, tuple[list[str], dict[str, str]]] = {}

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"BASE": "1", **(extra or {})}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Any:
        self.started[name] = (args, env or {})

    def check_alive(self) -> None:
        pass

    def log_size(self, name: str) -> int:
        return 0

    def log_since(self, name: str, offset: int) -> str:
        return ""

    def forget(self, name: str) -> None:
        pass


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "fed"
    provision(ProvisionRequest(out=out, sites=["cleveland", "hungary"], superlink_port=29700,
                               api_port=29701, site_base_port=29710, site_api_base_port=29720))
    return out


def test_superlink_only_on_loopback_with_its_own_superexec(fed, monkeypatch):
    config_path = fed / "coordinator" / "coordinator.toml"
    config = load_coordinator_config(config_path)
    assert config.superlink.control_port == 29702  # provision's default: API port + 1
    monkeypatch.setattr(coordinator_daemon, "https_health", lambda *_a, **_k: 200)
    sup = FakeSupervisor()
    swept: list[list[str]] = []  # what was started when the orphaned runs were stopped
    monkeypatch.setattr(coordinator_daemon, "stop_orphaned_runs",
                        lambda cli: swept.append(sorted(sup.started)) or [])
    coordinator_daemon.start_superlink(config, config_path, sup)  # type: ignore[arg-type]
    assert swept == [["superlink"]]  # before the SuperExec and before any SuperNode connects
    link, _ = sup.started["superlink"]
    assert flag(link, "--host") == "127.0.0.1" and flag(link, "--port") == "29702"
    assert flag(link, "--isolation") == "process"
    assert "--enable-supernode-auth" in link
    secret = Path(flag(link, "--superexec-auth-secret-file"))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    superexec, superexec_env = sup.started["superexec"]
    assert superexec[0] == "flower-superexec"
    assert flag(superexec, "--superexec-auth-secret-file") == str(secret)
    assert flag(superexec, "--runtime-api-address") == "127.0.0.1:29702"
    assert "--insecure" not in superexec  # TLS to the SuperLink, verified with the CA
    assert superexec_env[CONFIG_ENV] == str(config_path.resolve())  # the ServerApp's config
    proxy, _ = sup.started["fleet-proxy"]
    assert proxy[1:3] == ["-m", "cleanroom.coordinator.proxy"]
    # a restart gets a new secret
    first = secret.read_bytes()
    coordinator_daemon.start_superlink(config, config_path, FakeSupervisor())  # type: ignore[arg-type]
    assert secret.read_bytes() != first


def test_flwr_talks_to_the_loopback_control_port(fed):
    control = coordinator_daemon.control_for(fed / "coordinator" / "coordinator.toml", env={})
    text = (control.cli.home / "config.toml").read_text()
    assert 'address = "127.0.0.1:29702"' in text and "29700" not in text


def test_the_control_port_must_differ_from_the_public_and_api_ports(fed, tmp_path):
    text = (fed / "coordinator" / "coordinator.toml").read_text()
    same = fed / "coordinator" / "same.toml"
    same.write_text(text.replace("control_port = 29702", "control_port = 29700"))
    with pytest.raises(ConfigError, match="control_port must differ"):
        load_coordinator_config(same)
    clash = fed / "coordinator" / "clash.toml"
    clash.write_text(text.replace("control_port = 29702", "control_port = 29701"))
    with pytest.raises(ConfigError, match="must differ"):
        coordinator_daemon.preflight(load_coordinator_config(clash))


def test_supernode_runs_tasks_only_through_the_sites_executor(fed):
    from cleanroom.site_agent import daemon as site_daemon
    from cleanroom.site_agent.config import load_site_config

    path = (fed / "sites" / "cleveland" / "site.toml").resolve()
    config = load_site_config(path)
    sup = FakeSupervisor()
    site_daemon.start_node(config, path, sup)  # type: ignore[arg-type]
    node, _ = sup.started["supernode"]
    assert node[0] == "flower-supernode" and flag(node, "--isolation") == "process"
    secret = Path(flag(node, "--superexec-auth-secret-file"))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    assert flag(node, "--node-config") == f"site='cleveland' site-config='{path}'"
    executor, env = sup.started["executor"]
    assert executor[1:3] == ["-m", "cleanroom.site_agent.executor"]
    assert flag(executor, "--secret-file") == str(secret)
    assert flag(executor, "--runtime-api-address") == f"127.0.0.1:{config.flower.port}"
    assert flag(executor, "--config") == str(path)
    assert env["FLWR_HOME"] == str(config.state_dir / "flwr-home")
    assert "--token" not in " ".join(executor)  # tokens never on a command line


def test_the_executor_starts_only_once_the_supernode_is_connected(monkeypatch):
    from cleanroom.process import DaemonError
    from cleanroom.site_agent import daemon as site_daemon

    class Node(FakeSupervisor):
        def __init__(self, log: str, dead: bool = False) -> None:
            super().__init__()
            self.log, self.dead = log, dead

        def log_tail(self, name: str, lines: int = 30) -> str:
            return self.log

        def log_since(self, name: str, offset: int) -> str:
            return self.log

        def check_alive(self) -> None:
            if self.dead:
                raise DaemonError(f"supernode exited with status 1:\n{self.log}")

    assert site_daemon.wait_connected(Node("INFO: SuperNode ID: 42"), timeout=2)  # type: ignore[arg-type]
    refused = Node("Exit Code: 305 ... [code: 2004] Failed to activate SuperNode.", dead=True)
    with pytest.raises(DaemonError, match="does not know this site's node key"):
        site_daemon.wait_connected(refused, timeout=2)  # type: ignore[arg-type]
    assert not site_daemon.wait_connected(Node("Connection attempt failed, retrying"),  # type: ignore[arg-type]
                                          timeout=0.3)


class Restarting(FakeSupervisor):
    """A SuperLink that refuses to activate the node ``refusals`` times (it still holds the
    node online from a start that crashed), then lets it in."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals, self.starts = refusals, 0

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Any:
        super().start(name, args, env)
        self.starts += name == "supernode"

    def log_since(self, name: str, offset: int) -> str:
        if self.starts <= self.refusals:
            return "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode."
        return "INFO: SuperNode ID: 42"

    def check_alive(self) -> None:
        from cleanroom.process import DaemonError

        if self.starts <= self.refusals:
            raise DaemonError("supernode exited with status 1:\n" + self.log_since("", 0))


@pytest.mark.parametrize("crashed", [True, False])
def test_a_site_restarted_after_a_crash_waits_until_the_superlink_lets_its_node_go(
        fed, monkeypatch, crashed):
    """kill -9 leaves the node online at the SuperLink for up to a minute (no heartbeat yet
    missed) and Flower refuses to activate it again: after a crash (online mark left behind)
    the daemon starts the SuperNode again until it is let in (75 s at most); a fresh start
    retries for 10 s (the coordinator may still be registering the key), then a key it
    never registered stops the daemon, with advice."""
    from cleanroom.process import DaemonError
    from cleanroom.site_agent import daemon as site_daemon
    from cleanroom.site_agent.config import load_site_config

    monkeypatch.setattr(site_daemon.time, "sleep", lambda _: None)
    path = (fed / "sites" / "hungary" / "site.toml").resolve()
    config = load_site_config(path)
    mark = site_daemon.online_mark(config)
    mark.parent.mkdir(parents=True, exist_ok=True)
    if crashed:
        mark.write_text("")
    else:
        mark.unlink(missing_ok=True)
    sup = Restarting(refusals=2)

    def connected(offset: int) -> object:
        return site_daemon.wait_connected(sup, timeout=2, offset=offset)  # type: ignore[arg-type]

    # after a crash, or on a fresh start while the coordinator is still registering the key
    site_daemon.start_node(config, path, sup, connected)  # type: ignore[arg-type]
    assert sup.starts == 3 and "executor" in sup.started
    assert mark.exists()  # connected: a crash from now on is recognised
    if not crashed:  # a key the coordinator never registers: refused once the wait is over
        mark.unlink()
        monkeypatch.setattr(site_daemon, "UNREGISTERED_WAIT", 0.3)
        never = Restarting(refusals=10**6)
        with pytest.raises(DaemonError, match="does not know this site's node key"):
            site_daemon.start_node(config, path, never,  # type: ignore[arg-type]
                                   lambda offset: site_daemon.wait_connected(
                                       never, timeout=2, offset=offset))  # type: ignore[arg-type]
        assert "executor" not in never.started


class FakeCli:
    def __init__(self, runs: list[dict[str, str]]) -> None:
        self.runs, self.stopped = runs, []  # type: ignore[var-annotated]

    def list_runs(self) -> list[dict[str, str]]:
        return self.runs

    def stop(self, run_id: int) -> None:
        self.stopped.append(run_id)
        for run in self.runs:  # as the SuperLink records a stopped run
            if run["run-id"] == str(run_id):
                run["status"] = "finished:stopped"


def test_a_restart_stops_the_runs_its_previous_start_left_running():
    """Their ServerApps died with the daemon; their undelivered messages must not reach a
    reconnecting SuperNode (it would store one and then stall on it): Flower's stop deletes
    them. Finished and pending runs are left alone."""
    cli = FakeCli([{"run-id": "11", "status": "running"},
                   {"run-id": "12", "status": "starting"},
                   {"run-id": "13", "status": "pending"},
                   {"run-id": "14", "status": "finished:completed"},
                   {"run-id": "15", "status": "finished:stopped"}])
    assert coordinator_daemon.stop_orphaned_runs(cli) == [11, 12]  # type: ignore[arg-type]
    assert cli.stopped == [11, 12]
    assert coordinator_daemon.stop_orphaned_runs(FakeCli([])) == []  # type: ignore[arg-type]
