"""Submit a run to a running coordinator and follow it to the end (``cleanroom run``)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanroom.coordinator.api import read_progress
from cleanroom.coordinator.daemon import RunControl
from cleanroom.process import DaemonError

OUTPUTS = ("report.json", "report.png", "model_card.md", "model_card.json", "audit.jsonl",
           "final_model.npz", "progress.jsonl")
STATUS_EVERY = 8.0  # seconds between `flwr ls` calls (each costs ~1 s of CPU)


@dataclass
class RunResult:
    run_id: int
    status: str
    report: dict[str, Any] | None
    out: Path
    details: str = ""


def follow(control: RunControl, run_id: int, out: Path, *, timeout: float = 3600.0,
           on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Wait for ``run_id`` to finish; copy its outputs into ``out``."""
    run_dir = control.config.runs_dir() / str(run_id)
    deadline = time.monotonic() + timeout
    seen = 0
    status, details, last_check = "pending", "", 0.0
    while time.monotonic() < deadline:
        rounds = read_progress(run_dir)
        for entry in rounds[seen:]:
            if on_round is not None:
                on_round(entry)
        seen = len(rounds)
        if time.monotonic() - last_check > STATUS_EVERY or (run_dir / "report.json").exists():
            info = control.cli.status(run_id)
            status, details = str(info.get("status", "")), str(info.get("status-details", ""))
            last_check = time.monotonic()
            if status.startswith("finished"):
                break
        time.sleep(0.5)
    else:
        control.stop(run_id)
        raise DaemonError(f"run {run_id} did not finish within {timeout:.0f}s (stopped)")
    for entry in read_progress(run_dir)[seen:]:
        if on_round is not None:
            on_round(entry)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, out / name)
    report = None
    if (out / "report.json").exists() and status == "finished:completed":
        report = json.loads((out / "report.json").read_text())
        report["audit_log"] = str(out / "audit.jsonl")
        report["model_card"] = str(out / "model_card.md")
        report.setdefault("run_id", str(run_id))  # the protocol's (a resumed run keeps its)
        report["flower_run_id"] = str(run_id)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if status != "finished:completed" and not details:
        details = control.cli.logs(run_id)[-2000:]
    return RunResult(run_id, status, report, out, details)
