"""Governance end to end: budgets across simulations (--state), approvals, site policy,
model card and registry, audit chain of a real run."""

from __future__ import annotations

import json

import pytest

from cleanroom.simulations import engine
from cleanroom.simulations.engine import SimulationConfig, run_simulation
from cleanroom.site_agent.approvals import ApprovalRequest
from cleanroom.site_agent.config import SitePolicyConfig

pytestmark = pytest.mark.slow
FAST = {"rounds": 2, "tracking": False, "progress": False}


def simulate(out, **kw):
    return run_simulation(SimulationConfig(out=out, **{**FAST, **kw})).report


def with_site_policy(monkeypatch, **policy):
    """The simulated sites' policy with ``policy`` on top (their approved task stays)."""
    original = engine._site_configs

    def patched(*args, **kwargs):
        return [c.model_copy(update={"policy": SitePolicyConfig(**{
            **c.policy.model_dump(), **policy})}) for c in original(*args, **kwargs)]

    monkeypatch.setattr(engine, "_site_configs", patched)


def test_second_simulation_on_same_state_refused_once_budget_spent(tmp_path):
    state = tmp_path / "state"
    first = simulate(tmp_path / "a", state_dir=state, site_budget=1.2)
    assert all(not r["quarantined"] for r in first["rounds"])
    second = simulate(tmp_path / "b", state_dir=state, site_budget=1.2)
    for entry in second["rounds"]:
        assert set(entry["quarantined"]) == {"cleveland", "hungary", "switzerland", "va"}
        assert all("privacy budget" in reason and "lifetime epsilon" in reason
                   for reason in entry["quarantined"].values())


def test_restored_old_ledger_refused_as_rollback(tmp_path):
    """A site host that restores an older copy of its sealed ledger (to refund spent budget)
    is caught: its enclave binds the ledger's size into the evidence and the coordinator
    remembers how far that ledger had got."""
    state = tmp_path / "state"
    ledger = state / "sites" / "hungary" / "privacy_ledger.jsonl"
    head = ledger.with_name(ledger.name + ".head")  # the ledger's sealed head record
    simulate(tmp_path / "a", state_dir=state, rounds=1)
    backup = ledger.read_bytes(), head.read_bytes()
    simulate(tmp_path / "b", state_dir=state, rounds=1)  # spends more, watermark advances
    marks = json.loads((state / "coordinator" / "ledger_watermarks.json").read_text())
    assert marks["hungary"]["records"] == len(ledger.read_bytes().splitlines())
    ledger.write_bytes(backup[0])  # the rollback: the whole sealed state from a snapshot
    head.write_bytes(backup[1])
    third = simulate(tmp_path / "c", state_dir=state)
    for entry in third["rounds"]:
        assert set(entry["quarantined"]) == {"hungary"}
        assert entry["quarantined"]["hungary"].startswith("privacy ledger rollback")
        assert entry["attested"] == ["cleveland", "switzerland", "va"]


def test_forked_ledger_grown_past_the_watermark_is_refused(tmp_path):
    """The harder rollback: restore an old ledger, spend with another coordinator until it is
    longer than this coordinator's count, come back. The count passes; the anchor does not
    (the site must show its ledger still passes through the state attested earlier)."""
    state = tmp_path / "state"
    ledger = state / "sites" / "hungary" / "privacy_ledger.jsonl"
    head = ledger.with_name(ledger.name + ".head")
    marks = state / "coordinator" / "ledger_watermarks.json"
    simulate(tmp_path / "a", state_dir=state, rounds=1)
    backup = ledger.read_bytes(), head.read_bytes()
    simulate(tmp_path / "b", state_dir=state, rounds=2)  # attested anchor beyond the backup
    seen = marks.read_bytes()
    ledger.write_bytes(backup[0])  # the whole sealed state from a snapshot
    head.write_bytes(backup[1])
    marks.unlink()  # "another coordinator" that never saw this ledger
    simulate(tmp_path / "c", state_dir=state, rounds=3)
    assert len(ledger.read_bytes().splitlines()) > json.loads(seen)["hungary"]["records"]
    marks.write_bytes(seen)  # back to the first coordinator
    report = simulate(tmp_path / "d", state_dir=state, rounds=1)
    reason = report["rounds"][0]["quarantined"]["hungary"]
    assert reason.startswith("privacy ledger rollback") and "does not pass through" in reason
    assert report["rounds"][0]["attested"] == ["cleveland", "switzerland", "va"]


def test_coordinator_replaying_a_run_is_refused(tmp_path, monkeypatch):
    """A coordinator that runs the same run id again asks every site for rounds whose updates
    were already released: each site refuses (one charge must buy one noisy answer)."""
    monkeypatch.setattr(engine.secrets, "randbits", lambda _bits: 4242)
    state = tmp_path / "state"
    first = simulate(tmp_path / "a", state_dir=state)
    assert all(not r["quarantined"] for r in first["rounds"])
    second = simulate(tmp_path / "b", state_dir=state)
    for entry in second["rounds"]:
        assert entry["attested"] == []
        assert all(reason.startswith("round replayed: run 4242 round")
                   for reason in entry["quarantined"].values()), entry["quarantined"]


def test_unapproved_run_refused_until_approved(tmp_path, monkeypatch):
    """Sites requiring approval refuse a new run (typed reason naming the run); once hospital IT
    approves it (here after round 1, at two sites), those sites train in the next rounds."""
    from cleanroom.site_agent.runtime import build_runtime

    with_site_policy(monkeypatch, require_approval=True)
    out = tmp_path / "a"
    config = SimulationConfig(out=out, **{**FAST, "rounds": 3})

    def approve_after_round_one(entry):
        if entry["round"] != 1:
            return
        run_id = next(iter(entry["quarantined"].values())).split()[3]
        task = engine.load_simulation_task("heart-disease")
        sites = engine._site_configs(config, engine.site_names(config, task), task,
                                     out / "state", out / "state" / "simulated-root", None)
        for site in sites[:2]:
            build_runtime(site).approvals.approve(ApprovalRequest(
                run_id=run_id, task_digest=task.digest, epsilon=1.0), by="test")

    report = run_simulation(config, on_round=approve_after_round_one).report
    first = report["rounds"][0]["quarantined"]
    assert len(first) == 4 and all(
        r.startswith(f"approval required: run {report['run_id']} is not approved")
        for r in first.values())
    for entry in report["rounds"][1:]:
        assert entry["attested"] == ["cleveland", "hungary"]
        assert set(entry["quarantined"]) == {"switzerland", "va"}


def test_policy_forbidden_model_refused(tmp_path, monkeypatch):
    with_site_policy(monkeypatch, models=["00" * 32])
    report = simulate(tmp_path / "a")
    reasons = report["rounds"][0]["quarantined"]
    assert len(reasons) == 4
    assert all(r.startswith("model not allowed: the model of task heart-disease")
               for r in reasons.values())


def test_coordinator_not_in_site_policy_refused(tmp_path, monkeypatch):
    with_site_policy(monkeypatch, coordinators=["some-other-consortium"])
    reasons = simulate(tmp_path / "a")["rounds"][0]["quarantined"]
    assert all(r.startswith("coordinator not allowed") for r in reasons.values())


def test_model_card_registry_and_audit_of_a_tracked_run(tmp_path):
    from cleanroom.coordinator.audit import read_entries, verify_chain

    out = tmp_path / "run"
    report = run_simulation(SimulationConfig(out=out, **{**FAST, "tracking": True})).report
    card = json.loads((out / "model_card.json").read_text())
    assert set(card["sites"]) == {"cleveland", "hungary", "switzerland", "va"}
    assert card["sites"]["cleveland"] == {"train": 199, "test": 104}
    assert card["differential_privacy"]["enabled"] is True
    assert all(0 < e <= 1.0 + 1e-6 for e in card["differential_privacy"]["epsilon_spent"].values())
    text = (out / "model_card.md").read_text()
    for heading in ("## Purpose", "## Sites", "## Differential privacy", "## Attestation",
                    "## Metrics", "## Known limits"):
        assert heading in text
    chain = verify_chain(out / "audit.jsonl")
    assert chain.ok and chain.head == report["audit_head"]
    kinds = [e["kind"] for e in read_entries(out / "audit.jsonl")]
    assert kinds == ["run-start", "round-receipt", "round-receipt", "run-end"]
    import mlflow

    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    run = mlflow.get_run(report["mlflow"]["run_id"])
    assert run.data.tags["audit_head"] == report["audit_head"]
    assert "accuracy_mean" in run.data.metrics and "epsilon.cleveland" in run.data.metrics
    assert run.data.params["strategy"] == "fedadam"
    versions = mlflow.MlflowClient().search_model_versions(
        "name='cleanroom-heart-disease'")
    assert versions and versions[0].run_id == report["mlflow"]["run_id"]


def test_a_site_stripping_its_own_ledger_refuses_to_train(tmp_path):
    """The cheap refund: cut the last records off the ledger (no snapshot needed). The site's
    sealed head record names more records than are left: the ledger refuses to open, so the
    site trains nothing and the coordinator quarantines it with the reason."""
    state = tmp_path / "state"
    ledger = state / "sites" / "va" / "privacy_ledger.jsonl"
    simulate(tmp_path / "a", state_dir=state, rounds=1)
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:-1]))
    report = simulate(tmp_path / "b", state_dir=state, rounds=1)
    reason = report["rounds"][0]["quarantined"]["va"]
    assert "acknowledged records were removed" in reason and "rollback" in reason
    assert report["rounds"][0]["attested"] == ["cleveland", "hungary", "switzerland"]
