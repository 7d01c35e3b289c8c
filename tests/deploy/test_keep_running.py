"""``cleanroom deploy-local --keep-running``: the federation stays up after the run, the
dashboards and token files are printed, and SIGTERM (or Ctrl-C) stops every process; a
SIGTERM during the run stops them too. The daemons are stand-ins (a sleeping child process)
so this runs in seconds; tests/browser starts the real ones with the same functions."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from cleanroom.cli import main
from cleanroom.coordinator.provision import Provisioned
from cleanroom.simulations import deploy_local_cli as dl


@pytest.fixture()
def fake_federation(monkeypatch, tmp_path):
    started: list = []

    def provision_local(plan, rounds, task=None):
        provisioned_calls.append((task, plan.names))
        tokens = {"coordinator-operator": plan.out / "coordinator" / "operator.token",
                  "coordinator-auditor": plan.out / "coordinator" / "auditor.token"}
        tokens.update({f"{n}-operator": plan.out / "sites" / n / "operator.token"
                       for n in plan.names})
        return Provisioned(plan.out, plan.out / "coordinator" / "coordinator.toml",
                           {n: plan.out / "sites" / n / "site.toml" for n in plan.names},
                           tokens)

    def start_local(plan, prov, sup, timeout=120.0):
        started.append(sup.start("coordinator", [sys.executable, "-c",
                                                 "import time; time.sleep(300)"]))

    monkeypatch.setattr(dl, "provision_local", provision_local)
    monkeypatch.setattr(dl, "start_local", start_local)
    return started


provisioned_calls: list = []  # (task, site names) of each provision_local call


def sigterm_soon(delay: float = 0.3) -> None:
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()


def test_keep_running_holds_until_sigterm(fake_federation, monkeypatch, tmp_path, capsys):
    runs = []
    monkeypatch.setattr("cleanroom.coordinator.cli.run.submit_and_follow",
                        lambda *args: runs.append(args) or 0)
    real_hold = dl.hold
    held = []

    def hold(sup, stop, say=print):
        held.append(time.monotonic())
        sigterm_soon()
        real_hold(sup, stop, say)

    monkeypatch.setattr(dl, "hold", hold)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["deploy-local", "--sites", "2", "--out", str(tmp_path / "fed"),
                 "--keep-running", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and len(runs) == 1 and held
    assert "the federation stays up" in out
    assert "consortium dashboard  http://127.0.0.1:" in out
    assert str(tmp_path / "fed" / "coordinator" / "operator.token") in out
    assert "site cleveland dashboard  http://127.0.0.1:" in out
    assert str(tmp_path / "fed" / "sites" / "hungary" / "operator.token") in out
    assert "stopped every process" in out.split("Ctrl-C or SIGTERM stops every process")[1]
    assert fake_federation[0].poll() is not None  # the daemon was stopped
    assert signal.getsignal(signal.SIGTERM) == before


def test_keep_running_ends_when_a_daemon_dies(fake_federation, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("cleanroom.coordinator.cli.run.submit_and_follow", lambda *args: 0)

    real_hold = dl.hold

    def hold(sup, stop, say=print):
        fake_federation[0].kill()
        real_hold(sup, stop, say)

    monkeypatch.setattr(dl, "hold", hold)
    assert main(["deploy-local", "--out", str(tmp_path / "fed"), "--keep-running",
                 "--no-progress"]) == 0
    assert "a daemon stopped: coordinator exited" in capsys.readouterr().out


def test_sigterm_during_the_run_stops_every_process(fake_federation, monkeypatch, tmp_path,
                                                    capsys):
    def submit_and_follow(*args):
        sigterm_soon(0.1)
        time.sleep(30)  # interrupted by the SIGTERM
        raise AssertionError("not interrupted")

    monkeypatch.setattr("cleanroom.coordinator.cli.run.submit_and_follow", submit_and_follow)
    started = time.monotonic()
    code = main(["deploy-local", "--out", str(tmp_path / "fed"), "--no-progress"])
    assert code == 130 and time.monotonic() - started < 20
    assert "stopped every process" in capsys.readouterr().out
    assert fake_federation[0].poll() is not None


def test_dashboard_lines_name_files_not_tokens(tmp_path):
    plan = dl.plan_local(tmp_path / "fed", ["a", "bb"])
    prov = Provisioned(plan.out, Path("c.toml"), {}, {
        "coordinator-operator": Path("/f/op.token"), "coordinator-auditor": Path("/f/au.token"),
        "a-operator": Path("/f/a.token"), "bb-operator": Path("/f/bb.token")})
    lines = dl.dashboard_lines(plan, prov)
    assert lines[0] == (f"consortium dashboard  {plan.coordinator_url}  token: /f/op.token "
                        "(read-only: /f/au.token)")
    assert lines[1] == f"site a  dashboard  {plan.site_url('a')}  token: /f/a.token"
    assert len({plan.api_port, plan.control_port,
                *(p for pair in plan.site_ports.values() for p in pair)}) == 6


def test_deploy_local_task_runs_a_users_app_on_site_names(fake_federation, monkeypatch,
                                                         tmp_path, capsys):
    """--task: sites site00..., a task folder whose app takes no run options gets none (its
    ServerApp decides); an unknown task is one line."""
    from pathlib import Path as _Path

    runs = []
    monkeypatch.setattr("cleanroom.coordinator.cli.run.submit_and_follow",
                        lambda *args: runs.append(args) or 0)
    app = str(_Path(__file__).resolve().parents[2] / "examples" / "quickstart-confidential")
    provisioned_calls.clear()
    assert main(["deploy-local", "--task", app, "--sites", "3", "--out",
                 str(tmp_path / "fed"), "--no-progress"]) == 0
    assert provisioned_calls == [(app, ("site00", "site01", "site02"))]
    assert runs[0][1] == {}  # no options for an app that does not declare them
    assert "does not take run options" in capsys.readouterr().out
    assert main(["deploy-local", "--task", "no-such-task", "--out", str(tmp_path / "f2"),
                 "--no-progress"]) == 2
    assert "not a folder and not an installed task" in capsys.readouterr().err
