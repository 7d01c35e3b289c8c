"""What 'cleanroom run' submits for a task's Flower App: our run options only to an app that
declares them; a user's own app (its ServerApp decides) refuses options that would be
silently ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cleanroom.coordinator.daemon import RunControl, app_takes_options
from cleanroom.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class FakeCli:
    def __init__(self) -> None:
        self.submitted: list[tuple[Path, dict]] = []

    def submit(self, app_dir: Path, run_config: dict) -> int:
        self.submitted.append((app_dir, run_config))
        return 7


def _control(app: Path) -> tuple[RunControl, FakeCli]:
    cli = FakeCli()
    config = SimpleNamespace(training=SimpleNamespace(task=str(app)))
    return RunControl(config, cli, app), cli  # type: ignore[arg-type]


def _user_app(tmp_path: Path) -> Path:
    app = tmp_path / "myapp"
    shutil.copytree(EXAMPLES / "quickstart-confidential", app)
    text = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text("\n".join(
        line for line in text.splitlines() if not line.startswith("options")))
    return app


def test_the_built_in_task_takes_the_run_options():
    from cleanroom.task import installed_folder

    folder = installed_folder("heart-disease")
    assert app_takes_options(folder)
    control, cli = _control(folder)
    assert control.submit({"rounds": 3, "lr": 0.1}) == 7
    assert json.loads(cli.submitted[0][1]["options"]) == {"rounds": 3, "lr": 0.1}


def test_a_user_app_without_options_runs_as_its_serverapp_says(tmp_path):
    app = _user_app(tmp_path)
    assert not app_takes_options(app)
    control, cli = _control(app)
    assert control.submit({}) == 7 and cli.submitted == [(app, {})]


def test_options_a_user_app_would_ignore_are_refused(tmp_path):
    control, cli = _control(_user_app(tmp_path))
    with pytest.raises(ConfigError, match=r"does not declare 'options'.*local_steps, lr, rounds"):
        control.submit({"rounds": 2, "lr": 0.5, "local_steps": 20})
    assert cli.submitted == []


def test_an_unreadable_pyproject_is_a_config_error(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr\n")
    with pytest.raises(ConfigError, match=r"pyproject\.toml"):
        app_takes_options(tmp_path)


def test_a_run_whose_rounds_aggregated_nothing_says_so(monkeypatch, tmp_path, capsys):
    """'completed' alone would hide rounds in which the model did not move."""
    from cleanroom.coordinator.cli import run as run_cli

    control = SimpleNamespace(config=SimpleNamespace(training=SimpleNamespace(rounds=2)),
                              submit=lambda options: 5)
    report = {"final": {"accuracy_mean": None}, "config": {"rounds": 2},
              "rounds": [{"round": 1, "aggregated": [], "quarantined": {}},
                         {"round": 2, "aggregated": ["a", "b"], "quarantined": {}}]}
    monkeypatch.setattr("cleanroom.coordinator.daemon.control_for", lambda config: control)
    monkeypatch.setattr("cleanroom.coordinator.submit.follow", lambda *a, **k: SimpleNamespace(
        status="finished:completed", report=report, details=""))
    assert run_cli.submit_and_follow(tmp_path / "c.toml", {}, tmp_path, 10, False) == 0
    captured = capsys.readouterr()
    assert "completed" in captured.out
    assert "1 of 2 round(s) aggregated no update (rounds 1)" in captured.err
