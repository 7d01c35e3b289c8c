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
