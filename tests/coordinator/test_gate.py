"""The gate's stores and identity rules, alone."""

from __future__ import annotations

from cleanroom.coordinator.gate import NonceStore, SiteDirectory


def test_nonces_are_single_use_across_restarts(tmp_path):
    path = tmp_path / "nonces.jsonl"
    store = NonceStore(path)
    nonce = store.issue("run", 1, 7)
    store.flush()
    assert store.consume(nonce, "run", 1, 7) is None
    again = NonceStore(path)  # a restarted coordinator
    assert again.consume(nonce, "run", 1, 7) == "nonce was already used (replay)"


def test_a_nonce_is_good_only_for_its_run_round_and_node(tmp_path):
    store = NonceStore(tmp_path / "n.jsonl")
    nonce = store.issue("run", 1, 7)
    assert "not this one" in store.consume(nonce, "run", 2, 7)
    assert "not this one" in store.consume(nonce, "run", 1, 8)
    assert store.consume(bytes(32), "run", 1, 7) == "nonce was never issued by this coordinator"


def test_a_torn_last_line_is_tolerated(tmp_path):
    path = tmp_path / "n.jsonl"
    store = NonceStore(path)
    nonce = store.issue("run", 1, 7)
    with open(path, "a") as fh:
        fh.write('{"op": "iss')  # crash in the middle of a write
    assert NonceStore(path).consume(nonce, "run", 1, 7) is None


def test_the_directory_names_nodes_never_the_claim():
    strict = SiteDirectory(names={1: "alpha"})
    assert strict.label(1, "beta") == "alpha"
    assert strict.label(2, "beta") == "node-2"
    assert strict.problem(1, "alpha") is None
    assert strict.problem(1, "beta") == "identity: node 1 is registered as 'alpha', not 'beta'"
    assert strict.problem(2, "beta") == "identity: node 2 is not a registered site"
    loose = SiteDirectory(strict=False)
    assert loose.label(2, "beta") == "beta" and loose.problem(2, "beta") is None


def test_a_phase_is_judged_in_order_and_durable_before_any_admission_returns(
        tmp_path, sim_root, monkeypatch):
    """admit_phase: every answer of the phase by the gate in one call, then both stores
    flushed, and only then the admissions handed back (an empty phase flushes too: the
    nonces it issued, the watermarks the last round's reports advanced)."""
    from cleanroom.coordinator.gate import refused
    from tests import fakes

    gate = fakes.gate(tmp_path, sim_root, {1: "alpha", 2: "beta"})
    calls: list[object] = []
    monkeypatch.setattr(gate, "admit", lambda node_id, *rest: calls.append(node_id)
                        or refused(node_id, f"judged {node_id}"))
    monkeypatch.setattr(gate.nonces, "flush", lambda: calls.append("nonces"))
    monkeypatch.setattr(gate.watermarks, "flush", lambda: calls.append("watermarks"))
    admissions = gate.admit_phase([(2, None, None, b"", b""), (1, None, None, b"", b"")])
    assert [a.reason for a in admissions] == ["judged 2", "judged 1"]
    assert calls == [2, 1, "nonces", "watermarks"]
    calls.clear()
    assert gate.admit_phase([]) == [] and calls == ["nonces", "watermarks"]
