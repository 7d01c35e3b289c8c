"""The dashboards' defences in a real browser, against the coordinator API served in-process
(no federation: seconds): text a site controls (a refusal's detail, a reason) is shown as text
and never runs; the page refuses to be framed; a token typed in is never put in the address;
an expired or revoked token sends the user back to the sign-in form."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cleanroom.coordinator.api import build_coordinator_api
from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.http import ROLE_KEY, load_tokens
from cleanroom.process import free_port
from tests.browser.cdp import Browser
from tests.browser.pages import sign_in
from tests.deploy.test_apis import FakeControl
from tests.deploy.test_dashboard_api import write_run

pytestmark = [pytest.mark.browser]
HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def serve(app: web.Application) -> Iterator[str]:
    """Serve ``app`` on a free loopback port from a thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app, access_log=None)
    port = free_port()
    asyncio.run_coroutine_threadsafe(runner.setup(), loop).result(10)
    asyncio.run_coroutine_threadsafe(web.TCPSite(runner, "127.0.0.1", port).start(),
                                     loop).result(10)
    yield f"http://127.0.0.1:{port}/"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def another_site() -> Iterator[str]:
    """A page of another origin on this machine, with no policy of its own."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<h1>another site</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    yield from serve(app)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, web.Application]]:
    out = tmp_path_factory.mktemp("safety") / "fed"
    provision(ProvisionRequest(out=out, sites=["cleveland", "hungary"]))
    config = load_coordinator_config(out / "coordinator" / "coordinator.toml")
    hostile = {"admitted": False, "reason": f"attestation: {HOSTILE}", "refusal": HOSTILE,
               "tcb": {HOSTILE: 1}, "measurement": HOSTILE}
    write_run(config, "7", [{
        "round": 1, "attested": ["cleveland"], "quarantined": {"hungary": hostile["reason"]},
        "metrics": {"cleveland": {"accuracy": 0.8}}, "means": {"accuracy": 0.8},
        "epsilon": {"cleveland": 0.5}, "sites": {
            "cleveland": {"admitted": True, "reason": "attested", "measurement": "ab" * 48},
            "hungary": hostile}}])
    app = build_coordinator_api(config, FakeControl(), load_tokens(config.api.tokens))
    for url in serve(app):
        yield url, out, app


def test_site_controlled_text_is_shown_not_run(served, browser: Browser):
    url, out, _ = served
    page = browser.new_page()
    sign_in(page, url, (out / "coordinator" / "auditor.token").read_text().strip())
    page.wait("document.querySelector('#quarantine-table tr[data-site=hungary]')", 15,
              "the quarantine")
    page.wait("document.querySelector('#receipt-table a.receipt-link')", 15, "the receipts")
    page.click("#receipt-table tr[data-seq='1'] a.receipt-link")
    page.wait("!document.getElementById('receipt-view').hidden", 10, "the receipt")
    assert page.eval("document.title") != "pwned"
    assert page.eval("document.querySelectorAll('#app img, #app script').length") == 0
    assert HOSTILE in page.text("#quarantine-table tr[data-site=hungary] .reason")
    assert HOSTILE in page.text("#site-table tr[data-site=hungary] .reason")
    assert HOSTILE in json.loads(page.text("#receipt-body"))["body"]["sites"]["hungary"]["reason"]
    assert page.problems() == []  # nothing even tried to run (no CSP report)


def test_the_page_cannot_be_framed(served, another_site: str, browser: Browser):
    """Another site puts the dashboard in an iframe: the browser shows its error page in the
    frame instead (frame-ancestors 'none', X-Frame-Options: DENY)."""
    url, _, _ = served
    page = browser.new_page()
    page.goto(another_site)
    page.eval(f"(() => {{ const f = document.createElement('iframe'); f.src = {json.dumps(url)};"
              " document.body.append(f); return true; })()")
    frame: dict = {}
    for _ in range(100):  # until the frame has committed a document
        children = page.call("Page.getFrameTree")["frameTree"].get("childFrames") or []
        frame = children[0]["frame"] if children else {}
        if frame.get("url", "").startswith(("chrome-error://", "http")):
            break  # (while it navigates, the frame's url can read ":" for a moment)
        page.eval("new Promise(r => setTimeout(r, 100))")
    assert frame.get("url", "").startswith("chrome-error://"), frame.get("url")
    assert frame.get("unreachableUrl") == url


def test_a_revoked_token_signs_the_user_out(served, browser: Browser):
    url, out, app = served
    page = browser.new_page()
    token = (out / "coordinator" / "operator.token").read_text().strip()
    sign_in(page, url, token)
    assert "operator" in page.text("#role")
    # the address never carried it, nor does the history
    assert page.eval("history.length") <= 2 and token not in page.eval("location.href")
    saved = dict(app[ROLE_KEY])
    app[ROLE_KEY].clear()  # every token revoked: the next refresh is refused
    try:
        page.wait("!document.getElementById('login').hidden", 15, "the sign-in form again")
        assert "refused" in page.text("#login-error")
        assert page.eval("sessionStorage.length") == 0
        assert page.eval("document.getElementById('app').hidden")
    finally:
        app[ROLE_KEY].update(saved)
