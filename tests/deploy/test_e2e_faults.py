"""Faults in a deployment, with real processes on loopback (issue 12 item 7): a site killed
in the middle of a round, a site that stops answering (partition), the coordinator killed
mid-run. Three sites, ``min_sites = 2`` and a short ``reply_timeout``: a round goes on with the
sites that answer, the silent one is quarantined with a reason, and it comes back later.

Its own federation (the 2-site one of the other e2e modules is left alone), shared by the
three tests in the order they are written: the coordinator kill comes last."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import CLI, Federation, _stop, flower_processes, wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults]

SITES3 = ("cleveland", "hungary", "switzerland")
REPLY_TIMEOUT = 12.0  # s; a healthy warm site answers each phase in a few seconds
# a silent site: the phase's timeout, or the SuperLink's error once it missed its heartbeats
TIMEOUT_REASON = re.compile(r"no (attestation|training) reply before the timeout"
                            r"|site error: .*Node Unavailable.*")


@dataclass
class Faulty:
    """The 3-site federation and the daemons it runs (restartable one by one)."""

    fed: Federation
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.fed.out / f"{name}.log"

    def start(self, name: str) -> None:
        """Start the daemon ``name`` ('coordinator' or a site) and wait for its API."""
        if name == "coordinator":
            args, port = ["coordinator", "--config", str(self.fed.config)], self.fed.api
        else:
            args, port = ["site", "--config", str(self.fed.site_config(name))], \
                self.fed.site_api[name]
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        wait_http(f"http://127.0.0.1:{port}/health", proc, self.log(name), 120)

    def tree(self, name: str) -> list[int]:
        return process_tree(self.procs[name].pid)

    def kill(self, name: str) -> list[int]:
        """kill -9 the daemon and every process it started (children run in their own
        sessions: a process group would not reach them)."""
        pids = self.tree(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)
        return pids

    def signal_tree(self, name: str, sig: int) -> list[int]:
        pids = self.tree(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def run_dir(self, run_id: str) -> Path:
        return self.fed.out / "coordinator" / "state" / "runs" / run_id

    def token(self, site: str) -> str:
        return (self.fed.out / "sites" / site / "operator.token").read_text().strip()

    def ledger(self, site: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.fed.site_api[site]}/ledger",
            headers={"Authorization": f"Bearer {self.token(site)}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def process_tree(root: int) -> list[int]:
    """``root``, its descendants, and every process carrying a supervisor tag one of them
    carries (Flower's SuperExec starts the ServerApp in a session of its own)."""
    from cleanroom.process import TAG_VAR, tagged_pids

    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                todo.append(child)
    tags = set()
    for pid in found:
        with contextlib.suppress(OSError):
            for item in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                if item.startswith(f"{TAG_VAR}=".encode()):
                    tags.add(item.split(b"=", 1)[1].decode())
    for tag in tags:
        found.update(tagged_pids(tag))
    return sorted(found)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    from cleanroom.coordinator.provision import ProvisionRequest, provision
    from cleanroom.process import free_port

    out = tmp_path_factory.mktemp("faults") / "fed"
    link, api, control = free_port(), free_port(), free_port()
    site_ports = {name: (free_port(), free_port()) for name in SITES3}
    provision(ProvisionRequest(out=out, sites=list(SITES3), superlink_port=link, api_port=api,
                               control_port=control, site_ports=site_ports,
                               site_torch_threads=1))
    config = out / "coordinator" / "coordinator.toml"
    config.write_text(config.read_text().replace(
        "[training]\n", f"[training]\nmin_sites = 2\nreply_timeout = {REPLY_TIMEOUT}\n"))
    fed = Faulty(Federation(out, link, control, api, {n: p[1] for n, p in site_ports.items()}))
    try:
        fed.start("coordinator")
        for name in SITES3:
            fed.start(name)
        yield fed
    finally:
        for name in SITES3:  # SIGTERM all sites at once (each takes seconds to stop)
            if name in fed.procs:
                fed.signal_tree(name, signal.SIGCONT)  # a test that failed mid-partition
                if fed.procs[name].poll() is None:
                    fed.procs[name].send_signal(signal.SIGTERM)
        for name in [*SITES3, "coordinator"]:
            if name in fed.procs:
                _stop(fed.procs[name])
    time.sleep(1)
    assert flower_processes(str(out)) == [], "processes left behind"


@contextlib.contextmanager
def submitted(fed: Faulty, out: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``cleanroom run`` in the background (killed if the test fails before it ends)."""
    proc = subprocess.Popen([*CLI, "run", "--config", str(fed.fed.config), "--out", str(out),
                             "--no-progress", "--timeout", "400", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def run_id_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("submitted run "), line + (proc.stderr.read() if proc.stderr else "")
    return line.split()[2]


def finish(proc: subprocess.Popen[str], timeout: float = 400) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def wait_rounds(fed: Faulty, run_id: str, count: int, timeout: float = 180) -> list[dict]:
    """The run's progress entries, once there are at least ``count``."""
    path = fed.run_dir(run_id) / "progress.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            entries = [json.loads(line) for line in path.read_text().splitlines()
                       if line.strip()]
            if len(entries) >= count:
                return entries
        time.sleep(0.1)
    raise AssertionError(f"run {run_id}: fewer than {count} rounds after {timeout:.0f}s")


def alive(pids: list[int], within: float) -> list[int]:
    """Those of ``pids`` still running (not zombies) after up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = []
        for pid in pids:
            with contextlib.suppress(OSError, IndexError):
                if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] \
                        != "Z":
                    left.append(pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def rejoined_after(report: dict, site: str, fault_round: int) -> list[int]:
    """Rounds after ``fault_round`` in which ``site`` was attested and aggregated."""
    return [r["round"] for r in report["rounds"]
            if r["round"] > fault_round and site in r["attested"] and site in r["aggregated"]]


def test_site_killed_mid_round_is_quarantined_and_rejoins(faulty, tmp_path):
    """kill -9 of a site's whole tree in round 2: the round completes with the two others,
    the dead site is quarantined there with a timeout reason; restarted (its sealed ledger
    reopens; the SuperLink lets its node in again once it missed its heartbeats), it is
    attested and aggregated again when the run goes on."""
    with submitted(faulty, tmp_path / "part1", "--rounds", "5", "--pause-after", "3") as run:
        run_id = run_id_of(run)
        wait_rounds(faulty, run_id, 1)
        killed = faulty.kill("cleveland")
        assert len(killed) >= 3  # daemon, SuperNode, executor
        assert alive(killed, within=10) == []
        faulty.start("cleveland")  # back once the SuperLink lets its node in again
        finish(run)
    part1 = json.loads((tmp_path / "part1" / "report.json").read_text())
    rounds = part1["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["attested"] == list(SITES3)
    hit = rounds[1]
    assert TIMEOUT_REASON.fullmatch(hit["quarantined"].get("cleveland", "")), hit
    assert sorted(hit["aggregated"]) == ["hungary", "switzerland"], hit
    assert all(set(r["quarantined"]) <= {"cleveland"} for r in rounds), rounds  # no 'node-1'
    second = subprocess.run([*CLI, "run", "--config", str(faulty.fed.config), "--resume",
                             run_id, "--out", str(tmp_path / "part2"), "--no-progress",
                             "--timeout", "400"], capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    report = json.loads((tmp_path / "part2" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    for entry in report["rounds"][3:]:
        assert entry["attested"] == list(SITES3) and entry["quarantined"] == {}, entry
        assert sorted(entry["aggregated"]) == list(SITES3), entry
    assert all(0 < e <= 1.0 + 1e-6 for e in report["final"]["epsilon"].values())
    ledger = {r["run_id"]: r for r in faulty.ledger("cleveland")["runs"]}[report["run_id"]]
    assert report["final"]["epsilon"]["cleveland"] == pytest.approx(ledger["epsilon"], rel=1e-6)


def test_partitioned_site_times_out_and_rejoins(faulty, tmp_path):
    """SIGSTOP of a site's whole tree past the reply timeout: quarantined in that round with
    a timeout reason, the round completes with the two others; after SIGCONT it rejoins."""
    with submitted(faulty, tmp_path / "out", "--rounds", "4") as run:
        run_id = run_id_of(run)
        wait_rounds(faulty, run_id, 1)
        faulty.signal_tree("hungary", signal.SIGSTOP)
        try:
            entries = wait_rounds(faulty, run_id, 2)
        finally:
            faulty.signal_tree("hungary", signal.SIGCONT)
        hit = entries[1]
        assert TIMEOUT_REASON.fullmatch(hit["quarantined"].get("hungary", "")), hit
        finish(run)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert sorted(rounds[1]["aggregated"]) == ["cleveland", "switzerland"], rounds[1]
    assert rejoined_after(report, "hungary", 2), rounds
    assert all(0 < e <= 1.0 + 1e-6 for e in report["final"]["epsilon"].values())


def test_coordinator_killed_mid_run_resumes(faulty, tmp_path):
    """kill -9 of the coordinator's whole tree after round 1's receipt: restarted, the run
    resumes from its checkpoint with its run id; the audit chain verifies and no site is
    charged twice for a round (each site's epsilon in the report is its ledger's)."""
    with submitted(faulty, tmp_path / "part1", "--rounds", "4") as run:
        run_id = run_id_of(run)
        wait_rounds(faulty, run_id, 1)
        killed = faulty.kill("coordinator")
        assert alive(killed, within=10) == []
        run.terminate()  # the follower; it would only report the lost coordinator
    faulty.start("coordinator")
    second = subprocess.run([*CLI, "run", "--config", str(faulty.fed.config), "--resume",
                             run_id, "--out", str(tmp_path / "part2"), "--no-progress",
                             "--timeout", "400"], capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    report = json.loads((tmp_path / "part2" / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["attested"] == list(SITES3)
    # a SuperNode still in its reconnect back-off may miss the first resumed round (the
    # restarted SuperLink's database still has it online): it is back by the last one
    assert all(TIMEOUT_REASON.fullmatch(r) for e in rounds[1:] for r in e["quarantined"].values())
    assert rounds[-1]["attested"] == list(SITES3), rounds[-1]
    assert sorted(rounds[-1]["aggregated"]) == list(SITES3), rounds[-1]
    assert report["resumed_from_run"] == run_id
    verify = subprocess.run([*CLI, "audit", "verify", str(tmp_path / "part2" / "audit.jsonl"),
                             "--key", str(faulty.fed.out / "coordinator" /
                                          "audit_public_key.hex")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for site in SITES3:
        ledger = {r["run_id"]: r for r in faulty.ledger(site)["runs"]}[report["run_id"]]
        # a round lost in the crash is charged once (refused as round-replayed if released)
        assert ledger["rounds"] <= 4 and ledger["reserved"] == 0, (site, ledger)
        trained = sum(site in r["aggregated"] or "round-replayed" in
                      r["site_refusals"].get(site, "") for r in rounds)
        assert ledger["committed"] == trained, (site, ledger, rounds)
        assert report["final"]["epsilon"][site] == pytest.approx(ledger["epsilon"], rel=1e-6)
        assert 0 < ledger["epsilon"] <= 1.0 + 1e-6
