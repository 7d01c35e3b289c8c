"""The site daemon's local HTTP API (aiohttp, loopback by default).

``GET /health`` (no token), ``GET /status``, ``GET /policy``, ``GET /approvals`` (operator or
auditor token), ``POST /approvals`` ``{"run_id": ...}`` and ``DELETE /approvals/{run_id}``
(operator token). Nothing here returns data rows, updates or keys.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from cleanroom.errors import CleanroomError
from cleanroom.http import READ, REQUEST_ROLE, WRITE, make_app, read_json, requires
from cleanroom.site_agent.runtime import SiteRuntime

RUNTIME_KEY = web.AppKey("runtime", SiteRuntime)
STARTED_KEY = web.AppKey("started", float)


def status_of(runtime: SiteRuntime, *, recent: int = 20) -> dict[str, Any]:
    """What hospital IT wants to see: provider, measurement, budget, recent rounds."""
    provider = runtime.provider
    measurement = getattr(provider, "measurement", None)
    ledger = runtime.ledger
    spent = ledger.spent()
    charges = ledger.charges()
    return {
        "site": runtime.site,
        "provider": provider.name,
        "measurement": measurement.hex() if isinstance(measurement, bytes) else None,
        "budget": {"delta": ledger.delta, "lifetime_epsilon": ledger.lifetime_epsilon,
                   "spent_epsilon": spent,
                   "remaining_epsilon": max(0.0, ledger.lifetime_epsilon - spent),
                   "max_epsilon_per_run": ledger.run_epsilon, "charges": len(charges)},
        "recent": runtime.activity.recent(recent),
        "approved_runs": runtime.approvals.approved_runs(),
    }


@requires(READ)
async def status(request: web.Request) -> web.Response:
    body = status_of(request.app[RUNTIME_KEY])
    body["uptime_seconds"] = round(time.time() - request.app[STARTED_KEY], 1)
    return web.json_response(body)


@requires(READ)
async def policy(request: web.Request) -> web.Response:
    config = request.app[RUNTIME_KEY].config
    return web.json_response({"policy": config.policy.model_dump(mode="json"),
                              "privacy": config.privacy.model_dump(mode="json")})


@requires(READ)
async def approvals(request: web.Request) -> web.Response:
    return web.json_response({"approved_runs":
                              request.app[RUNTIME_KEY].approvals.approved_runs()})


@requires(WRITE)
async def approve(request: web.Request) -> web.Response:
    body = await read_json(request)
    run_id = str(body.get("run_id", "")).strip()
    if not run_id or len(run_id) > 128:
        raise CleanroomError("run_id is required (at most 128 characters)")
    request.app[RUNTIME_KEY].approvals.approve(run_id, by=f"api:{request[REQUEST_ROLE]}")
    return web.json_response({"approved": run_id}, status=201)


@requires(WRITE)
async def revoke(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    request.app[RUNTIME_KEY].approvals.revoke(run_id, by=f"api:{request[REQUEST_ROLE]}")
    return web.json_response({"revoked": run_id})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "site": request.app[RUNTIME_KEY].site})


def build_site_api(runtime: SiteRuntime, tokens: dict[str, str]) -> web.Application:
    app = make_app(tokens)
    app[RUNTIME_KEY] = runtime
    app[STARTED_KEY] = time.time()
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_get("/policy", policy)
    app.router.add_get("/approvals", approvals)
    app.router.add_post("/approvals", approve)
    app.router.add_delete("/approvals/{run_id}", revoke)
    return app
