"""The guides' commands are real: every `cleanroom` command in them parses with the CLI, and
the offline ones run, in order, in a scratch folder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cleanroom.cli import build_parser, main

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = ("operator-guide.md", "hospital-it-guide.md")
LONG_RUNNING = {"coordinator", "run", "deploy-local"}


def commands() -> list[str]:
    found = []
    for guide in GUIDES:
        for block in re.findall(r"```sh\n(.*?)```", (DOCS / guide).read_text(), re.S):
            found += [line.strip() for line in block.splitlines()
                      if line.strip().startswith("cleanroom ")]
    return found


def test_guides_have_commands():
    names = {shlex.split(c)[1] for c in commands()}
    assert {"provision", "coordinator", "site", "run", "deploy-local", "audit"} <= names


@pytest.mark.parametrize("command", commands())
def test_command_parses(command):
    build_parser().parse_args(shlex.split(command)[1:])


def test_offline_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = 0
    # a hospital generates its key before the consortium provisions with it
    ordered = sorted(commands(), key=lambda c: 0 if " keygen " in c else 1)
    for command in ordered:
        argv = shlex.split(command)[1:]
        daemon = argv[0] == "site" and argv[1].startswith("--")
        if argv[0] in LONG_RUNNING or daemon or argv[0] == "audit":
            continue
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, f"{command}: {out.err}"
        ran += 1
    assert ran >= 6
    assert (tmp_path / "fed2" / "coordinator" / "sites" / "va.pub").read_bytes() == \
        (tmp_path / "keys" / "node_auth.pub").read_bytes()
