"""End-to-end simulation: hostile sites quarantined every round; nothing plaintext leaks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cleanroom.protocol.flower import arrays_to_numpy
from cleanroom.simulations.engine import SimulationConfig, run_simulation

pytestmark = pytest.mark.slow

FAST = {"rounds": 2, "local_steps": 5, "tracking": False, "progress": False}


def simulate(tmp_path: Path, **kw) -> dict:
    config = SimulationConfig(out=tmp_path / "out", **{**FAST, **kw})
    return run_simulation(config).report


@pytest.mark.parametrize(("scenario", "needle"), [
    ("tampered-site", "attestation: measurement: MEASUREMENT"),
    ("replayed-evidence", "attestation: report_data"),
    ("forged-evidence", "attestation: signature"),
    ("debug-enclave", "attestation: debug"),
    ("over-budget", "privacy budget"),
    ("poisoned-update", "update rejected: update norm "),
])
def test_hostile_site_quarantined_every_round(tmp_path, scenario, needle):
    report = simulate(tmp_path, scenario=scenario, hostile_site="hungary")
    assert len(report["rounds"]) == 2
    for entry in report["rounds"]:
        assert set(entry["quarantined"]) == {"hungary"}, entry["quarantined"]
        assert entry["quarantined"]["hungary"].startswith(needle)
        assert entry["attested"] == ["cleveland", "switzerland", "va"]
        assert set(entry["metrics"]) == {"cleveland", "switzerland", "va"}
        assert entry["aggregate_digest"] is not None  # training went on with the others
    assert report["final"]["accuracy_mean"] is not None


def test_honest_run_report_contract(tmp_path):
    report = simulate(tmp_path)
    assert {"rounds", "final", "mlflow", "audit_log"} <= set(report)
    for n, entry in enumerate(report["rounds"], start=1):
        assert entry["round"] == n and entry["quarantined"] == {}
        assert entry["attested"] == ["cleveland", "hungary", "switzerland", "va"]
        accs = [m["accuracy"] for m in entry["metrics"].values()]
        assert entry["accuracy_mean"] == pytest.approx(sum(accs) / len(accs))
        assert all(0 < e <= 1.0 + 1e-6 for e in entry["epsilon"].values())
    final_eps = report["final"]["epsilon"]
    assert all(0.5 < e <= 1.0 + 1e-6 for e in final_eps.values()), final_eps
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "model_card.md").read_text().startswith("# Model card")


class CapturingInner:
    """Records the plaintext the coordinator handles, to prove none of it crossed the wire."""

    def __init__(self) -> None:
        self.plaintexts: list[bytes] = []
        self.updates: list[bytes] = []  # the sites' individual updates only

    def grab(self, arrays, *, update: bool = False) -> None:
        for value in arrays_to_numpy(arrays).values():
            data = np.ascontiguousarray(value).tobytes()
            if len(data) >= 16:
                self.plaintexts.append(data)
                if update:
                    self.updates.append(data)


def test_no_plaintext_model_or_update_on_the_wire(tmp_path, monkeypatch, caplog):
    """Without an attested aggregator (the coordinator's process opens updates): every
    message is serialised to Flower's wire format; no float bytes of the global model or of
    any update appear in them, nor in logs, the out folder or MLflow."""
    from cleanroom.coordinator import strategy as strategy_module
    from cleanroom.simulations import inprocess

    wire: list[bytes] = []
    original_init = inprocess.InProcessGrid.__init__

    def tapped_init(self, *a, **kw):
        original_init(self, *a, **kw)
        self.tap = lambda direction, node, data: wire.append(data)

    monkeypatch.setattr(inprocess.InProcessGrid, "__init__", tapped_init)
    capture = CapturingInner()
    original_cfg = strategy_module.ConfidentialStrategy.configure_train
    original_agg = strategy_module.ConfidentialStrategy.aggregate_train

    def cfg(self, server_round, arrays, config, grid):
        capture.grab(arrays)
        return original_cfg(self, server_round, arrays, config, grid)

    def agg(self, server_round, replies):
        replies = list(replies)
        wrapped_inner = self.inner.aggregate_train

        def inner_agg(rnd, plain):
            plain = list(plain)
            for msg in plain:
                for record in msg.content.array_records.values():
                    capture.grab(record, update=True)
            return wrapped_inner(rnd, plain)

        self.inner.aggregate_train = inner_agg
        try:
            return original_agg(self, server_round, replies)
        finally:
            self.inner.aggregate_train = wrapped_inner

    monkeypatch.setattr(strategy_module.ConfidentialStrategy, "configure_train", cfg)
    monkeypatch.setattr(strategy_module.ConfidentialStrategy, "aggregate_train", agg)
    caplog.set_level(logging.DEBUG)
    report = simulate(tmp_path, tracking=True, aggregator=False)

    assert len(capture.plaintexts) >= 2 * (1 + 4), "global models and updates were captured"
    assert wire, "messages went through the wire tap"
    for blob in capture.plaintexts:
        assert not any(blob in message for message in wire), "plaintext parameters on the wire"
    logs = caplog.text.encode()
    final = np.load(tmp_path / "out" / "final_model.npz")
    final_bytes = {np.ascontiguousarray(final[k]).tobytes() for k in final.files}
    for blob in (b for b in capture.plaintexts if b not in final_bytes):
        assert blob not in logs and blob.hex().encode() not in logs
    updates = capture.updates
    assert updates, "site updates were captured"
    # no site update anywhere in what the coordinator writes or tracks (aggregates, i.e. the
    # global models in checkpoints and the final model, are the coordinator's own artefacts;
    # a site's individual update is not)
    out = tmp_path / "out"
    for path in out.rglob("*"):
        if path.is_file() and "sites" not in path.parts:
            data = path.read_bytes()
            for blob in updates:
                assert blob not in data, f"update bytes found in {path}"
    assert report["mlflow"]["run_id"]


def _site_updates(monkeypatch) -> list[bytes]:
    """Every site's trained parameters, captured at the site (float bytes per tensor)."""
    from cleanroom.site_agent import session

    captured: list[bytes] = []
    original = session.seal_update

    def tapped(arrays, *args, **kwargs):
        captured.extend(np.ascontiguousarray(v).tobytes() for v in arrays.values()
                        if np.asarray(v).nbytes >= 16)
        return original(arrays, *args, **kwargs)

    monkeypatch.setattr(session, "seal_update", tapped)
    return captured


@pytest.mark.parametrize("isolation", ["process", "inprocess"])
def test_no_single_update_is_decryptable_outside_the_aggregator_enclave(tmp_path, monkeypatch,
                                                                          caplog, isolation):
    """The leak test, extended to the attested aggregator: the operator's process relays the
    sites' sealed updates, but no key in its memory (nor the sites', which run in this
    process here) opens any of them; their plaintext is on no wire message, in no log, in
    no coordinator output; what the inner strategy sees is the aggregate only. Control: with
    the aggregator inside the operator's process, the same scan finds the key that opens
    them (the test can fail)."""
    import gc

    from cryptography.hazmat.primitives.asymmetric import x25519

    from cleanroom.coordinator import rounds as rounds_module
    from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
    from cleanroom.protocol.payload import open_update
    from cleanroom.simulations import inprocess

    wire: list[bytes] = []
    original_init = inprocess.InProcessGrid.__init__

    def tapped_init(self, *a, **kw):
        original_init(self, *a, **kw)
        self.tap = lambda direction, node, data: wire.append(data)

    monkeypatch.setattr(inprocess.InProcessGrid, "__init__", tapped_init)
    keys: list[KeyPair] = []  # every key pair this process ever makes or restores...
    for name in ("generate", "from_private_bytes"):
        original = getattr(KeyPair, name).__func__

        def recording(cls, *a, _original=original, **kw):
            pair = _original(cls, *a, **kw)
            keys.append(pair)
            return pair

        monkeypatch.setattr(KeyPair, name, classmethod(recording))
    sealed_updates = []
    original_submit = rounds_module.CoordinatorRound.submit_update
    private_type = type(x25519.X25519PrivateKey.generate())  # the backend's concrete class

    def submit(self, node_id, sealed):
        sealed_updates.append(sealed)
        if len(sealed_updates) % 4 == 1:  # ... and every X25519 key alive in it while the
            for o in gc.get_objects():  # operator holds a round's first sealed update
                if type(o) is private_type:
                    keys.append(KeyPair(o))
                elif type(o) is KeyPair:
                    keys.append(o)
        return original_submit(self, node_id, sealed)

    monkeypatch.setattr(rounds_module.CoordinatorRound, "submit_update", submit)
    updates = _site_updates(monkeypatch)
    caplog.set_level(logging.DEBUG)
    report = simulate(tmp_path, tracking=True, aggregator_isolation=isolation)

    assert [len(r["aggregated"]) for r in report["rounds"]] == [4, 4]
    assert len(sealed_updates) == 8 and updates
    keys = list({k.public_bytes: k for k in keys}.values())
    assert len(keys) >= 8, "the scan finds keys (the sites' own, at least)"
    opened = 0
    for sealed in sealed_updates:
        h = sealed.header
        context = EnvelopeContext("update", h.run_id, h.round, h.site, h.model_digest)
        for key in keys:
            try:
                open_update(sealed, key, context, None)
                opened += 1
            except Exception:  # noqa: BLE001 - any failure: the key does not fit
                continue
    if isolation == "inprocess":  # the control: nothing separates the operator from the key
        assert opened == len(sealed_updates)
        return
    assert opened == 0, "an update was decryptable in the operator's process"
    logs = caplog.text.encode()
    out_files = [p.read_bytes() for p in (tmp_path / "out").rglob("*")
                 if p.is_file() and "sites" not in p.parts]
    for blob in updates:
        assert not any(blob in message for message in wire), "update plaintext on the wire"
        assert blob not in logs and blob.hex().encode() not in logs
        assert not any(blob in data for data in out_files), "update bytes in the outputs"


def test_sites_refuse_an_unattested_aggregator_and_say_so(tmp_path):
    """--scenario unattested-coordinator: the aggregator runs code no site pins; every site
    refuses (typed) before it spends budget, the receipts record it, nothing is aggregated."""
    report = simulate(tmp_path, scenario="unattested-coordinator")
    for entry in report["rounds"]:
        assert entry["aggregated"] == [] and entry["aggregate_digest"] is None
        assert entry["quarantined"] == {}  # the sites attested fine: the coordinator did not
        assert set(entry["site_refusals"]) == {"cleveland", "hungary", "switzerland", "va"}
        for reason in entry["site_refusals"].values():
            assert reason.startswith("aggregator-attestation: ") and "MEASUREMENT" in reason
    assert all(e is None for e in report["final"]["epsilon"].values())  # no budget spent
    lines = (tmp_path / "out" / "audit.jsonl").read_text().splitlines()
    receipts = [e["body"] for e in map(json.loads, lines) if e["kind"] == "round-receipt"]
    assert len(receipts) == 2
    assert all(set(r["site_refusals"]) == {"cleveland", "hungary", "switzerland", "va"}
               and r["aggregated"] == [] for r in receipts)


def test_dropout_after_masking_completes_with_the_other_three(tmp_path):
    """--scenario dropout-after-masking: secure aggregation on; va shares its masks, then goes
    offline; each round's sum is unmasked from the other three (va's mask key rebuilt from
    their shares) and the model still trains."""
    report = simulate(tmp_path, scenario="dropout-after-masking", hostile_site="va")
    assert report["plan"]["secure_aggregation"] is True
    for entry in report["rounds"]:
        assert entry["aggregated"] == ["cleveland", "hungary", "switzerland"]
        info = entry["secure_aggregation"]
        assert info["sites"] == ["cleveland", "hungary", "switzerland", "va"]
        assert info["not_in_sum"] == ["va"] and info["threshold"] == 3
        assert entry["aggregate_digest"] is not None and "failure" not in info
    assert report["final"]["accuracy"] is not None


def test_central_dp_is_accounted_and_reported(tmp_path):
    report = simulate(tmp_path, central_epsilon=8.0, strategy="fedavg", dp=False)
    central = [r["central_epsilon"] for r in report["rounds"]]
    assert central[0] is not None and 0 < central[0] < central[1] <= 8.0 + 1e-6
    assert report["final"]["central_epsilon"] == central[1]
    card = (tmp_path / "out" / "model_card.md").read_text()
    assert "central" in card.lower()


def test_no_dataset_row_outside_the_site(tmp_path, caplog):
    from cleanroom.site_agent.data import (
        HEART_DISEASE_SITES,
        default_data_dir,
        load_heart_disease_site,
    )

    caplog.set_level(logging.DEBUG)
    simulate(tmp_path, tracking=True)
    needles: list[bytes] = []
    for site in HEART_DISEASE_SITES:
        data = load_heart_disease_site(site)
        needles += [row.tobytes() for row in data.train_x[:20]]
        needles += [np.float64(row).tobytes() for row in data.train_x[:5, 0]]
    raw_lines = (default_data_dir() / "processed.cleveland.data").read_bytes().splitlines()
    needles += [line for line in raw_lines[:20] if len(line) > 20]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"dataset row found in {path}"
    assert not any(n in caplog.text.encode() for n in needles)


def test_site_state_is_sealed(tmp_path):
    simulate(tmp_path)
    state = tmp_path / "out" / "state" / "sites" / "cleveland"
    ledger = (state / "privacy_ledger.jsonl").read_bytes()
    assert b"noise_multiplier" not in ledger and b"epsilon" not in ledger
    assert json.loads(ledger.splitlines()[0])["ct"]


def test_wire_check_would_catch_plaintext(tmp_path, monkeypatch):
    """Control for the test above: the plaintext baseline does put model bytes on the wire."""
    from cleanroom.models import build_model, get_parameters
    from cleanroom.simulations import inprocess

    wire: list[bytes] = []
    original_init = inprocess.InProcessGrid.__init__

    def tapped_init(self, *a, **kw):
        original_init(self, *a, **kw)
        self.tap = lambda direction, node, data: wire.append(data)

    monkeypatch.setattr(inprocess.InProcessGrid, "__init__", tapped_init)
    simulate(tmp_path, confidential=False, rounds=1)
    initial = get_parameters(build_model("logreg", seed=0))
    weight = np.ascontiguousarray(initial["linear.weight"]).tobytes()
    assert any(weight in message for message in wire)


def test_next_round_attested_with_the_evaluation(tmp_path, monkeypatch):
    """From round 2 on, attestation rides on the previous round's evaluation: no separate
    attestation query, and the evidence still binds a fresh nonce, the next round's model
    and a new key (the hostile-site tests above show the checks still bite)."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from cleanroom.simulations import inprocess

    types: list[tuple[str, str]] = []
    original_init = inprocess.InProcessGrid.__init__

    def tapped_init(self, *a, **kw):
        original_init(self, *a, **kw)

        def tap(direction, node, data):
            if direction == "down":
                proto = ProtoMessage()
                proto.ParseFromString(data)
                msg = message_from_proto(proto)
                types.append((msg.metadata.group_id, msg.metadata.message_type))
        self.tap = tap

    monkeypatch.setattr(inprocess.InProcessGrid, "__init__", tapped_init)
    report = simulate(tmp_path, rounds=3)
    queries = [g for g, t in types if t == "query.cleanroom_attest"]
    assert queries == ["1"] * 4, queries  # only round 1 needs a separate query per site
    assert all(r["attested"] == ["cleveland", "hungary", "switzerland", "va"]
               for r in report["rounds"])


def test_budget_running_out_mid_run_is_caught_on_the_piggybacked_attestation(tmp_path):
    from cleanroom.site_agent.ledger import epsilon_of
    from cleanroom.site_agent.settings import noise_for

    config = SimulationConfig(out=tmp_path / "probe", **FAST)
    sigma = noise_for(config.epsilon, config.delta, config.sample_rate,
                      3 * config.local_steps)
    two = epsilon_of([(sigma, config.sample_rate, config.local_steps)] * 2, config.delta)
    report = simulate(tmp_path, rounds=3, site_budget=two * 1.01)  # room for two rounds only
    assert report["rounds"][1]["quarantined"] == {}
    third = report["rounds"][2]["quarantined"]
    assert set(third) == {"cleveland", "hungary", "switzerland", "va"}
    assert all(reason.startswith("privacy budget") for reason in third.values())


def test_flower_simulation_runtime_backend_with_a_hostile_site(tmp_path):
    """The same run on Flower's own simulation runtime (Ray): ClientApps in Ray workers, the
    confidential mod in them, the hostile site still quarantined, training completed."""
    report = simulate(tmp_path, backend="ray", scenario="forged-evidence",
                      hostile_site="va", local_steps=1)
    assert len(report["rounds"]) == 2
    for entry in report["rounds"]:
        assert entry["attested"] == ["cleveland", "hungary", "switzerland"]
        assert entry["quarantined"]["va"].startswith("attestation: signature")
        assert entry["aggregate_digest"] is not None
    assert 0.5 < report["final"]["accuracy_mean"] <= 1.0
