"""Daemons refuse bad inputs before starting anything, naming what is wrong."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.daemon import preflight as coordinator_preflight
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.errors import CollateralError, ConfigError
from cleanroom.process import DaemonError, port_in_use, tagged_pids
from cleanroom.site_agent.config import load_site_config
from cleanroom.site_agent.daemon import explain_failure
from cleanroom.site_agent.daemon import preflight as site_preflight


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "fed"
    provision(ProvisionRequest(out=out, sites=["cleveland", "hungary"], superlink_port=29400,
                               api_port=29401, site_base_port=29500, site_api_base_port=29600))
    return out


def test_valid_configs_pass(fed):
    coordinator_preflight(load_coordinator_config(fed / "coordinator" / "coordinator.toml"))
    runtime = site_preflight(load_site_config(fed / "sites" / "cleveland" / "site.toml"))
    assert runtime.site == "cleveland"


def test_port_already_in_use(fed):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 29401))
        sock.listen()
        assert port_in_use("127.0.0.1", 29401)
        with pytest.raises(DaemonError, match="coordinator API port 29401"):
            coordinator_preflight(load_coordinator_config(
                fed / "coordinator" / "coordinator.toml"))


def test_port_in_time_wait_is_free_for_a_restarted_daemon():
    """A daemon killed with open connections leaves them in TIME_WAIT on its port: its
    restart must not be refused as 'already in use' for a minute."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and asyncio do
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: TIME_WAIT on the server's port
        client.close()
    assert not port_in_use("127.0.0.1", port)
    with socket.socket() as probe, pytest.raises(OSError):  # a plain bind (the old check)
        probe.bind(("127.0.0.1", port))


def test_malformed_config_names_the_field(fed, tmp_path):
    text = (fed / "sites" / "cleveland" / "site.toml").read_text()
    bad = fed / "sites" / "cleveland" / "bad.toml"
    bad.write_text(text.replace("lifetime_epsilon = 10.0", "lifetime_epsilon = -1\nfoo = 1"))
    with pytest.raises(ConfigError) as info:
        load_site_config(bad)
    assert "privacy.lifetime_epsilon" in str(info.value) and "privacy.foo" in str(info.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[superlink\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_coordinator_config(broken)


def test_wrong_policy_file(fed):
    config = load_coordinator_config(fed / "coordinator" / "coordinator.toml")
    policy = fed / "coordinator" / "policy.toml"
    original = policy.read_text()
    try:
        policy.write_text(original + "alow_debug = true\n")
        with pytest.raises(ConfigError, match="alow_debug"):
            coordinator_preflight(config)
        policy.write_text(original.replace('"simulation"', '"production"'))
        with pytest.raises(ConfigError, match="production policies never trust"):
            coordinator_preflight(config)
    finally:
        policy.write_text(original)


def test_node_key_must_be_openssh(fed):
    config = load_site_config(fed / "sites" / "hungary" / "site.toml")
    key = config.flower.auth_key  # type: ignore[union-attr]
    original = key.read_bytes()
    try:
        key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        with pytest.raises(ConfigError, match="OpenSSH"):
            site_preflight(config)
    finally:
        key.write_bytes(original)


def test_missing_files_named(fed, tmp_path):
    config = load_coordinator_config(fed / "coordinator" / "coordinator.toml")
    moved = config.superlink.cert.with_suffix(".moved")
    config.superlink.cert.rename(moved)
    try:
        with pytest.raises(ConfigError, match=r"TLS certificate .*superlink\.pem does not exist"):
            coordinator_preflight(config)
    finally:
        moved.rename(config.superlink.cert)


@pytest.mark.parametrize(("log", "advice"), [
    ("Exit Code: 305 ... [code: 2004] Failed to activate SuperNode.", "does not know this"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "does not chain"),
    ("[Errno 104] Connection reset by peer", "plaintext"),
])
def test_supernode_failures_explained(log, advice):
    assert advice in (explain_failure(log) or "")


def test_tag_scan_finds_only_tagged():
    assert tagged_pids("no-such-tag-" + "x" * 20) == []


def test_a_restart_stops_what_its_killed_predecessor_left_running(tmp_path):
    """kill -9 of a daemon alone leaves its children (SuperLink, SuperExec, proxy: sessions
    of their own) holding its ports; the next start stops them by the tag the marker
    recorded before it binds anything, and records its own."""
    import json
    import os
    import subprocess
    import sys

    from cleanroom.process import TAG_VAR, Supervisor

    marker = tmp_path / "daemon.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    env = {**os.environ, TAG_VAR: "previous-start-tag"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                             start_new_session=True)
    try:
        marker.write_text(json.dumps({"pid": dead.pid, "started": "1", "tag":
                                      "previous-start-tag"}))
        sup = Supervisor(tmp_path / "logs")
        assert sup.take_over(marker, "the test daemon") == [child.pid]
        assert child.wait(timeout=10) is not None
        recorded = json.loads(marker.read_text())
        assert recorded["pid"] == os.getpid() and recorded["tag"] == sup.tag
        assert sup.take_over(marker, "the test daemon") == []  # the same start: nothing
    finally:
        if child.poll() is None:
            child.kill()


def test_a_second_daemon_on_a_live_ones_state_is_refused(tmp_path):
    import json
    import subprocess
    import sys

    from cleanroom.process import Supervisor

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = (Path("/proc") / str(live.pid) / "stat").read_text().rsplit(")", 1)[1] \
            .split()[19]
        marker = tmp_path / "daemon.json"
        marker.write_text(json.dumps({"pid": live.pid, "started": started, "tag": "t"}))
        with pytest.raises(DaemonError, match=f"already running \\(pid {live.pid}"):
            Supervisor(tmp_path / "logs").take_over(marker, "the test daemon")
        assert live.poll() is None  # not touched
        # the same pid number with another start time is a reused pid: taken over
        marker.write_text(json.dumps({"pid": live.pid, "started": "1", "tag": "t"}))
        assert Supervisor(tmp_path / "logs").take_over(marker, "the test daemon") == []
        assert live.poll() is None
        marker.write_text("{not json")  # a torn marker is no obstacle
        Supervisor(tmp_path / "logs").take_over(marker, "the test daemon")
    finally:
        live.kill()
        live.wait()


def test_configured_tdx_collateral_loads_once_and_a_broken_folder_is_named(fed, tmp_path):
    """The coordinator passes its configured Intel collateral to the gate: the folder is loaded
    at start (a broken one stops the daemon, named) and handed to every verification."""
    import shutil

    from cleanroom.coordinator.gate import AttestationGate
    from cleanroom.coordinator.run import FederatedRun, RunSpec, Stores
    from tests.attestation.test_tdx_collateral import REAL_DIR

    config = load_coordinator_config(fed / "coordinator" / "coordinator.toml")
    good = config.model_copy(update={"tdx_collateral": REAL_DIR})
    coordinator_preflight(good)
    broken = tmp_path / "collateral"
    shutil.copytree(REAL_DIR, broken)
    next(broken.glob("tcb_info*")).write_text("{not json")
    with pytest.raises(CollateralError, match=r"tcb_info\.json: not a JSON object"):
        coordinator_preflight(config.model_copy(update={"tdx_collateral": broken}))
    from cleanroom.attestation.validate.policy import load_policy
    from tests import fakes

    policy = load_policy(config.policy).model_copy(update={"tasks": [fakes.TASK.digest]})
    spec = RunSpec(label="1", out=tmp_path / "run", policy=policy, task=fakes.TASK,
                   plan=fakes.plan(), strategy="fedavg",
                   stores=Stores(tmp_path / "k", tmp_path / "n", tmp_path / "w", tmp_path / "c"),
                   tdx_collateral=REAL_DIR)
    gate: AttestationGate = FederatedRun(spec, []).gate
    assert gate.collateral is not None and gate.collateral.current().tcb_info is not None


def test_a_stopping_daemon_ignores_a_second_sigterm():
    """A second SIGTERM (a service manager, a test that signals twice) while the daemon
    stops its children must not end it half-way: they would be left running."""
    import os
    import signal

    from cleanroom.process import signals_ignored

    before = signal.getsignal(signal.SIGTERM)
    with signals_ignored():
        os.kill(os.getpid(), signal.SIGTERM)  # would end this process without the shield
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_marker_copied_from_another_daemons_folder_is_ignored(tmp_path):
    """A site folder cloned from a running site's carries that daemon's marker: the clone
    neither refuses to start nor stops the other daemon's children (its tag)."""
    import json
    import os
    import subprocess
    import sys

    from cleanroom.process import TAG_VAR, Supervisor

    env = {**os.environ, TAG_VAR: "the-other-daemons-tag"}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                            start_new_session=True)
    try:
        started = (Path("/proc") / str(live.pid) / "stat").read_text().rsplit(")", 1)[1] \
            .split()[19]
        original = tmp_path / "original" / "daemon.json"
        copy = tmp_path / "clone" / "daemon.json"
        copy.parent.mkdir()
        copy.write_text(json.dumps({"pid": live.pid, "started": started,
                                    "tag": "the-other-daemons-tag",
                                    "marker": str(original.resolve())}))
        sup = Supervisor(tmp_path / "logs")
        assert sup.take_over(copy, "the clone") == []
        assert live.poll() is None  # neither refused nor stopped
        assert json.loads(copy.read_text())["marker"] == str(copy.resolve())
        # the same marker in its own folder is the live daemon: refused
        original.parent.mkdir()
        original.write_text(json.dumps({"pid": live.pid, "started": started,
                                        "tag": "the-other-daemons-tag",
                                        "marker": str(original.resolve())}))
        with pytest.raises(DaemonError, match="already running"):
            Supervisor(tmp_path / "logs").take_over(original, "the original")
    finally:
        live.kill()
        live.wait()


def test_two_starts_at_the_same_instant_are_serialised(tmp_path):
    """Both starts read the marker before either writes (a 1 s pause after the read makes the
    race certain): one start takes the state folder, the other is refused."""
    import subprocess
    import sys

    marker = tmp_path / "state" / "daemon.json"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import cleanroom.process as p\n"
        "read = p._read_marker\n"
        "def slow(m, w):\n"
        "    out = read(m, w)\n"
        "    time.sleep(1.0)\n"
        "    return out\n"
        "p._read_marker = slow\n"
        "try:\n"
        "    p.Supervisor(Path(sys.argv[2])).take_over(Path(sys.argv[1]), 'the test daemon')\n"
        "except p.DaemonError as exc:\n"
        "    print('refused:', exc)\n"
        "    sys.exit(3)\n"
        "time.sleep(4)\n")
    starts = [subprocess.Popen([sys.executable, "-c", script, str(marker),
                                str(tmp_path / f"logs{i}")], stdout=subprocess.PIPE, text=True)
              for i in range(2)]
    codes = sorted(proc.wait(timeout=60) for proc in starts)
    assert codes == [0, 3], [proc.stdout.read() for proc in starts]  # type: ignore[union-attr]
