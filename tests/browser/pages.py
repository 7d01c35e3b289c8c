"""Steps the browser tests share: sign in and out of a dashboard, read a table row, POST from
the page."""

from __future__ import annotations

import json
from typing import Any

from tests.browser.cdp import Page


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url)
    page.wait("!document.getElementById('login').hidden", 15, "the sign-in form")
    page.type("#token", token)
    page.click("#login-form button")
    page.wait("document.body.classList.contains('signed-in')", 15, "signing in")
    assert token not in page.eval("location.href")
    assert token not in page.eval("document.documentElement.outerHTML")
    assert page.eval("document.getElementById('token').value") == ""


def sign_out(page: Page) -> None:
    page.click("#sign-out")
    page.wait("!document.getElementById('login').hidden", 10, "signing out")
    assert page.eval("sessionStorage.length") == 0


def post_from_page(page: Page, url: str, body: dict[str, Any], token: str | None = None) -> str:
    """POST ``body`` with fetch() from the page: 'status N', or 'blocked: ...' when the
    browser itself refused. Without ``token``, the page's own (from sessionStorage)."""
    auth = json.dumps(f"Bearer {token}") if token else \
        "'Bearer ' + sessionStorage.getItem('cleanroom.token')"
    return str(page.eval(
        f"fetch({json.dumps(url)}, {{method: 'POST', headers: {{'Authorization': {auth}, "
        f"'Content-Type': 'application/json'}}, body: {json.dumps(json.dumps(body))}}})"
        ".then(r => 'status ' + r.status, e => 'blocked: ' + e.message)"))


def row_text(page: Page, table: str, key: str, value: str) -> str:
    return page.text(f"#{table} tr[data-{key}='{value}']")
