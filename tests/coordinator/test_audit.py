"""The audit chain: intact logs verify; every kind of tampering is named at the right entry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.coordinator.audit import AuditLog, public_key_hex, read_entries, verify_chain
from cleanroom.errors import AuditChainError


@pytest.fixture()
def key():
    return ed25519.Ed25519PrivateKey.generate()


def make_log(path, key, n=5):
    log = AuditLog(path, key)
    log.append("run-start", {"coordinator_public_key": public_key_hex(key), "run_id": "1"})
    for i in range(1, n):
        log.append("round-receipt", {"round": i, "aggregate_sha256": f"{i:064x}"})
    return log


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_intact_log_verifies(tmp_path, key):
    log = make_log(tmp_path / "a.jsonl", key)
    result = verify_chain(tmp_path / "a.jsonl", key.public_key())
    assert result.ok and result.entries == 5 and result.head == log.head
    assert verify_chain(tmp_path / "a.jsonl").ok  # key taken from the first entry


def test_changed_byte_detected_at_that_entry(tmp_path, key):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    ls = lines(path)
    ls[2] = ls[2].replace(b'"round":2', b'"round":9')
    path.write_bytes(b"".join(ls))
    result = verify_chain(path, key.public_key())
    assert not result.ok and result.first_bad == 2 and "signature" in result.reason


@pytest.mark.parametrize(("edit", "bad"), [
    (lambda ls: ls[:2] + ls[3:], 2),                    # removed
    (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 1),     # reordered
    (lambda ls: [*ls[:3], ls[3], *ls[3:]], 4),          # duplicated / inserted
])
def test_structural_tampering_named(tmp_path, key, edit, bad):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    path.write_bytes(b"".join(edit(lines(path))))
    result = verify_chain(path, key.public_key())
    assert not result.ok and result.first_bad == bad, result


def test_forged_entry_with_other_key_detected(tmp_path, key):
    path = tmp_path / "a.jsonl"
    make_log(path, key, n=3)
    forger = ed25519.Ed25519PrivateKey.generate()
    log_copy = tmp_path / "b.jsonl"
    log_copy.write_bytes(path.read_bytes())
    # the forger cannot append to the real chain: AuditLog refuses a key that does not verify
    with pytest.raises(AuditChainError):
        AuditLog(log_copy, forger)


def test_removed_tail_caught_by_head_anchor(tmp_path, key):
    path = tmp_path / "a.jsonl"
    log = make_log(path, key)
    anchor = log.head
    path.write_bytes(b"".join(lines(path)[:-1]))
    assert verify_chain(path, key.public_key()).ok  # a shorter chain is self-consistent...
    result = verify_chain(path, key.public_key(), expected_head=anchor)
    assert not result.ok and "anchor" in result.reason  # ...but not the anchored one


def test_wrong_key_detected(tmp_path, key):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    result = verify_chain(path, other)
    assert not result.ok and result.first_bad == 0


def test_torn_last_line_recovered_on_restart(tmp_path, key):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    assert not verify_chain(path, key.public_key()).ok
    log = AuditLog(path, key)
    assert log.recovered_torn_line and log.seq == 4
    log.append("round-receipt", {"round": 4})
    assert verify_chain(path, key.public_key()).ok
    assert [e["seq"] for e in read_entries(path)] == [0, 1, 2, 3, 4]


def test_cli_verify_and_show(tmp_path, key):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    keyfile = tmp_path / "k.hex"
    keyfile.write_text(public_key_hex(key))
    ok = subprocess.run([sys.executable, "-m", "cleanroom", "audit", "verify",
                         str(path), "--key", str(keyfile)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "intact: 5 entries" in ok.stdout
    ls = lines(path)
    entry = json.loads(ls[3])
    entry["body"]["round"] = 99
    ls[3] = json.dumps(entry).encode() + b"\n"
    path.write_bytes(b"".join(ls))
    bad = subprocess.run([sys.executable, "-m", "cleanroom", "audit", "verify",
                          str(path), "--key", str(keyfile)], capture_output=True, text=True)
    assert bad.returncode == 1 and "entry 3" in bad.stdout
    shown = subprocess.run([sys.executable, "-m", "cleanroom", "audit", "show",
                            str(path)], capture_output=True, text=True)
    assert shown.returncode == 0 and "round-receipt" in shown.stdout


@pytest.fixture
def cli(capsys):
    """``cleanroom audit ...`` in process: (exit code, stdout, stderr)."""
    from types import SimpleNamespace

    from cleanroom.cli import main

    def run(*args: str):
        code = main(["audit", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_cli_never_says_intact_without_the_expected_key(tmp_path, key, cli):
    """A chain re-signed by a forger is consistent with the key it names itself: without
    --key the CLI says so and exits 2, never 0."""
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    out = cli("verify", str(path))
    assert out.returncode == 2, out.stdout
    assert "NOT verified" in out.stdout and "authorship not verified" in out.stdout
    as_json = json.loads(cli("verify", str(path), "--json").stdout)
    assert as_json["ok"] is False and as_json["consistent"] is True
    assert as_json["key_checked"] is False


def test_cli_warns_that_truncation_needs_a_head(tmp_path, key, cli):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    keyfile = tmp_path / "k.hex"
    keyfile.write_text(public_key_hex(key))
    path.write_bytes(b"".join(lines(path)[:-2]))  # trailing entries removed
    out = cli("verify", str(path), "--key", str(keyfile))
    assert out.returncode == 0
    assert "no head given: truncation not detectable" in out.stdout
    head = verify_chain(path, key.public_key()).head
    anchored = cli("verify", str(path), "--key", str(keyfile), "--head", "0" * 64)
    assert anchored.returncode == 1 and "entries removed from the end" in anchored.stdout
    assert cli("verify", str(path), "--key", str(keyfile), "--head", head).returncode == 0


@pytest.mark.parametrize("body", ['"a string"', "[1, 2]", "null", "7"])
def test_an_entry_whose_body_is_not_an_object_is_named_not_a_traceback(tmp_path, key, body,
                                                                       cli):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    ls = lines(path)
    entry = json.loads(ls[0])
    ls[0] = json.dumps({**entry, "body": json.loads(body)}).encode() + b"\n"
    path.write_bytes(b"".join(ls))
    keyfile = tmp_path / "k.hex"
    keyfile.write_text(public_key_hex(key))
    for args in (("verify", str(path), "--key", str(keyfile)), ("verify", str(path))):
        out = cli(*args)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "field 'body' is missing or not dict" in out.stdout
    shown = cli("show", str(path))
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert "entry 0" in shown.stderr


def test_unusable_inputs_exit_2_with_one_line(tmp_path, key, cli):
    path = tmp_path / "a.jsonl"
    make_log(path, key)
    for args in (("verify", str(path), "--key", str(tmp_path)),  # a folder as the key
                 ("verify", str(tmp_path), "--key", public_key_hex(key)),  # a folder chain
                 ("verify", str(path), "--key", "not-hex")):
        out = cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")


def test_an_endless_file_is_refused_quickly(tmp_path, key, cli):
    out = cli("verify", "/dev/urandom", "--key", public_key_hex(key))
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr
