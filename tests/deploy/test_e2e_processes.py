"""Real processes on loopback: a whole local federation, and the refusals a hospital would
hit (unregistered node key, certificate from another CA, plaintext to the TLS port)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.pki import generate_node_key, make_ca
from cleanroom.process import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CLI = [sys.executable, "-m", "cleanroom"]


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


def test_deploy_local_two_sites_one_round(tmp_path):
    out = tmp_path / "federation"
    proc = subprocess.run([*CLI, "deploy-local", "--sites", "2", "--rounds", "1", "--out",
                           str(out), "--no-progress"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["rounds"][0]["attested"] == ["cleveland", "hungary"]
    assert report["rounds"][0]["quarantined"] == {}
    assert report["final"]["accuracy_mean"] > 0.5
    assert all(0 < e <= 1.0 + 1e-6 for e in report["final"]["epsilon"].values())
    assert (out / "audit.jsonl").exists() and (out / "model_card.md").exists()
    assert "stopped every process" in proc.stdout
    time.sleep(1)
    assert flower_processes(str(out)) == [], "processes left behind"
    # the node identity was bound: each site's evidence named its registered node key
    verify = subprocess.run([*CLI, "audit", "verify", str(out / "audit.jsonl"), "--key",
                             str(out / "coordinator" / "audit_public_key.hex")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "fed"
    link, api = free_port(), free_port()
    provision(ProvisionRequest(out=out, sites=["cleveland", "hungary"], superlink_port=link,
                               api_port=api, site_ports={
                                   "cleveland": (free_port(), free_port()),
                                   "hungary": (free_port(), free_port())}))
    log = open(out / "coordinator.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([*CLI, "coordinator", "--config",
                             str(out / "coordinator" / "coordinator.toml")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, (out / "coordinator.log").read_text()[-2000:]
    yield out, link
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()
    time.sleep(1)
    assert flower_processes(str(out)) == [], "coordinator left processes behind"


def run_site(config: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "site", "--config", str(config)], capture_output=True,
                          text=True, timeout=timeout)


def test_unregistered_node_key_refused(coordinator):
    out, _ = coordinator
    site = out / "sites" / "hungary"
    stranger = out / "sites" / "stranger"
    shutil.copytree(site, stranger)
    for name in ("node_auth.key", "node_auth.pub", "node_auth.spki.pem"):
        (stranger / name).unlink()
    generate_node_key(stranger)  # a key the coordinator never registered
    proc = run_site(stranger / "site.toml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not know this site's node key" in proc.stderr


def test_certificate_from_another_ca_refused(coordinator):
    out, _ = coordinator
    site = out / "sites" / "cleveland"
    other = out / "sites" / "other-ca"
    shutil.copytree(site, other)
    from cleanroom.pki import cert_pem

    _, foreign = make_ca("Some other CA")
    (other / "ca.pem").write_bytes(cert_pem(foreign))
    proc = run_site(other / "site.toml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not chain to flower.root_certificates" in proc.stderr


def test_plaintext_connection_to_tls_port_refused(coordinator):
    _, link = coordinator
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{link}/health", timeout=5)
    # and TLS with the consortium CA works
    from cleanroom.process import https_health

    assert https_health(f"https://127.0.0.1:{link}/health",
                        coordinator[0] / "coordinator" / "ca.pem") == 200


def test_pause_and_resume_a_deployed_run(coordinator, tmp_path):
    """An operator pauses a 2-round run after round 1 and resumes it: the second part keeps the
    run id the sites know (their ledgers go on charging the same run) and the global model."""
    out, _ = coordinator
    config = str(out / "coordinator" / "coordinator.toml")
    sites = []
    for name in ("cleveland", "hungary"):
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        sites.append((subprocess.Popen(
            [*CLI, "site", "--config", str(out / "sites" / name / "site.toml")],
            stdout=log, stderr=subprocess.STDOUT), log))
    try:
        first = subprocess.run([*CLI, "run", "--config", config, "--rounds", "2",
                                "--pause-after", "1", "--out", str(tmp_path / "part1"),
                                "--no-progress", "--timeout", "300"],
                               capture_output=True, text=True, timeout=400)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert "paused after round 1 of 2" in first.stdout
        paused_id = first.stdout.split("submitted run ")[1].split()[0]
        part1 = json.loads((tmp_path / "part1" / "report.json").read_text())
        assert [r["round"] for r in part1["rounds"]] == [1]

        second = subprocess.run([*CLI, "run", "--config", config, "--resume", paused_id,
                                 "--out", str(tmp_path / "part2"), "--no-progress",
                                 "--timeout", "300"],
                                capture_output=True, text=True, timeout=400)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        part2 = json.loads((tmp_path / "part2" / "report.json").read_text())
        assert [r["round"] for r in part2["rounds"]] == [1, 2]
        assert part2["run_id"] == part1["run_id"]  # the protocol run id the sites saw
        assert part2["rounds"][1]["attested"] == ["cleveland", "hungary"]
        assert all(0.5 < e <= 1.0 + 1e-6 for e in part2["final"]["epsilon"].values())
        kinds = [json.loads(line)["kind"] for line in
                 (tmp_path / "part2" / "audit.jsonl").read_text().splitlines()]
        assert kinds == ["run-resume", "round-receipt", "run-end"]
    finally:
        for proc, log in sites:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            log.close()
