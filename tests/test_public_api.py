"""The public API as a Flower user meets it: the confidential quickstart example (a plain Flower
App plus three changed lines) runs, its ServerApp and ClientApps driven over the in-process
Grid exactly as Flower's runtime would call them (``flwr run`` itself: the slow e2e test)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from cleanroom.simulations.inprocess import InProcessGrid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_public_names_and_version():
    import cleanroom

    for name in ("ConfidentialStrategy", "ConfidentialClientApp", "ConfidentialMod", "Task",
                 "Field", "load_task", "__version__"):
        assert getattr(cleanroom, name) is not None
    with pytest.raises(AttributeError):
        _ = cleanroom.NoSuchThing


def test_constructors_say_what_is_missing():
    from flwr.serverapp.strategy import FedAvg

    from cleanroom import ConfidentialMod, ConfidentialStrategy

    with pytest.raises(ValueError, match=r"task=task"):
        ConfidentialStrategy(FedAvg())
    with pytest.raises(ValueError, match=r"flwr\.serverapp\.strategy\.Strategy"):
        ConfidentialStrategy(object(), task="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ConfidentialMod needs the app's task"):
        ConfidentialMod()


def _import_example(name: str, monkeypatch):
    folder = EXAMPLES / name
    monkeypatch.syspath_prepend(str(folder))
    for module in [m for m in sys.modules if m == "quickstart" or m.startswith("quickstart.")]:
        del sys.modules[module]
    server = importlib.import_module("quickstart.server_app")
    client = importlib.import_module("quickstart.client_app")
    return server.app, client.app


def test_confidential_quickstart_runs_with_its_own_code(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANROOM_SIMULATION_DIR", str(tmp_path / "sim"))
    monkeypatch.delenv("CLEANROOM_COORDINATOR_CONFIG", raising=False)
    server_app, client_app = _import_example("quickstart-confidential", monkeypatch)
    nodes = {100 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    grid = InProcessGrid.build(lambda _nid: client_app, nodes, run_id=7)
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"num-server-rounds": 2, "local-epochs": 1, "lr": 0.1})
    server_app(grid, context)
    reports = list((tmp_path / "sim").glob("*/runs/7/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["task"]["name"] == "quickstart-mlp"
    assert [len(r["attested"]) for r in report["rounds"]] == [4, 4]
    assert report["final"]["accuracy"] is not None
    assert all(0 < e <= 1.0 + 1e-6 for e in report["final"]["epsilon"].values())
    card = (reports[0].parent / "model_card.md").read_text()
    assert "DP-SGD" in card and "quickstart-mlp" in card


def test_the_diff_between_plain_and_confidential_is_small():
    """The three changed lines of the docs: two imports, the ClientApp, the strategy (plus
    the Task declaration in task.py)."""
    import difflib

    changed = 0
    for module in ("client_app.py", "server_app.py"):
        plain = (EXAMPLES / "quickstart-plain" / "quickstart" / module).read_text().splitlines()
        conf = (EXAMPLES / "quickstart-confidential" / "quickstart" / module).read_text() \
            .splitlines()
        changed += sum(1 for line in difflib.unified_diff(plain, conf, n=0)
                       if line.startswith("+") and not line.startswith("+++"))
    assert changed <= 6
