"""The site daemon's local HTTP API (aiohttp, loopback by default).

``GET /health`` (no token), ``GET /status``, ``GET /policy``, ``GET /approvals``,
``GET /datasets``, ``GET /ledger`` (epsilon per run and over the site's lifetime, from the
sealed privacy ledger), ``GET /activity?limit=N`` (what the site was asked and did, refusals
included), ``GET /whoami`` (operator or auditor token), ``POST /approvals``
``{"run_id": ..., "task_digest": ..., "epsilon": ...}`` (strict: no coercion, no extra keys) and
``DELETE /approvals/{run_id}`` (operator token). ``GET /`` (no token) is the site dashboard
(cleanroom.dashboard), which asks for a token and calls the endpoints above. Nothing here
returns data rows, updates or keys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from cleanroom.dashboard import add_dashboard
from cleanroom.errors import CleanroomError
from cleanroom.http import READ, REQUEST_ROLE, WRITE, make_app, read_json, requires
from cleanroom.site_agent.runtime import SiteRuntime

RUNTIME_KEY = web.AppKey("runtime", SiteRuntime)
STARTED_KEY = web.AppKey("started", float)
MAX_ACTIVITY = 500  # most events /activity returns


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
        "approved_tasks": [t.model_dump(mode="json") for t in runtime.config.policy.tasks],
    }


def ledger_view(runtime: SiteRuntime) -> dict[str, Any]:
    """Epsilon per run (in the order runs were first charged) and the site's lifetime epsilon
    after each, from the sealed ledger's charges with the accountant that calibrated the
    noise; the budgets. Ids, counts and epsilon only."""
    from cleanroom.site_agent.ledger import Charge, epsilon_of

    ledger = runtime.ledger
    by_run: dict[str, list[Charge]] = {}
    for charge in ledger.charges():
        by_run.setdefault(charge.run_id, []).append(charge)
    history: list[tuple[float, float, int]] = []
    runs = []
    for run_id, charges in by_run.items():
        own = [c.history_entry() for c in charges]
        history += own
        runs.append({
            "run_id": run_id, "rounds": len(charges),
            "committed": sum(c.status == "committed" for c in charges),
            "reserved": sum(c.status == "reserved" for c in charges),
            "steps": sum(c.steps for c in charges),
            "epsilon": epsilon_of(own, ledger.delta, ledger.memo),
            "lifetime_epsilon_after": epsilon_of(history, ledger.delta, ledger.memo),
            "first_charged_at": min(c.recorded_at for c in charges),
            "last_charged_at": max(c.recorded_at for c in charges)})
    spent = runs[-1]["lifetime_epsilon_after"] if runs else 0.0
    return {"delta": ledger.delta, "lifetime_epsilon": ledger.lifetime_epsilon,
            "max_epsilon_per_run": ledger.run_epsilon, "spent_epsilon": spent,
            "remaining_epsilon": max(0.0, ledger.lifetime_epsilon - spent), "runs": runs}


@requires(READ)
async def ledger(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(ledger_view, request.app[RUNTIME_KEY]))


@requires(READ)
async def activity(request: web.Request) -> web.Response:
    """The latest events (``limit``, 1..500, default 100), newest last."""
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ACTIVITY:
        raise CleanroomError(f"limit must be a whole number from 1 to {MAX_ACTIVITY}")
    events = await asyncio.to_thread(request.app[RUNTIME_KEY].activity.recent, int(raw))
    return web.json_response({"events": events})


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


def _approval_view(approval: Any) -> dict[str, Any]:
    return {"run_id": approval.run_id, "task_digest": approval.task_digest,
            "epsilon": approval.epsilon, "by": approval.by, "at": approval.at}


@requires(READ)
async def approvals(request: web.Request) -> web.Response:
    current = request.app[RUNTIME_KEY].approvals.current()
    return web.json_response({"approved_runs": sorted(current),
                              "approvals": [_approval_view(a) for _, a in sorted(current.items())]})


@requires(WRITE)
async def approve(request: web.Request) -> web.Response:
    from pydantic import ValidationError

    from cleanroom.config import format_validation_error
    from cleanroom.site_agent.approvals import ApprovalRequest

    body = await read_json(request)
    try:
        wanted = ApprovalRequest.model_validate(body)
    except ValidationError as exc:
        raise CleanroomError(format_validation_error(exc, "approval")) from None
    approval = request.app[RUNTIME_KEY].approvals.approve(wanted,
                                                          by=f"api:{request[REQUEST_ROLE]}")
    return web.json_response({"approved": _approval_view(approval)}, status=201)


@requires(READ)
async def datasets(request: web.Request) -> web.Response:
    """Registered datasets: names, digests, row counts, columns and identifier flags (never a
    value of a row)."""
    records = request.app[RUNTIME_KEY].datasets.datasets()
    return web.json_response({"datasets": [
        {"name": r.name, "digest": r.digest, "train_rows": r.train_rows,
         "test_rows": r.test_rows, "registered_at": r.registered_at,
         "columns": [{"name": c.name, "identifying": c.identifying} for c in r.columns]}
        for r in records.values()]})


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
    app.router.add_get("/datasets", datasets)
    app.router.add_get("/ledger", ledger)
    app.router.add_get("/activity", activity)
    add_dashboard(app, "site")
    return app
