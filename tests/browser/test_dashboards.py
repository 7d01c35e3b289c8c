"""The dashboards in a real browser (headless Chromium over its DevTools pipe) against a real
federation on loopback: the coordinator daemon and two site daemons started by the code of
``cleanroom deploy-local``. Hungary requires approval of every run and the coordinator needs
one attested site: run 1 pauses after round 1 with Hungary quarantined ('approval required'),
its operator approves the run on the site dashboard (an auditor cannot), the run resumes and
both sites are attested in round 2.

Screenshots of each page land in the test's tmp folder as dashboard-*.png (and in
$CLEANROOM_SCREENSHOTS when set: the guides show four of them from docs/img).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.browser.cdp import Browser, Page
from tests.browser.pages import post_from_page, row_text, sign_in, sign_out

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
RUN_TIMEOUT = 300.0


@dataclass
class Federation:
    plan: Any  # LocalPlan
    prov: Any  # Provisioned
    shots: Path
    site_auditor: str
    run_id: str = ""  # the paused run (its protocol run id too)
    resumed_id: str = ""
    tokens: list[str] = field(default_factory=list)

    def token(self, name: str) -> str:
        return self.prov.tokens[name].read_text().strip()

    def api(self, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            url, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def wait_run(self, run_id: str, statuses: tuple[str, ...]) -> dict[str, Any]:
        url = f"{self.plan.coordinator_url}runs/{run_id}"
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                run = self.api(url, self.token("coordinator-auditor"))
            except OSError:
                run = {}
            if run.get("status") in statuses:
                return run
            assert run.get("status") != "failed", run
            time.sleep(1.0)
        raise AssertionError(f"run {run_id} did not reach {statuses} in {RUN_TIMEOUT:.0f}s")

    def shot(self, page: Page, name: str) -> Path:
        path = page.screenshot(self.shots / f"dashboard-{name}.png")
        copy_to = os.environ.get("CLEANROOM_SCREENSHOTS")
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(copy_to) / path.name)
        return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[Federation]:
    from cleanroom.http import add_token
    from cleanroom.process import Supervisor
    from cleanroom.simulations.deploy_local_cli import plan_local, provision_local, start_local

    base = tmp_path_factory.mktemp("dashboards")
    plan = plan_local(base / "fed", ["cleveland", "hungary"])
    prov = provision_local(plan, rounds=2)
    # one attested site is enough for a round; Hungary trains only runs its operators approve
    config = prov.coordinator_config
    config.write_text(config.read_text().replace("[training]\n", "[training]\nmin_sites = 1\n"))
    hungary = prov.site_configs["hungary"]
    hungary.write_text(hungary.read_text().replace("require_approval = false",
                                                   "require_approval = true"))
    auditor = add_token(hungary.parent / "api_tokens.json", "auditor")
    sup = Supervisor(plan.out / "logs")
    fed = Federation(plan, prov, base / "screenshots", auditor)
    try:
        start_local(plan, prov, sup)
        answer = fed.api(f"{plan.coordinator_url}runs", fed.token("coordinator-operator"),
                         {"rounds": 2, "pause_after": 1})
        fed.run_id = str(answer["run_id"])
        fed.wait_run(fed.run_id, ("paused", "completed"))
        yield fed
    finally:
        sup.stop(timeout=30)
    # no token ever reached a log: not the daemons', not Flower's
    secrets = [fed.token(name) for name in prov.tokens] + [auditor]
    for log in [*plan.out.rglob("*.log"), *plan.out.rglob("*.jsonl")]:
        text = log.read_text(errors="replace")
        assert not any(s in text for s in secrets), f"a token is in {log}"


def test_coordinator_dashboard_shows_the_quarantine(federation: Federation, browser: Browser):
    page = browser.new_page()
    url = federation.plan.coordinator_url
    page.goto(url)
    page.wait("!document.getElementById('login').hidden", 15, "the sign-in form")
    federation.shot(page, "coordinator-sign-in")
    assert page.eval("document.getElementById('app').hidden")  # nothing shown before sign-in
    page.type("#token", "not-a-token")
    page.click("#login-form button")
    page.wait("!document.getElementById('login-error').hidden", 10, "the refusal")
    assert "not valid" in page.text("#login-error")

    sign_in(page, url, federation.token("coordinator-operator"))
    page.wait("document.querySelector('#quarantine-table tr[data-site=hungary]')", 20,
              "Hungary's quarantine")
    page.wait("document.querySelector('#receipt-table tr[data-seq=\"1\"]')", 20, "the receipts")
    hungary = row_text(page, "site-table", "site", "hungary")
    assert "quarantined" in hungary and "approval required" in hungary, hungary
    assert "waiting for approval" in hungary, hungary
    cleveland = row_text(page, "site-table", "site", "cleveland")
    assert "attested" in cleveland and "online" in cleveland, cleveland
    assert "bootloader" in cleveland or "snp" in cleveland, cleveland  # the TCB, decoded
    assert "paused" in row_text(page, "run-table", "run", federation.run_id)
    reason = page.text("#quarantine-table tr[data-site=hungary] .reason")
    assert reason.startswith("approval required") and "not approved by site hungary" in reason
    assert page.eval("document.querySelectorAll('svg.chart').length") == 2
    assert page.eval("document.querySelectorAll('svg.chart text.mark').length") >= 1
    assert "verified" in page.text("#audit-status")
    federation.shot(page, "coordinator-quarantine")

    page.click("#receipt-table tr[data-seq='1'] a.receipt-link")
    page.wait("!document.getElementById('receipt-view').hidden", 10, "the round 1 receipt")
    receipt = json.loads(page.text("#receipt-body"))
    assert receipt["kind"] == "round-receipt" and receipt["body"]["round"] == 1
    assert receipt["body"]["sites"]["hungary"]["refusal"] == "approval-required"
    assert len(receipt["sig"]) > 40
    federation.shot(page, "coordinator-receipt")
    assert page.problems() == []


def test_auditor_cannot_approve(federation: Federation, browser: Browser):
    page = browser.new_page()
    url = federation.plan.site_url("hungary")
    sign_in(page, url, federation.site_auditor)
    page.wait("document.querySelector('#activity-table tr[data-event=refused]')", 20,
              "the refusal in the activity")
    assert "auditor" in page.text("#role")
    assert page.eval("document.getElementById('approve-fields').disabled")
    assert "Read-only" in page.text("#approve-note")
    assert page.eval("document.querySelectorAll('button.prefill').length") == 0
    refusal = row_text(page, "activity-table", "event", "refused")
    assert "approval-required" in refusal, refusal
    # the form is disabled; were it not, the API refuses the auditor's token anyway
    outcome = post_from_page(page, "/approvals", {"run_id": federation.run_id,
                                                  "task_digest": "ab" * 32, "epsilon": 1.0})
    assert outcome == "status 403", outcome
    approvals = federation.api(f"{url}approvals", federation.site_auditor)
    assert approvals["approved_runs"] == []
    federation.shot(page, "site-auditor")
    sign_out(page)


def test_operator_approves_and_the_run_goes_on(federation: Federation, browser: Browser):
    page = browser.new_page()
    url = federation.plan.site_url("hungary")
    sign_in(page, url, federation.token("hungary-operator"))
    page.wait("document.querySelector('#activity-table button.prefill')", 20, "the refusal")
    assert not page.eval("document.getElementById('approve-fields').disabled")
    page.click("#activity-table button.prefill")  # fills the refused run's id
    assert page.eval("document.getElementById('approve-run').value") == federation.run_id
    task = page.eval("document.getElementById('approve-task').value")
    assert len(task) == 64  # the one task of the policy, filled in
    page.type("#approve-epsilon", "1")
    page.click("#approve-button")
    page.wait(f"document.querySelector('#approval-table tr[data-run=\"{federation.run_id}\"]')",
              15, "the approval in the table")
    assert "approved" in page.text("#approve-result")
    federation.shot(page, "site-approved")

    answer = federation.api(f"{federation.plan.coordinator_url}runs",
                            federation.token("coordinator-operator"),
                            {"resume_run": federation.run_id})
    federation.resumed_id = str(answer["run_id"])
    resumed = federation.wait_run(federation.resumed_id, ("completed",))
    assert resumed["report"]["rounds"][-1]["attested"] == ["cleveland", "hungary"]

    page.wait(f"document.querySelector('#ledger-table tr[data-run=\"{federation.run_id}\"]')",
              20, "the run in the privacy ledger")
    charged = row_text(page, "ledger-table", "run", federation.run_id)
    assert "1 committed" in charged, charged
    assert page.eval("document.querySelectorAll('#ledger-chart svg.chart rect.bar').length") == 1
    assert "left" in page.text("#budget-left")
    federation.shot(page, "site-ledger")
    # the run is over: the operator withdraws the approval
    page.click(f"#approval-table tr[data-run=\"{federation.run_id}\"] button.revoke")
    page.wait(f"!document.querySelector('#approval-table tr[data-run=\"{federation.run_id}\"]')",
              15, "the approval to go")
    assert "revoked" in page.text("#approve-result")
    assert federation.api(f"{url}approvals", federation.site_auditor)["approved_runs"] == []
    assert page.problems() == []


def test_coordinator_dashboard_shows_both_attested(federation: Federation, browser: Browser):
    assert federation.resumed_id, "needs the resumed run"
    page = browser.new_page()
    sign_in(page, federation.plan.coordinator_url, federation.token("coordinator-auditor"))
    page.wait(f"document.querySelector('#run-table tr[data-run=\"{federation.resumed_id}\"]')",
              20, "the resumed run")
    for site in ("cleveland", "hungary"):
        row = row_text(page, "site-table", "site", site)
        assert "attested" in row and "quarantined" not in row, row
        assert "waiting for approval" not in row, row
    assert "completed" in row_text(page, "run-table", "run", federation.resumed_id)
    page.wait("document.getElementById('audit-status').textContent.trim() !== ''", 20,
              "the audit chain's verification")  # fetched after the runs
    assert "verified" in page.text("#audit-status")
    assert "matches" in page.text("#audit-status")
    assert "auditor" in page.text("#role")
    federation.shot(page, "coordinator-attested")
    assert page.problems() == []


def test_another_origin_cannot_write(federation: Federation, browser: Browser):
    """A page of another origin (the coordinator's dashboard, another port of this host) that
    holds a site's operator token still cannot approve there: the browser's CORS preflight
    finds no permission, and the site refuses cross-origin writes in any case."""
    page = browser.new_page()
    page.goto(federation.plan.coordinator_url)
    site = federation.plan.site_url("hungary").rstrip("/")
    outcome = post_from_page(page, f"{site}/approvals", {
        "run_id": "424242", "task_digest": "ab" * 32, "epsilon": 1.0},
        federation.token("hungary-operator"))
    assert outcome.startswith("blocked"), outcome
    approvals = federation.api(f"{site}/approvals", federation.site_auditor)
    assert "424242" not in approvals["approved_runs"]
