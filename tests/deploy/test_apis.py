"""The coordinator and site HTTP APIs: roles, read-only auditors, clear errors."""

from __future__ import annotations

import json

import pytest

from cleanroom.coordinator.api import build_coordinator_api
from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.http import add_token, load_tokens


class FakeControl:
    def __init__(self) -> None:
        self.submitted: list[dict] = []
        self.stopped: list[int] = []

    def list_nodes(self):
        return [{"node-id": "17", "status": "online"}]

    def superlink_up(self):
        return True

    def submit(self, options):
        self.submitted.append(options)
        return 42

    def stop(self, run_id):
        self.stopped.append(run_id)


@pytest.fixture()
def fed(tmp_path):
    out = tmp_path / "fed"
    provision(ProvisionRequest(out=out, sites=["cleveland", "hungary"]))
    return out


def token(path) -> str:
    return path.read_text().strip()


async def test_coordinator_api_roles(aiohttp_client, fed):
    config = load_coordinator_config(fed / "coordinator" / "coordinator.toml")
    run = config.runs_dir() / "7"
    run.mkdir(parents=True)
    (run / "progress.jsonl").write_text(json.dumps({
        "round": 1, "attested": ["cleveland"], "quarantined": {"hungary": "attestation: x"},
        "accuracy_mean": 0.7, "sites": {"cleveland": {"admitted": True, "reason": "attested"},
                                        "hungary": {"admitted": False,
                                                    "reason": "attestation: x"}}}) + "\n")
    (config.state_dir / "nodes.json").write_text('{"cleveland": 17}')
    control = FakeControl()
    client = await aiohttp_client(build_coordinator_api(config, control,
                                                        load_tokens(config.api.tokens)))
    operator = {"Authorization": f"Bearer {token(fed / 'coordinator' / 'operator.token')}"}
    auditor = {"Authorization": f"Bearer {token(fed / 'coordinator' / 'auditor.token')}"}

    assert (await client.get("/health")).status == 200
    assert (await client.get("/runs")).status == 401
    assert (await client.get("/runs", headers={"Authorization": "Bearer wrong"})).status == 401
    runs = await (await client.get("/runs", headers=auditor)).json()
    assert runs["runs"][0]["run_id"] == "7" and runs["runs"][0]["status"] == "running"
    rounds = await (await client.get("/runs/7/rounds", headers=auditor)).json()
    assert rounds["rounds"][0]["quarantined"] == {"hungary": "attestation: x"}
    sites = await (await client.get("/sites", headers=auditor)).json()
    by_site = {s["site"]: s for s in sites["sites"]}
    assert by_site["cleveland"]["status"] == "online" and by_site["cleveland"]["node_id"] == 17
    assert by_site["hungary"]["latest_attestation"]["reason"] == "attestation: x"
    assert (await client.get("/runs/999", headers=auditor)).status == 404
    # auditors are read-only
    forbidden = await client.post("/runs", headers=auditor, json={"rounds": 2})
    assert forbidden.status == 403 and "read-only" in (await forbidden.json())["error"]
    assert (await client.post("/runs/7/stop", headers=auditor)).status == 403
    accepted = await client.post("/runs", headers=operator, json={"rounds": 2, "dp": True})
    assert accepted.status == 202 and (await accepted.json())["run_id"] == 42
    assert control.submitted == [{"rounds": 2, "dp": True}]
    bad = await client.post("/runs", headers=operator, json={"rounds": "many"})
    assert bad.status == 400 and "rounds" in (await bad.json())["error"]
    bad = await client.post("/runs", headers=operator, json={"evil": 1})
    assert bad.status == 400 and "evil" in (await bad.json())["error"]
    for wrong in ({"dp": "yes"}, {"rounds": 2.0}, {"epsilon": "1"}, {"rounds": 0},
                  {"resume_run": "../x"}):
        bad = await client.post("/runs", headers=operator, json=wrong)
        assert bad.status == 400, wrong
    bad = await client.post("/runs", headers=operator, data="not json")
    assert bad.status == 400
    assert (await client.post("/runs/7/stop", headers=operator)).status == 200
    assert control.stopped == [7]


async def test_site_api(aiohttp_client, fed):
    from cleanroom.site_agent.api import build_site_api
    from cleanroom.site_agent.config import load_site_config
    from cleanroom.site_agent.runtime import build_runtime

    config = load_site_config(fed / "sites" / "cleveland" / "site.toml")
    runtime = build_runtime(config)
    auditor_token = add_token(config.api.tokens, "auditor")
    client = await aiohttp_client(build_site_api(runtime, load_tokens(config.api.tokens)))
    operator = {"Authorization": f"Bearer {token(fed / 'sites' / 'cleveland' / 'operator.token')}"}
    auditor = {"Authorization": f"Bearer {auditor_token}"}
    assert (await (await client.get("/health")).json())["site"] == "cleveland"
    assert (await client.get("/status")).status == 401
    status = await (await client.get("/status", headers=auditor)).json()
    assert status["provider"] == "simulated" and len(status["measurement"]) == 96
    assert status["budget"]["remaining_epsilon"] == status["budget"]["lifetime_epsilon"]
    policy = await (await client.get("/policy", headers=auditor)).json()
    assert policy["privacy"]["max_epsilon_per_run"] == 1.0
    good = {"run_id": "5", "task_digest": "ab" * 32, "epsilon": 0.5}
    assert (await client.post("/approvals", headers=auditor, json=good)).status == 403
    created = await client.post("/approvals", headers=operator, json=good)
    assert created.status == 201
    assert runtime.approvals.for_run("5").task_digest == "ab" * 32
    listed = await (await client.get("/approvals", headers=auditor)).json()
    assert listed["approved_runs"] == ["5"] and listed["approvals"][0]["epsilon"] == 0.5
    assert (await client.delete("/approvals/5", headers=operator)).status == 200
    assert runtime.approvals.for_run("5") is None
    for bad in ({}, {**good, "run_id": None}, {**good, "run_id": ["a", "b"]},
                {**good, "run_id": 5}, {**good, "epsilon": "1"}, {**good, "epsilon": -1},
                {**good, "task_digest": "xyz"}, {**good, "extra": 1}, [good], "text"):
        refused = await client.post("/approvals", headers=operator, json=bad)
        assert refused.status == 400, bad
        assert "error" in await refused.json()
    assert runtime.approvals.current() == {}  # nothing stored for any of them
