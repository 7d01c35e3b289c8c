"""The coordinator's HTTP API (aiohttp): health, runs, per-round status, sites.

Read endpoints need an operator or auditor token; ``POST /runs`` and ``POST /runs/{id}/stop``
need an operator token. Answers hold ids, digests, verdict reasons and metrics only.

* ``GET /health`` (no token): the API and whether the SuperLink answers.
* ``GET /runs``: every run with its status, rounds done and final accuracy.
* ``GET /runs/{id}``: the run's report (or progress so far); ``GET /runs/{id}/rounds``.
* ``GET /runs/{id}/audit``: verification of the run's audit chain.
* ``GET /runs/{id}/receipts``: the chain's entries in brief (sequence, kind, time, round,
  verdicts); ``GET /runs/{id}/receipts/{seq}``: one signed entry as written.
* ``GET /sites``: registered sites, node ids, online state, latest attestation verdict, and
  from the latest signed receipt naming each site: when it was last seen, its measurement and
  TCB, and whether it is waiting for its operators' approval.
* ``GET /whoami``: the caller's role. ``GET /`` (no token): the dashboard page
  (cleanroom.dashboard), which asks for a token and calls the endpoints above.
* ``POST /runs`` ``{"rounds": 3, "strategy": "fedavg", ...}``: submit a run.
* ``POST /runs/{id}/stop``: stop a run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cleanroom.coordinator.config import CoordinatorConfig
from cleanroom.dashboard import add_dashboard
from cleanroom.errors import AuditChainError, CleanroomError
from cleanroom.http import READ, WRITE, make_app, read_json, requires

CONFIG_KEY = web.AppKey("config", CoordinatorConfig)
CONTROL_KEY = web.AppKey("control", object)  # RunControl (submit/stop/list nodes)
RECENT_RUNS = 50  # /sites looks at the receipts of this many latest runs
MAX_LISTED_ENTRIES = 5000  # /runs/{id}/receipts lists at most this many entries
# refusals that mean "my operators have not approved this (yet)"
APPROVAL_REFUSALS = ("approval-required", "task-not-approved")
ENTRY_CACHE_RUNS = 2 * RECENT_RUNS  # parsed audit chains kept in memory
_ENTRY_CACHE: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
NODES_TTL = 10.0  # seconds a SuperLink node listing is reused


@dataclass
class NodeCache:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    at: float | None = None
    nodes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


NODES_KEY = web.AppKey("nodes", NodeCache)


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


def chain_entries(run_dir: Path) -> list[dict[str, Any]]:
    """The run's audit chain as parsed entries, each with its line hash (``hash``), up to the
    first line that is not one (a torn last line, garbage): what is shown, not a
    verification (``GET /runs/{id}/audit`` verifies). Cached until the file changes."""
    from cleanroom.coordinator.audit import iter_entries, line_hash

    path = run_dir / "audit.jsonl"
    try:
        stat = path.stat()
    except OSError:
        return []
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _ENTRY_CACHE.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    entries: list[dict[str, Any]] = []
    try:
        for _, line in iter_entries(path):
            try:
                entry = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                break
            if not isinstance(entry, dict) or not isinstance(entry.get("body"), dict):
                break
            entries.append({**entry, "hash": line_hash(line)})
    except (AuditChainError, OSError):
        pass
    if len(_ENTRY_CACHE) >= ENTRY_CACHE_RUNS:
        _ENTRY_CACHE.pop(next(iter(_ENTRY_CACHE)))  # the oldest first-read run
    _ENTRY_CACHE[path] = (key, entries)
    return entries


def _start_body(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return next((e["body"] for e in entries if e.get("kind") in ("run-start", "run-resume")),
                {})


def _planned_rounds(report: dict[str, Any] | None, entries: list[dict[str, Any]]) -> int | None:
    config = (report or {}).get("config") or {}
    if isinstance(config.get("rounds"), int):
        return int(config["rounds"])
    rounds = (_start_body(entries).get("plan") or {}).get("rounds")
    return int(rounds) if isinstance(rounds, int) else None


def _read_report(path: Path) -> dict[str, Any] | None:
    """report.json, or None while it is missing, being written or not a report."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("rounds"), list) or \
            not isinstance(report.get("final"), dict):
        return None
    return report


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Status (the chain's signed ``run-end`` says completed, paused or failed, once the
    report is written: finishing until then; before it, running or starting), rounds done
    and planned, the task's primary metric and its value."""
    from cleanroom.coordinator.report import primary_metric

    rounds = read_progress(run_dir)
    entries = chain_entries(run_dir)
    report = _read_report(run_dir / "report.json")
    end = next((e["body"] for e in reversed(entries) if e.get("kind") == "run-end"), None)
    summary: dict[str, Any] = {"run_id": run_dir.name, "rounds_done": len(rounds),
                               "updated": run_dir.stat().st_mtime,
                               "rounds_planned": _planned_rounds(report, entries),
                               "protocol_run_id": _start_body(entries).get("run_id")}
    if end is not None and end.get("status") in ("completed", "paused", "failed"):
        # the chain's run-end is signed before the report (which names the chain's head) is
        # written: until the report is there the run is finishing, so a client that sees
        # "completed" always finds its report
        summary["status"] = end["status"] if report is not None or \
            end["status"] == "failed" else "finishing"
    else:
        summary["status"] = "running" if rounds else "starting"
    if report is not None:
        metric = primary_metric(report)
        summary.update(accuracy_mean=report["final"].get("accuracy_mean"),
                       audit_head=report.get("audit_head"), metric=metric,
                       final_metric=report["final"].get(metric),
                       rounds_done=report["rounds"][-1].get("round", 0) if report["rounds"]
                       else 0, resumed_from_run=report.get("resumed_from_run"),
                       task=(report.get("task") or {}).get("name"))
        summary["protocol_run_id"] = report.get("run_id") or summary["protocol_run_id"]
        if summary["status"] in ("running", "starting"):  # a report without its chain
            summary["status"] = "completed"
    if rounds:
        summary["last_round"] = {k: rounds[-1].get(k) for k in ("round", "attested",
                                                               "quarantined", "accuracy_mean")}
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
    report = _read_report(run_dir / "report.json")
    if report is not None:
        return web.json_response({**run_summary(run_dir), "report": report})
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
async def list_receipts(request: web.Request) -> web.Response:
    """The chain's entries in brief; each names the round and its verdicts."""
    entries = await asyncio.to_thread(chain_entries, _run_dir(request))
    listed = []
    for entry in entries[-MAX_LISTED_ENTRIES:]:
        body = entry["body"]
        listed.append({"seq": entry.get("seq"), "kind": entry.get("kind"),
                       "time": entry.get("time"), "hash": entry["hash"],
                       "round": body.get("round"), "attested": body.get("attested"),
                       "quarantined": body.get("quarantined"), "status": body.get("status")})
    return web.json_response({"entries": len(entries), "receipts": listed})


@requires(READ)
async def get_receipt(request: web.Request) -> web.Response:
    """One entry of the chain as it was signed (with its signature and line hash)."""
    seq = request.match_info["seq"]
    entries = await asyncio.to_thread(chain_entries, _run_dir(request))
    if not seq.isdigit() or len(seq) > 12 or int(seq) >= len(entries):
        raise web.HTTPNotFound(text=json.dumps({"error": f"no audit entry {seq[:20]}"}),
                               content_type="application/json")
    return web.json_response(entries[int(seq)])


def last_seen(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Per site, from the latest signed round receipt that names it (latest runs only):
    when, in which run and round, its verdict, measurement and TCB."""
    seen: dict[str, dict[str, Any]] = {}
    if not runs_dir.exists():
        return seen
    dirs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for run_dir in dirs[-RECENT_RUNS:]:
        for entry in chain_entries(run_dir):
            body = entry["body"]
            if entry.get("kind") != "round-receipt" or not isinstance(body.get("sites"), dict):
                continue
            when = entry.get("time") if isinstance(entry.get("time"), (int, float)) else 0.0
            for site, info in body["sites"].items():
                if not isinstance(info, dict) or (site in seen and seen[site]["time"] > when):
                    continue
                seen[site] = {"time": when, "run_id": body.get("run_id"),
                              "run_dir": run_dir.name, "round": body.get("round"),
                              "seq": entry.get("seq"), "admitted": info.get("admitted"),
                              "reason": info.get("reason"), "refusal": info.get("refusal"),
                              "measurement": info.get("measurement"), "tcb": info.get("tcb"),
                              "tcb_status": info.get("tcb_status"),
                              "epsilon_run": info.get("epsilon_run")}
    return seen


async def superlink_nodes(app: web.Application) -> tuple[list[dict[str, Any]], str | None]:
    """The SuperLink's nodes (a ``flwr`` call, about a second of CPU), asked at most every
    NODES_TTL seconds however many dashboards poll; (nodes, error)."""
    cache = app[NODES_KEY]
    async with cache.lock:
        if cache.at is None or time.monotonic() - cache.at > NODES_TTL:
            try:
                cache.nodes = await asyncio.to_thread(app[CONTROL_KEY].list_nodes)  # type: ignore[attr-defined]
                cache.error = None
            except CleanroomError as exc:
                cache.nodes, cache.error = [], str(exc)
            cache.at = time.monotonic()
        return cache.nodes, cache.error


@requires(READ)
async def get_sites(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    nodes, error = await superlink_nodes(request.app)
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
    receipts = await asyncio.to_thread(last_seen, runs_dir)
    sites = []
    for site in config.sites:
        node_id = node_ids.get(site.name)
        node = by_id.get(str(node_id), {})
        seen = receipts.get(site.name)
        waiting = seen is not None and seen.get("refusal") in APPROVAL_REFUSALS
        sites.append({"site": site.name, "node_id": node_id,
                      "status": node.get("status", "unknown"),
                      "latest_attestation": latest.get(site.name),
                      "last_receipt": seen,
                      "last_seen": seen["time"] if seen else None,
                      "awaiting_approval": {"run_id": seen["run_id"],
                                            "refusal": seen["refusal"]}
                      if waiting and seen is not None else None})
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
    app[NODES_KEY] = NodeCache()
    app.router.add_get("/health", health)
    app.router.add_get("/runs", list_runs)
    app.router.add_post("/runs", submit_run)
    app.router.add_get("/runs/{run_id}", get_run)
    app.router.add_get("/runs/{run_id}/rounds", get_rounds)
    app.router.add_get("/runs/{run_id}/audit", get_audit)
    app.router.add_get("/runs/{run_id}/receipts", list_receipts)
    app.router.add_get("/runs/{run_id}/receipts/{seq}", get_receipt)
    app.router.add_post("/runs/{run_id}/stop", stop_run)
    app.router.add_get("/sites", get_sites)
    add_dashboard(app, "coordinator")
    return app
