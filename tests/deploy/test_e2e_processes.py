"""Real processes on loopback: a whole local federation, and the refusals a hospital would
hit (unregistered node key, certificate from another CA, plaintext to the TLS port)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cleanroom.pki import generate_node_key, make_ca
from tests.deploy.conftest import CLI, clone_site, flower_processes, impostor_online

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


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


def run_site(config: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "site", "--config", str(config)], capture_output=True,
                          text=True, timeout=timeout)


def test_unregistered_node_key_refused(coordinator):
    stranger = clone_site(coordinator, "hungary", "stranger")
    for name in ("node_auth.key", "node_auth.pub", "node_auth.spki.pem"):
        (stranger / name).unlink()
    generate_node_key(stranger)  # a key the coordinator never registered
    proc = run_site(stranger / "site.toml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not know this site's node key" in proc.stderr


def test_certificate_from_another_ca_refused(coordinator):
    other = clone_site(coordinator, "cleveland", "other-ca")
    from cleanroom.pki import cert_pem

    _, foreign = make_ca("Some other CA")
    (other / "ca.pem").write_bytes(cert_pem(foreign))
    proc = run_site(other / "site.toml")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not chain to flower.root_certificates" in proc.stderr


def test_plaintext_connection_to_tls_port_refused(coordinator):
    link = coordinator.link
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{link}/health", timeout=5)
    # and TLS with the consortium CA works
    from cleanroom.process import https_health

    assert https_health(f"https://127.0.0.1:{link}/health", coordinator.ca) == 200


def test_pause_and_resume_a_deployed_run(sites, tmp_path):
    """An operator pauses a 2-round run after round 1 and resumes it: the second part keeps the
    run id the sites know (their ledgers go on charging the same run) and the global model.

    All along, a second key registered under the name 'cleveland' is online (node
    impersonation, FINDINGS Q4): the coordinator maps nodes by registered key, so the impostor
    is never asked anything and the real cleveland stays attested in every round."""
    with impostor_online(sites, tmp_path) as impostor:
        _pause_and_resume(sites, tmp_path)
        assert "Receiving" not in impostor.log_tail("impostor", 400)  # never sent a message


def _pause_and_resume(sites, tmp_path):
    config = str(sites.config)
    first = subprocess.run([*CLI, "run", "--config", config, "--rounds", "2",
                            "--pause-after", "1", "--out", str(tmp_path / "part1"),
                            "--no-progress", "--timeout", "300"],
                           capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "paused after round 1 of 2" in first.stdout
    paused_id = first.stdout.split("submitted run ")[1].split()[0]
    part1 = json.loads((tmp_path / "part1" / "report.json").read_text())
    assert [r["round"] for r in part1["rounds"]] == [1]
    assert part1["rounds"][0]["attested"] == ["cleveland", "hungary"]
    assert part1["rounds"][0]["quarantined"] == {}

    second = subprocess.run([*CLI, "run", "--config", config, "--resume", paused_id,
                             "--out", str(tmp_path / "part2"), "--no-progress",
                             "--timeout", "300"],
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    part2 = json.loads((tmp_path / "part2" / "report.json").read_text())
    assert [r["round"] for r in part2["rounds"]] == [1, 2]
    assert part2["run_id"] == part1["run_id"]  # the protocol run id the sites saw
    assert part2["rounds"][1]["attested"] == ["cleveland", "hungary"]
    assert part2["rounds"][1]["quarantined"] == {}
    assert all(0.5 < e <= 1.0 + 1e-6 for e in part2["final"]["epsilon"].values())
    kinds = [json.loads(line)["kind"] for line in
             (tmp_path / "part2" / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["run-resume", "round-receipt", "run-end"]
