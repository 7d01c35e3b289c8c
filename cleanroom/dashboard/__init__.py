"""The browser dashboards: static pages the coordinator and site APIs serve at ``/``.

Everything a page needs ships in ``static/`` (HTML, CSS, plain JavaScript that draws its own
SVG charts): no CDN, no build step, no inline script (the Content-Security-Policy of
cleanroom.http forbids it). A page holds no data and no token: it asks for a token, keeps it
in the tab's ``sessionStorage`` and sends it as an ``Authorization: Bearer`` header with each
``fetch`` of the same API, so a token never appears in a URL, a cookie or a server log.

:func:`add_dashboard` registers ``GET /`` (the page) and ``GET /static/{name}`` (its assets,
served from a fixed list read once: no path from a request ever reaches the file system).
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

from aiohttp import web

Page = Literal["coordinator", "site"]
PAGES: dict[str, str] = {"coordinator": "coordinator.html", "site": "site.html"}
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
                 ".svg": "image/svg+xml"}
ASSETS_KEY = web.AppKey("dashboard_assets", dict)


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file of ``static/`` by name: (bytes, content type)."""
    assets: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return assets


def _answer(asset: tuple[bytes, str]) -> web.Response:
    body, content_type = asset
    return web.Response(body=body, content_type=content_type, charset="utf-8")


def add_dashboard(app: web.Application, page: Page) -> None:
    """Serve the ``page`` dashboard at ``/`` and its assets under ``/static/``."""
    assets = load_assets()
    app[ASSETS_KEY] = assets
    html = assets[PAGES[page]]

    async def index(request: web.Request) -> web.Response:
        return _answer(html)

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name.endswith(".html") or name not in assets:
            raise web.HTTPNotFound(text='{"error": "no such asset"}',
                                   content_type="application/json")
        return _answer(assets[name])

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
