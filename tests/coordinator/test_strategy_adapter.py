"""The Flower adapter judges every reply on its own: whatever one site sends (an error, extra
records, a garbled envelope, a count outside the envelope), only that site is rejected for the
round; the others train and the run goes on."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from cleanroom.coordinator.run import RunRounds
from cleanroom.coordinator.strategy import ConfidentialStrategy
from cleanroom.models import build_model, get_parameters
from cleanroom.protocol.flower import ENVELOPE_RECORD, numpy_to_arrays
from cleanroom.simulations.inprocess import InProcessGrid
from cleanroom.site_agent.app import make_client_app
from tests import fakes

NAMES = {1: "alpha", 2: "beta", 3: "gamma"}


def hostile(kind: str):
    def mod(msg: Message, ctx, call_next):
        reply = call_next(msg, ctx)
        if not msg.metadata.message_type.startswith("train") or reply.has_error():
            return reply
        if kind == "extra-record":
            reply.content["metrics"] = MetricRecord({"num-examples": 10**9})
        elif kind == "garbled":
            record = reply.content.config_records[ENVELOPE_RECORD]
            payload = record["payload"]
            payload = payload[:-64] + bytes(64)  # the last chunk's end and its tag zeroed
            reply.content[ENVELOPE_RECORD] = ConfigRecord(
                {"header": record["header"], "payload": payload,
                 "wrapped_key": record["wrapped_key"]})
        elif kind == "overflow":  # a forged header whose array shape overflows
            record = reply.content.config_records[ENVELOPE_RECORD]
            reply.content[ENVELOPE_RECORD] = ConfigRecord(
                {"header": record["header"], "payload": b"\xff" * 88,
                 "wrapped_key": record["wrapped_key"]})
        elif kind == "no-envelope":
            del reply.content[ENVELOPE_RECORD]
        elif kind == "raise":
            raise RuntimeError("the site's app crashed")
        return reply
    return mod


@pytest.mark.parametrize("kind,reason", [
    ("extra-record", "unexpected record(s) ['metrics']"),
    ("garbled", "update rejected"),
    ("overflow", "update rejected"),
    ("no-envelope", "no cleanroom.envelope record"),
    ("raise", "site error: RuntimeError: the site's app crashed"),
])
def test_one_bad_reply_rejects_one_site(tmp_path, sim_root_dir, sim_root, kind, reason):
    runtimes = {nid: fakes.site(tmp_path, sim_root_dir, sim_root, name, nid)
                for nid, name in NAMES.items()}

    def app_for(node_id: int) -> ClientApp:
        return make_client_app(lambda ctx: runtimes[ctx.node_id],
                               outer_mods=[hostile(kind)] if node_id == 3 else ())

    grid = InProcessGrid.build(app_for, {nid: {} for nid in NAMES}, run_id=42)
    records = []
    strategy = ConfidentialStrategy(
        FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2),
        gate=fakes.gate(tmp_path, sim_root, NAMES), plan=fakes.plan(rounds=2),
        expected_nodes=3)
    rounds = RunRounds(strategy, closed=lambda round_: records.append(round_.close()))
    rounds.start(grid=grid, initial_arrays=numpy_to_arrays(get_parameters(
        build_model("logreg", seed=0))), num_rounds=2)
    assert [r.round for r in records] == [1, 2]
    for record in records:
        assert record.attested == ["alpha", "beta"]
        assert reason in record.quarantined["gamma"]
        assert record.aggregate_digest is not None
        assert record.sites["alpha"].train.num_examples == 200  # from the sealed report



def test_a_runs_first_attestation_waits_for_reconnecting_nodes(tmp_path, sim_root_dir,
                                                               sim_root):
    """After a coordinator restart the SuperNodes are still reconnecting: the first
    attestation of a run waits up to node_wait, later ones (answers riding on the previous
    round's evaluation, or fresh queries) the short attest_timeout."""
    runtimes = {nid: fakes.site(tmp_path, sim_root_dir, sim_root, name, nid)
                for nid, name in NAMES.items()}
    grid = InProcessGrid.build(lambda _nid: make_client_app(lambda ctx: runtimes[ctx.node_id]),
                               {nid: {} for nid in NAMES}, run_id=42)
    timeouts: list = []
    original = grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query.cleanroom_attest":
            timeouts.append(timeout)
        return original(messages, timeout=timeout)

    grid.send_and_receive = recording  # type: ignore[method-assign]
    strategy = ConfidentialStrategy(
        FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2),
        gate=fakes.gate(tmp_path, sim_root, NAMES), plan=fakes.plan(rounds=2),
        expected_nodes=3, attest_timeout=12.0, node_wait=60.0, piggyback=False)
    strategy.start(grid=grid, initial_arrays=numpy_to_arrays(get_parameters(
        build_model("logreg", seed=0))), num_rounds=2)
    assert timeouts == [60.0, 12.0]


def test_a_round_left_with_too_few_sites_closes_without_evaluation(tmp_path, sim_root_dir,
                                                                   sim_root):
    """Two of three sites fail in training: one site is left, the inner strategy evaluates
    with two, and Flower's sampling would wait for a second one forever (seen after a
    coordinator restart: the run hung). The round closes unevaluated, the run goes on."""
    import threading

    runtimes = {nid: fakes.site(tmp_path, sim_root_dir, sim_root, name, nid)
                for nid, name in NAMES.items()}

    def app_for(node_id: int) -> ClientApp:
        return make_client_app(lambda ctx: runtimes[ctx.node_id],
                               outer_mods=[hostile("raise")] if node_id != 1 else ())

    grid = InProcessGrid.build(app_for, {nid: {} for nid in NAMES}, run_id=42)
    records: list = []
    strategy = ConfidentialStrategy(
        FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2),
        gate=fakes.gate(tmp_path, sim_root, NAMES), plan=fakes.plan(rounds=2),
        expected_nodes=3)
    rounds = RunRounds(strategy, closed=lambda round_: records.append(round_.close()))
    runner = threading.Thread(target=rounds.start, daemon=True, kwargs={
        "grid": grid, "num_rounds": 2,
        "initial_arrays": numpy_to_arrays(get_parameters(build_model("logreg", seed=0)))})
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the run waits forever for a second site to evaluate"
    assert [r.round for r in records] == [1, 2]
    for record in records:
        assert "site error" in record.quarantined["beta"], record.quarantined
        assert record.sites["alpha"].evaluation is None  # not evaluated


def test_train_replies_reach_the_round_one_at_a_time(tmp_path, sim_root, monkeypatch):
    """Streaming (issue 14): with the aggregator, each train reply is handed to the round (and
    on to the enclave) before the next is pulled from the grid, so the coordinator holds one
    model-sized reply at a time, not the whole phase's."""
    from types import SimpleNamespace

    import numpy as np

    from cleanroom.coordinator import strategy as strategy_mod
    from cleanroom.coordinator.rounds import Updates

    pulled: list[int] = []
    seen: list[tuple[int, int]] = []  # (node, replies pulled when the round got it)

    class Round:
        aggregator = object()
        record = SimpleNamespace(skipped=False)

        def updates(self, items, reference, *, release):
            for node_id, _reply in items:
                seen.append((node_id, len(pulled)))
            return Updates([], SimpleNamespace(arrays=None))

        def end_training(self, digest):
            assert digest is None

    sent = []

    def replies():
        from flwr.app import RecordDict

        for node_id in (1, 2, 3):
            pulled.append(node_id)
            content = RecordDict({"cleanroom.envelope": ConfigRecord({"payload": b"x" * 64})})
            sent.append(content)
            yield SimpleNamespace(metadata=SimpleNamespace(src_node_id=node_id),
                                  content=content, has_content=lambda: True)

    monkeypatch.setattr(strategy_mod, "train_reply", lambda reply: "parsed")
    strategy = ConfidentialStrategy(FedAvg(), gate=fakes.gate(tmp_path, sim_root, NAMES),
                                    plan=fakes.plan())
    strategy._round = Round()  # type: ignore[assignment]
    strategy._global = {"w": np.zeros(3, dtype=np.float32)}  # type: ignore[assignment]
    assert strategy.aggregate_train(1, replies()) == (None, None)
    # each reply emptied once handed on (its payload must not wait for a GC pass)
    assert [len(content.keys()) for content in sent] == [0, 0, 0]
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_the_aggregate_keeps_the_models_dtypes_without_extra_copies():
    """The inner strategy's record is used as is (read as views, not copied) when its dtypes
    are the model's; a float64 server step (FedAdam's) is cast back to float32; renamed
    parameters are refused."""
    import numpy as np

    from cleanroom.errors import ProtocolError

    strategy = ConfidentialStrategy(FedAvg(), gate=object(), plan=fakes.plan(rounds=1))
    strategy._global = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    same = numpy_to_arrays({"w": np.ones((2, 3), np.float32), "b": np.full(3, 2, np.float32)})
    aggregate, record = strategy._keep_schema(same)
    assert record is same
    assert np.shares_memory(aggregate["w"], np.frombuffer(same["w"].data, np.uint8))
    wide = numpy_to_arrays({"w": np.full((2, 3), 0.5), "b": np.full(3, 1.5)})
    aggregate, record = strategy._keep_schema(wide)
    assert record is not wide
    assert {k: (v.dtype, v.shape) for k, v in aggregate.items()} == \
        {"w": (np.float32, (2, 3)), "b": (np.float32, (3,))}
    assert record["w"].dtype == "float32" and float(aggregate["b"][0]) == 1.5
    with pytest.raises(ProtocolError, match="parameter names"):
        strategy._keep_schema(numpy_to_arrays({"x": np.zeros(3, np.float32)}))
