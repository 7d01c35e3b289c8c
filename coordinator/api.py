"""The coordinator's HTTP API (aiohttp): health, runs, per-round status, sites.

Read endpoints need an operator or auditor token; ``POST /runs`` and ``POST /runs/{id}/stop``
need an operator token. Answers hold ids, digests, verdict reasons and metrics only.

* ``GET /health`` (no token): the API and whether the SuperLink answers.
* ``GET /runs``: every run with its status, rounds done and final accuracy.
* ``GET /runs/{id}``: the run's report (or progress so far); ``GET /runs/{id}/rounds``.
* ``GET /runs/{id}/audit``: verification of the run's audit chain.
* ``GET /sites``: registered sites, node ids, online state, latest attestation verdict.
* ``POST /runs`` ``{"rounds": 3, "strategy": "fedavg", ...}``: submit a run.
* ``POST /runs/{id}/stop``: stop a run.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from cleanroom.coordinator.config import CoordinatorConfig
from cleanroom.errors import CleanroomError
from cleanroom.http import READ, WRITE, make_app, read_json, requires

CONFIG_KEY = web.AppKey("config", CoordinatorConfig)
CONTROL_KEY = web.AppKey("control", object)  # RunControl (submit/stop/list nodes)


def read_progress(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "progress.jsonl"
    if not path.exists():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return rounds


def run_summary(run_dir: Path) -> dict[str, Any]:
    report_path = run_dir / "report.json"
    rounds = read_progress(run_dir)
    summary: dict[str, Any] = {"run_id": run_dir.name, "rounds_done": len(rounds)}
    if report_path.exists():
        report = json.loads(report_path.read_text())
        summary.update(status="completed", accuracy_mean=report["final"]["accuracy_mean"],
                       audit_head=report.get("audit_head"))
    else:
        summary["status"] = "running" if rounds else "starting"
        if (run_dir / "audit.jsonl").exists() and '"status":"failed"' in (
                run_dir / "audit.jsonl").read_text():
            summary["status"] = "failed"
    if rounds:
        summary["last_round"] = {k: rounds[-1][k] for k in ("round", "attested", "quarantined",
                                                           "accuracy_mean")}
    return summary


def _run_dir(request: web.Request) -> Path:
    run_id = request.match_info["run_id"]
    if not run_id.isdigit():
        raise web.HTTPNotFound(text=json.dumps({"error": "run ids are numbers"}),
                               content_type="application/json")
    path = request.app[CONFIG_KEY].runs_dir() / run_id
    if not path.is_dir():
        raise web.HTTPNotFound(text=json.dumps({"error": f"no run {run_id}"}),
                               content_type="application/json")
    return path


@requires(READ)
async def list_runs(request: web.Request) -> web.Response:
    runs_dir = request.app[CONFIG_KEY].runs_dir()
    dirs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) \
        if runs_dir.exists() else []
    return web.json_response({"runs": [run_summary(d) for d in dirs]})


@requires(READ)
async def get_run(request: web.Request) -> web.Response:
    run_dir = _run_dir(request)
    report = run_dir / "report.json"
    if report.exists():
        return web.json_response({**run_summary(run_dir), "report": json.loads(
            report.read_text())})
    return web.json_response({**run_summary(run_dir), "rounds": read_progress(run_dir)})


@requires(READ)
async def get_rounds(request: web.Request) -> web.Response:
    return web.json_response({"rounds": read_progress(_run_dir(request))})


@requires(READ)
async def get_audit(request: web.Request) -> web.Response:
    from cleanroom.coordinator.audit import load_public_key, verify_chain

    run_dir = _run_dir(request)
    path = run_dir / "audit.jsonl"
    if not path.exists():
        raise CleanroomError(f"run {run_dir.name} has no audit log yet")
    config = request.app[CONFIG_KEY]
    key_file = config.audit_key.parent / "audit_public_key.hex"
    key = load_public_key(key_file) if key_file.exists() else None
    result = verify_chain(path, public_key=key)
    return web.json_response({"ok": result.ok, "entries": result.entries, "head": result.head,
                              "first_bad_entry": result.first_bad, "reason": result.reason})


@requires(READ)
async def get_sites(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    control = request.app[CONTROL_KEY]
    try:
        nodes = await asyncio.to_thread(control.list_nodes)  # type: ignore[attr-defined]
    except CleanroomError as exc:
        nodes, error = [], str(exc)
    else:
        error = None
    from cleanroom.coordinator.daemon import registered_nodes

    by_id = {str(n.get("node-id")): n for n in nodes}
    node_ids = registered_nodes(config)
    latest: dict[str, dict[str, Any]] = {}
    runs_dir = config.runs_dir()
    if runs_dir.exists():
        for run_dir in sorted(runs_dir.iterdir(), key=lambda p: p.stat().st_mtime):
            for entry in read_progress(run_dir):
                for site, info in entry.get("sites", {}).items():
                    latest[site] = {"run_id": run_dir.name, "round": entry["round"], **info}
    sites = []
    for site in config.sites:
        node_id = node_ids.get(site.name)
        node = by_id.get(str(node_id), {})
        sites.append({"site": site.name, "node_id": node_id,
                      "status": node.get("status", "unknown"),
                      "latest_attestation": latest.get(site.name)})
    body: dict[str, Any] = {"sites": sites}
    if error:
        body["superlink_error"] = error
    return web.json_response(body)


@requires(WRITE)
async def submit_run(request: web.Request) -> web.Response:
    from pydantic import ValidationError

    from cleanroom.config import format_validation_error
    from cleanroom.coordinator.serverapp import RunOptions

    body = await read_json(request)
    try:  # strict: unknown keys, wrong types and out-of-range values are refused, named
        options = RunOptions.model_validate(body).model_dump(exclude_defaults=True)
    except ValidationError as exc:
        raise CleanroomError(format_validation_error(exc, "run options")) from None
    control = request.app[CONTROL_KEY]
    run_id = await asyncio.to_thread(control.submit, options)  # type: ignore[attr-defined]
    return web.json_response({"run_id": run_id}, status=202)


@requires(WRITE)
async def stop_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    if not run_id.isdigit():
        raise CleanroomError("run ids are numbers")
    await asyncio.to_thread(request.app[CONTROL_KEY].stop, int(run_id))  # type: ignore[attr-defined]
    return web.json_response({"stopping": int(run_id)})


async def health(request: web.Request) -> web.Response:
    control = request.app[CONTROL_KEY]
    up = await asyncio.to_thread(control.superlink_up)  # type: ignore[attr-defined]
    return web.json_response({"status": "ok" if up else "degraded", "superlink": up,
                              "name": request.app[CONFIG_KEY].name},
                             status=200 if up else 503)


def build_coordinator_api(config: CoordinatorConfig, control: object,
                          tokens: dict[str, str]) -> web.Application:
    app = make_app(tokens)
    app[CONFIG_KEY] = config
    app[CONTROL_KEY] = control
    app.router.add_get("/health", health)
    app.router.add_get("/runs", list_runs)
    app.router.add_post("/runs", submit_run)
    app.router.add_get("/runs/{run_id}", get_run)
    app.router.add_get("/runs/{run_id}/rounds", get_rounds)
    app.router.add_get("/runs/{run_id}/audit", get_audit)
    app.router.add_post("/runs/{run_id}/stop", stop_run)
    app.router.add_get("/sites", get_sites)
    return app
