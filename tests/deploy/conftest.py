"""One real federation on loopback for the deployment tests (coordinator daemon, then the two
site daemons on first use), shared by every e2e module of this package: starting it costs
~20 s on 2 cores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cleanroom.process import Supervisor

CLI = [sys.executable, "-m", "cleanroom"]
SITES = ("cleveland", "hungary")


@dataclass
class Federation:
    out: Path
    link: int  # public port: the Fleet proxy
    control: int  # loopback SuperLink (Control API)
    api: int
    site_api: dict[str, int]

    @property
    def config(self) -> Path:
        return self.out / "coordinator" / "coordinator.toml"

    @property
    def ca(self) -> Path:
        return self.out / "coordinator" / "ca.pem"

    def site_config(self, name: str) -> Path:
        return self.out / "sites" / name / "site.toml"


def clone_site(fed: Federation, source: str, name: str) -> Path:
    """A copy of site ``source``'s folder as ``name``, on free local ports (the real site may
    be running)."""
    import re
    import shutil

    from cleanroom.process import free_port

    folder = fed.out / "sites" / name
    shutil.copytree(fed.out / "sites" / source, folder,
                    ignore=shutil.ignore_patterns("logs", "flwr-home", "*.secret"))
    config = folder / "site.toml"
    config.write_text(re.sub(r"(?m)^port = \d+$", lambda _: f"port = {free_port()}",
                             config.read_text()))
    return folder


def flower_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (our federation folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if marker in cmd and state != "Z" and int(entry.name) != os.getpid():
            found.append(cmd)
    return found


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
    raise AssertionError(f"{url} did not answer in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="package")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    from cleanroom.coordinator.provision import ProvisionRequest, provision
    from cleanroom.process import free_port

    out = tmp_path_factory.mktemp("e2e") / "fed"
    link, api, control = free_port(), free_port(), free_port()
    site_ports = {name: (free_port(), free_port()) for name in SITES}
    provision(ProvisionRequest(out=out, sites=list(SITES), superlink_port=link, api_port=api,
                               control_port=control, site_ports=site_ports,
                               site_torch_threads=1))
    log_path = out / "coordinator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*CLI, "coordinator", "--config",
                                 str(out / "coordinator" / "coordinator.toml")],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log_path, 90)
        yield Federation(out, link, control, api, {n: p[1] for n, p in site_ports.items()})
    finally:
        _stop(proc)
    time.sleep(1)
    assert flower_processes(str(out)) == [], "coordinator left processes behind"


@pytest.fixture(scope="package")
def sites(coordinator: Federation) -> Iterator[Federation]:
    """Both site daemons running (SuperNode + warm gated executor each)."""
    procs = []
    try:
        for name in SITES:
            log_path = coordinator.out / f"site-{name}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([*CLI, "site", "--config",
                                         str(coordinator.site_config(name))],
                                        stdout=log, stderr=subprocess.STDOUT)
            procs.append((proc, log_path, name))
        for proc, log_path, name in procs:
            wait_http(f"http://127.0.0.1:{coordinator.site_api[name]}/health", proc, log_path)
        yield coordinator
    finally:
        for proc, _, _ in procs:
            _stop(proc)


@contextlib.contextmanager
def impostor_online(fed: Federation, tmp_path: Path, name: str = "cleveland") -> Iterator[
        Supervisor]:
    """FINDINGS Q4: someone with Control access registers a second key under a real site's
    name and brings a SuperNode with it online through the public port."""
    from cleanroom.coordinator.flower_cli import FlowerCli
    from cleanroom.pki import generate_node_key
    from cleanroom.process import FLOWER_ENV, free_port

    impostor = tmp_path / "impostor"
    impostor.mkdir()
    generate_node_key(impostor)
    sup = Supervisor(tmp_path / "impostor-logs")
    cli = FlowerCli(tmp_path / "impostor-cli", f"127.0.0.1:{fed.control}", fed.ca,
                    {**sup.env(), **FLOWER_ENV})
    cli.register(impostor / "node_auth.pub", name, {})
    try:
        sup.start("impostor", [
            "flower-supernode", "--superlink", f"127.0.0.1:{fed.link}",
            "--root-certificates", str(fed.ca),
            "--auth-supernode-private-key", str(impostor / "node_auth.key"),
            "--port", str(free_port()), "--node-config", f"site='{name}'",
        ], sup.env({"FLWR_HOME": str(tmp_path / "impostor-home")}))
        deadline = time.monotonic() + 60
        while "SuperNode ID" not in sup.log_tail("impostor", 200):
            sup.check_alive()
            assert time.monotonic() < deadline, sup.log_tail("impostor")
            time.sleep(0.3)
        yield sup
    finally:
        sup.stop()
