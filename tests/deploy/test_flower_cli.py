"""FlowerCli.register on a coordinator restart: the SuperLink's database keeps registrations,
and flwr 1.42 answers a second registration of a key with exit status 0 and
``{"success": false, ...}``: the known node id is kept, anything else is an error."""

from __future__ import annotations

import pytest

from cleanroom.coordinator.flower_cli import FlowerCli
from cleanroom.process import DaemonError

ALREADY = ('✗ error\n{"success": false, "error-message": "Public key already in use while '
           'registering node"}')


def _cli(tmp_path, monkeypatch, code: int, out: str) -> FlowerCli:
    cli = FlowerCli(tmp_path / "home", "127.0.0.1:1", tmp_path / "ca.pem", {})
    monkeypatch.setattr(cli, "_run", lambda *args, **kw: (code, out))
    return cli


def test_a_new_key_gets_its_node_id(tmp_path, monkeypatch):
    cli = _cli(tmp_path, monkeypatch, 0, 'ok\n{"success": true, "node-id": 42}')
    assert cli.register(tmp_path / "k.pub", "cleveland", {}) == 42


@pytest.mark.parametrize("code", [0, 1])
def test_a_key_registered_before_keeps_its_node_id(tmp_path, monkeypatch, code):
    cli = _cli(tmp_path, monkeypatch, code, ALREADY)
    assert cli.register(tmp_path / "k.pub", "cleveland", {"cleveland": 7}) == 7
    with pytest.raises(DaemonError, match="cannot register site 'hungary'"):
        cli.register(tmp_path / "k.pub", "hungary", {"cleveland": 7})  # not one we know


def test_a_failure_without_a_node_id_is_an_error(tmp_path, monkeypatch):
    cli = _cli(tmp_path, monkeypatch, 0, '{"success": false, "error-message": "boom"}')
    with pytest.raises(DaemonError, match="boom"):
        cli.register(tmp_path / "k.pub", "cleveland", {"cleveland": 7})


RUNS = ('📄 Listing all runs...\n{\n  "success": true,\n  "runs": [\n    {"run-id": "11", '
        '"status": "running"},\n    {"run-id": "12", "status": "finished:completed"}\n  ]\n}\n')


def test_runs_are_read_past_warnings_flwr_prints_around_its_json(tmp_path, monkeypatch):
    """stdout and stderr are read together: a warning on stderr after the JSON (a
    dependency's DeprecationWarning) made the answer unparseable, and it was taken for 'no
    runs': the restart then stopped no orphaned run."""
    noisy = RUNS + "/x/site.py:1: DeprecationWarning: {deprecated} thing\n  import y\n"
    cli = _cli(tmp_path, monkeypatch, 0, "UserWarning: {a} b\n" + noisy)
    assert [r["run-id"] for r in cli.list_runs()] == ["11", "12"]


@pytest.mark.parametrize("out", [
    "", "garbage", "{truncated", '{"success": true, "runs": {"11": "running"}}',
    '{"success": true}', '{"success": true, "runs": ["11"]}',
    '{"success": true, "runs": [{"run-id": "eleven", "status": "running"}]}',
    '{"success": true, "runs": [{"run-id": "11"}]}',
    '{"success": true, "runs": [{"run-id": "-1", "status": "running"}]}',
    '{"success": "false", "runs": []}',
])
def test_a_malformed_runs_answer_is_refused_not_taken_for_no_runs(tmp_path, monkeypatch, out):
    with pytest.raises(DaemonError, match="flwr ls"):
        _cli(tmp_path, monkeypatch, 0, out).list_runs()


def test_a_restart_does_not_open_while_an_orphaned_run_could_not_be_stopped():
    """'flwr stop' failing (its status is not checked) must not leave the run's messages
    to reach the reconnecting SuperNodes: the daemon stops, naming the run."""
    from cleanroom.coordinator.daemon import stop_orphaned_runs

    class Stubborn:
        def __init__(self) -> None:
            self.stopped: list[int] = []

        def list_runs(self) -> list[dict[str, str]]:
            return [{"run-id": "11", "status": "running"},
                    {"run-id": "12", "status": "finished:completed"}]

        def stop(self, run_id: int) -> None:
            self.stopped.append(run_id)  # and nothing changes

    cli = Stubborn()
    with pytest.raises(DaemonError, match=r"run\(s\) \[11\] .* could not be stopped"):
        stop_orphaned_runs(cli)  # type: ignore[arg-type]
    assert cli.stopped == [11]
