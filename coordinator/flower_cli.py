"""Thin adapter over Flower's ``flwr`` command (1.41): connection config, node registration,
run submission and status. Flower specifics stay here.

Facts this relies on (verified, docs/notes/flower-deployment.md): ``flwr`` reads
``$FLWR_HOME/config.toml``; ``flwr supernode register`` takes the OpenSSH public key and assigns
the node id; ``flwr run --stream`` exits 0 even when the run fails, so the outcome is read with
``flwr ls --run-id ID --format json``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from cleanroom.process import FLOWER_ENV, DaemonError

CONNECTION = "cleanroom"
TERMINAL = ("finished:completed", "finished:failed", "finished:stopped")


class FlowerCli:
    """Runs ``flwr`` with its own FLWR_HOME pointing at one SuperLink."""

    def __init__(self, home: Path, address: str, ca_cert: Path, env: dict[str, str]) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{address}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n')
        self.env = {**env, **FLOWER_ENV, "FLWR_HOME": str(self.home)}

    def _run(self, *args: str, timeout: float = 120.0) -> tuple[int, str]:
        try:
            proc = subprocess.run(["flwr", *args], capture_output=True, text=True,
                                  env=self.env, timeout=timeout, check=False)
        except FileNotFoundError:
            raise DaemonError("the 'flwr' command is not on PATH") from None
        except subprocess.TimeoutExpired:
            raise DaemonError(f"'flwr {args[0]}' did not finish in {timeout:.0f}s") from None
        return proc.returncode, proc.stdout + proc.stderr

    def _json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        code, out = self._run(*args, "--format", "json", timeout=timeout)
        doc = _json_document(out)
        if code != 0 or doc is None or doc.get("success", True) is not True:
            reason = (doc or {}).get("error-message") or out.strip()[-600:]
            raise DaemonError(f"'flwr {' '.join(args[:2])}' failed (status {code}"
                              f"{'' if doc is not None else ', no JSON answer'}): {reason}")
        return doc

    def list_nodes(self) -> list[dict[str, Any]]:
        return list(self._json("supernode", "list", CONNECTION).get("nodes", []))

    def register(self, public_key: Path, name: str, known: dict[str, int]) -> int:
        """Register a node key; a key registered before (``known``: from the coordinator's
        nodes.json, the SuperLink's database persists registrations) keeps its node id."""
        code, out = self._run("supernode", "register", str(public_key), CONNECTION,
                              "--name", name, "--format", "json")
        doc = _json_document(out) or {}
        if code == 0 and doc.get("success", True) and "node-id" in doc:
            return int(doc["node-id"])
        # flwr 1.42 exits 0 with {"success": false, ...} when the key is already registered
        if "already in use" in out and name in known:
            return known[name]
        raise DaemonError(f"cannot register site {name!r}: {out.strip()[-400:]}")

    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> int:
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        doc = self._json("run", str(app_dir), CONNECTION, "--run-config", overrides)
        return int(doc["run-id"])

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run the SuperLink knows ('run-id', 'status' such as 'running' or
        'finished:completed', ...); an answer of another shape is refused, named."""
        runs = self._json("ls", CONNECTION).get("runs")
        if not isinstance(runs, list) or not all(
                isinstance(r, dict) and isinstance(r.get("status"), str)
                and str(r.get("run-id", "")).isdigit() for r in runs):
            raise DaemonError(f"'flwr ls' answered runs of an unexpected shape: "
                              f"{str(runs)[:300]}")
        return [dict(r) for r in runs]

    def status(self, run_id: int) -> dict[str, Any]:
        runs = self._json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise DaemonError(f"run {run_id} is unknown to the SuperLink")
        return dict(runs[0])

    def stop(self, run_id: int) -> None:
        self._run("stop", str(run_id), CONNECTION)

    def logs(self, run_id: int) -> str:
        return self._run("log", str(run_id), CONNECTION, "--show", timeout=60)[1]


def _json_document(out: str) -> dict[str, Any] | None:
    """The JSON object ``flwr --format json`` printed on a line of its own (stdout comes
    first; stderr may follow with warnings), or None."""
    decoder = json.JSONDecoder()
    starts = ([0] if out.startswith("{") else []) + [m.start() + 1
                                                      for m in re.finditer(r"\n\{", out)]
    for start in starts:
        try:
            doc, _ = decoder.raw_decode(out, start)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"
