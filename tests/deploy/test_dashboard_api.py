"""The dashboards' server side: pages and assets, browser security headers on every answer,
cross-origin writes refused, and the read-only endpoints the pages use (receipts, last seen,
ledger, activity). The pages themselves run in tests/browser."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cleanroom.coordinator.api import build_coordinator_api
from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.dashboard import load_assets
from cleanroom.http import CONTENT_SECURITY_POLICY, add_token, load_tokens

from .test_apis import FakeControl, token

STATIC = Path(__file__).resolve().parents[2] / "cleanroom" / "dashboard" / "static"


@pytest.fixture()
def fed(tmp_path):
    out = tmp_path / "fed"
    provision(ProvisionRequest(out=out, sites=["cleveland", "hungary"]))
    return out


@pytest.fixture()
def coordinator(fed):
    config = load_coordinator_config(fed / "coordinator" / "coordinator.toml")
    control = FakeControl()
    app = build_coordinator_api(config, control, load_tokens(config.api.tokens))
    return config, control, app


@pytest.fixture()
def site(fed):
    from cleanroom.site_agent.api import build_site_api
    from cleanroom.site_agent.config import load_site_config
    from cleanroom.site_agent.runtime import build_runtime

    config = load_site_config(fed / "sites" / "hungary" / "site.toml")
    runtime = build_runtime(config)
    auditor = add_token(config.api.tokens, "auditor")
    return runtime, auditor, build_site_api(runtime, load_tokens(config.api.tokens))


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def check_security_headers(response) -> None:
    headers = response.headers
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"


def test_policy_is_strict():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["form-action"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY and "*" not in CONTENT_SECURITY_POLICY


def test_pages_hold_no_inline_script_style_or_remote_asset():
    assets = load_assets()
    assert {"coordinator.html", "site.html", "common.js", "charts.js", "coordinator.js",
            "site.js", "dashboard.css"} <= set(assets)
    for name in ("coordinator.html", "site.html"):
        html = assets[name][0].decode()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), name  # no inline script
        assert not re.search(r"\son[a-z]+\s*=", html), name  # no inline handler
        assert not re.search(r"\sstyle\s*=|<style", html), name  # no inline style
        for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
            assert ref.startswith("/static/") or ref == "data:,", (name, ref)
            if ref.startswith("/static/"):
                assert ref.removeprefix("/static/") in assets, (name, ref)
    for name, (body, _) in assets.items():
        text = body.decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and \
            "https://" not in text, f"{name} names a remote address"
        if name.endswith(".js"):
            assert "innerHTML" not in text and "eval(" not in text, name
            assert "setAttribute(\"style" not in text, name


def test_scripts_parse():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the browser tests load the scripts anyway)")
    import subprocess

    for path in sorted(STATIC.glob("*.js")):
        done = subprocess.run([node, "--check", str(path)], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr


async def test_dashboard_pages_and_headers(aiohttp_client, coordinator, site, fed):
    _, _, coord_app = coordinator
    _, _, site_app = site
    tokens = [token(fed / "coordinator" / "operator.token"),
              token(fed / "coordinator" / "auditor.token"),
              token(fed / "sites" / "hungary" / "operator.token")]
    for app, title in ((coord_app, "consortium"), (site_app, "site")):
        client = await aiohttp_client(app)
        page = await client.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        body = await page.text()
        assert f"Cleanroom FL · {title}" in body
        assert not any(t in body for t in tokens)
        check_security_headers(page)
        script = await client.get("/static/common.js")
        assert script.status == 200 and script.content_type == "text/javascript"
        check_security_headers(script)
        # errors carry them too; no token: nothing but the page, its assets and /health
        for path in ("/runs", "/status", "/whoami", "/nowhere"):
            answer = await client.get(path)
            assert answer.status in (401, 404), path
            check_security_headers(answer)
        # assets come from a fixed list: no page under /static, no path from the request
        for path in ("/static/coordinator.html", "/static/..%2Fapi_tokens.json",
                     "/static/%2e%2e%2f%2e%2e%2fpyproject.toml", "/static/nothing.js",
                     "/static/", "/static/../http.py"):
            assert (await client.get(path)).status == 404, path


async def test_whoami(aiohttp_client, coordinator, site, fed):
    _, _, app = coordinator
    client = await aiohttp_client(app)
    operator = token(fed / "coordinator" / "operator.token")
    auditor = token(fed / "coordinator" / "auditor.token")
    assert (await (await client.get("/whoami", headers=bearer(operator))).json()) == \
        {"role": "operator"}
    assert (await (await client.get("/whoami", headers=bearer(auditor))).json()) == \
        {"role": "auditor"}
    assert (await client.get("/whoami")).status == 401
    assert (await client.get("/whoami", headers=bearer("x" * 43))).status == 401
    # a token in the address is no token
    assert (await client.get(f"/whoami?token={operator}")).status == 401


CROSS = ({"Origin": "http://evil.example"}, {"Origin": "null"},
         {"Origin": "http://127.0.0.1:1"}, {"Origin": "file://"},
         {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
         {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"})


async def test_cross_origin_writes_refused_at_the_coordinator(aiohttp_client, coordinator, fed):
    _, control, app = coordinator
    client = await aiohttp_client(app)
    operator = bearer(token(fed / "coordinator" / "operator.token"))
    own = f"http://{client.server.host}:{client.server.port}"
    for headers in CROSS:
        refused = await client.post("/runs", json={"rounds": 2}, headers={**operator, **headers})
        assert refused.status == 403, headers
        assert "cross-origin" in (await refused.json())["error"]
        check_security_headers(refused)
        assert (await client.post("/runs/7/stop", headers={**operator, **headers})).status == 403
    assert control.submitted == [] and control.stopped == []
    # reads from anywhere need a token only (the browser keeps another origin from reading)
    assert (await client.get("/runs", headers={**operator, **CROSS[0]})).status == 200
    # the page's own writes, and clients that are not browsers, pass
    same = {"Origin": own, "Sec-Fetch-Site": "same-origin"}
    accepted = await client.post("/runs", json={"rounds": 2}, headers={**operator, **same})
    assert accepted.status == 202
    assert (await client.post("/runs", json={"rounds": 3}, headers=operator)).status == 202
    assert control.submitted == [{"rounds": 2}, {"rounds": 3}]


async def test_cross_origin_writes_refused_at_a_site(aiohttp_client, site, fed):
    runtime, _, app = site
    client = await aiohttp_client(app)
    operator = bearer(token(fed / "sites" / "hungary" / "operator.token"))
    good = {"run_id": "5", "task_digest": "ab" * 32, "epsilon": 0.5}
    for headers in CROSS:
        refused = await client.post("/approvals", json=good, headers={**operator, **headers})
        assert refused.status == 403, headers
    assert runtime.approvals.current() == {}
    own = f"http://{client.server.host}:{client.server.port}"
    created = await client.post("/approvals", json=good, headers={
        **operator, "Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert created.status == 201
    for headers in CROSS:
        refused = await client.delete("/approvals/5", headers={**operator, **headers})
        assert refused.status == 403, headers
    assert runtime.approvals.for_run("5") is not None  # still approved
    assert (await client.delete("/approvals/5", headers=operator)).status == 200
    assert runtime.approvals.for_run("5") is None


def write_run(config, run_id: str, rounds: list[dict]) -> Path:
    """A run folder as the ServerApp leaves it: progress and a signed audit chain."""
    from cleanroom.coordinator.audit import AuditLog, load_signing_key

    run = config.runs_dir() / run_id
    run.mkdir(parents=True)
    log = AuditLog(run / "audit.jsonl", load_signing_key(config.audit_key))
    log.append("run-start", {"run_id": run_id, "plan": {"rounds": 3},
                             "coordinator_public_key": "00" * 32})
    with open(run / "progress.jsonl", "a") as fh:
        for entry in rounds:
            fh.write(json.dumps(entry) + "\n")
            log.append("round-receipt", {"run_id": run_id, "round": entry["round"],
                                         "attested": entry["attested"],
                                         "quarantined": entry["quarantined"],
                                         "sites": entry["sites"]})
    return run


def round_entry(number: int, hungary_refusal: str | None) -> dict:
    hungary = {"admitted": False, "reason": f"{hungary_refusal.replace('-', ' ')}: run 7",
               "refusal": hungary_refusal} if hungary_refusal else \
        {"admitted": True, "reason": "attested", "measurement": "ab" * 48,
         "tcb": {"bootloader": 4, "snp": 22}}
    return {"round": number, "attested": ["cleveland"] + ([] if hungary_refusal else ["hungary"]),
            "quarantined": {"hungary": hungary["reason"]} if hungary_refusal else {},
            "accuracy_mean": 0.7,
            "sites": {"cleveland": {"admitted": True, "reason": "attested",
                                    "measurement": "cd" * 48,
                                    "tcb": {"bootloader": 4, "snp": 22}},
                      "hungary": hungary}}


async def test_receipts_and_sites(aiohttp_client, coordinator, fed):
    config, _, app = coordinator
    run = write_run(config, "7", [round_entry(1, "approval-required")])
    client = await aiohttp_client(app)
    auditor = bearer(token(fed / "coordinator" / "auditor.token"))
    listed = await (await client.get("/runs/7/receipts", headers=auditor)).json()
    assert listed["entries"] == 2
    assert [(r["seq"], r["kind"], r["round"]) for r in listed["receipts"]] == \
        [(0, "run-start", None), (1, "round-receipt", 1)]
    assert listed["receipts"][1]["quarantined"] == {"hungary": "approval required: run 7"}
    entry = await (await client.get("/runs/7/receipts/1", headers=auditor)).json()
    assert entry["kind"] == "round-receipt" and entry["sig"] and len(entry["hash"]) == 64
    assert entry["body"]["sites"]["hungary"]["refusal"] == "approval-required"
    for bad in ("2", "99", "-1", "x", "1" * 40):
        assert (await client.get(f"/runs/7/receipts/{bad}", headers=auditor)).status == 404, bad
    assert (await client.get("/runs/7/receipts")).status == 401
    assert (await client.get("/runs/8/receipts", headers=auditor)).status == 404

    sites = {s["site"]: s for s in (await (await client.get("/sites", headers=auditor)).json())
             ["sites"]}
    assert sites["hungary"]["awaiting_approval"] == {"run_id": "7",
                                                     "refusal": "approval-required"}
    assert sites["cleveland"]["awaiting_approval"] is None
    assert sites["cleveland"]["last_receipt"]["tcb"] == {"bootloader": 4, "snp": 22}
    assert sites["cleveland"]["last_seen"] > 0
    summary = (await (await client.get("/runs", headers=auditor)).json())["runs"][0]
    assert summary["rounds_planned"] == 3 and summary["protocol_run_id"] == "7"

    # a later round in which Hungary was admitted: no longer waiting
    with open(run / "progress.jsonl", "a") as fh:
        fh.write(json.dumps(round_entry(2, None)) + "\n")
    from cleanroom.coordinator.audit import AuditLog, load_signing_key

    AuditLog(run / "audit.jsonl", load_signing_key(config.audit_key)).append(
        "round-receipt", {"run_id": "7", "round": 2, **{k: v for k, v in round_entry(
            2, None).items() if k in ("attested", "quarantined", "sites")}})
    sites = {s["site"]: s for s in (await (await client.get("/sites", headers=auditor)).json())
             ["sites"]}
    assert sites["hungary"]["awaiting_approval"] is None
    assert sites["hungary"]["last_receipt"]["round"] == 2

    # the signed run-end says how the run ended
    assert (await (await client.get("/runs/7", headers=auditor)).json())["status"] == "running"
    AuditLog(run / "audit.jsonl", load_signing_key(config.audit_key)).append(
        "run-end", {"status": "paused", "last_round": 2})
    # the run-end is signed before the report is written: finishing until it is there
    assert (await (await client.get("/runs/7", headers=auditor)).json())["status"] == \
        "finishing"
    # a report being written (not JSON yet) does not break the listing
    (run / "report.json").write_text('{"rounds": [')
    assert (await client.get("/runs", headers=auditor)).status == 200
    (run / "report.json").write_text(json.dumps({"rounds": [], "final": {}, "run_id": "7"}))
    detail = await (await client.get("/runs/7", headers=auditor)).json()
    assert detail["status"] == "paused" and detail["report"]["run_id"] == "7"
    (run / "report.json").unlink()  # (the listing below reads the chain alone)

    # a torn or garbage tail is left out of the listing (the audit endpoint names it)
    with open(run / "audit.jsonl", "ab") as fh:
        fh.write(b'{"seq": 4, "kind": "round-rec')
    listed = await (await client.get("/runs/7/receipts", headers=auditor)).json()
    assert listed["entries"] == 4
    audit = await (await client.get("/runs/7/audit", headers=auditor)).json()
    assert audit["ok"] is False and audit["first_bad_entry"] == 4


async def test_ledger_and_activity(aiohttp_client, site):
    runtime, auditor, app = site
    ledger = runtime.ledger
    for run_id, rounds in (("101", 2), ("102", 1)):
        for number in range(1, rounds + 1):
            ledger.reserve(run_id, number, 2.0, 0.1, 3)
            ledger.commit(run_id, number, 3)
    ledger.reserve("103", 1, 2.0, 0.1, 3)  # reserved, never committed: it still counts
    runtime.activity.record("refused", "104", 1, code="approval-required", detail="not yet")
    client = await aiohttp_client(app)
    view = await (await client.get("/ledger", headers=bearer(auditor))).json()
    runs = {r["run_id"]: r for r in view["runs"]}
    assert [r["run_id"] for r in view["runs"]] == ["101", "102", "103"]
    assert runs["101"]["rounds"] == 2 and runs["101"]["committed"] == 2
    assert runs["103"]["reserved"] == 1 and runs["103"]["committed"] == 0
    assert runs["101"]["epsilon"] == pytest.approx(ledger.spent("101"))
    assert runs["101"]["epsilon"] > runs["102"]["epsilon"] > 0
    after = [r["lifetime_epsilon_after"] for r in view["runs"]]
    assert after == sorted(after) and after[-1] == pytest.approx(ledger.spent())
    assert view["spent_epsilon"] == pytest.approx(ledger.spent())
    assert view["remaining_epsilon"] == pytest.approx(view["lifetime_epsilon"] - ledger.spent())
    assert (await client.get("/ledger")).status == 401

    events = (await (await client.get("/activity?limit=5", headers=bearer(auditor))).json())
    assert events["events"][-1]["event"] == "refused"
    assert events["events"][-1]["code"] == "approval-required"
    for bad in ("0", "501", "x", "-1", "1e3", ""):
        answer = await client.get(f"/activity?limit={bad}", headers=bearer(auditor))
        assert answer.status == 400, bad


def test_site_token_command(fed, tmp_path, capsys):
    from cleanroom.cli import main
    from cleanroom.http import hash_token

    config = fed / "sites" / "hungary" / "site.toml"
    out = tmp_path / "auditor.token"
    assert main(["site", "token", "--role", "auditor", "--out", str(out),
                 "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    value = out.read_text().strip()
    assert value not in printed and "restart" in printed  # the token goes to the file only
    assert out.stat().st_mode & 0o777 == 0o600
    assert load_tokens(fed / "sites" / "hungary" / "api_tokens.json")[hash_token(value)] == \
        "auditor"
    assert main(["site", "token", "--role", "auditor", "--out", str(out),
                 "--config", str(config)]) == 2  # never overwrites a token file
    assert out.read_text().strip() == value
    with pytest.raises(SystemExit):  # operator or auditor, nothing else
        main(["site", "token", "--role", "root", "--out", str(tmp_path / "x"),
              "--config", str(config)])
    assert not (tmp_path / "x").exists()


async def test_polling_dashboards_ask_the_superlink_rarely(aiohttp_client, fed, monkeypatch):
    config = load_coordinator_config(fed / "coordinator" / "coordinator.toml")

    class Counting(FakeControl):
        calls = 0

        def list_nodes(self):
            Counting.calls += 1
            return super().list_nodes()

    client = await aiohttp_client(build_coordinator_api(config, Counting(),
                                                        load_tokens(config.api.tokens)))
    auditor = bearer(token(fed / "coordinator" / "auditor.token"))
    for _ in range(5):
        assert (await client.get("/sites", headers=auditor)).status == 200
    assert Counting.calls == 1
    monkeypatch.setattr("cleanroom.coordinator.api.NODES_TTL", 0.0)
    assert (await client.get("/sites", headers=auditor)).status == 200
    assert Counting.calls == 2
