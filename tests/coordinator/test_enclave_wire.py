"""The aggregator enclave's pipe is hostile input from the operator's process: data only.

Attacks from the security review of the aggregator enclave: a pickle that runs code inside
the enclave (and read the round's private key), calls outside the enclave's allow-list,
malformed calls; plus the codec alone (what may cross, rebuilt through validation)."""

from __future__ import annotations

import pickle
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from cleanroom.coordinator import enclave_wire
from cleanroom.coordinator.aggregator import CentralDp, SiteSlot
from cleanroom.coordinator.aggregator_enclave import AggregatorHandle, AggregatorLaunch
from cleanroom.coordinator.enclave_wire import EnclaveInputError
from cleanroom.errors import CleanroomError
from cleanroom.models import build_model, get_parameters
from cleanroom.protocol.arrays import arrays_digest
from tests import fakes

# Evaluated by whoever unpickles it: finds the core and returns the round's private key.
STEAL = ("[o for o in __import__('gc').get_objects() if type(o).__name__ == "
         "'AggregatorCore'][0]._rounds[1].keys.private_key.private_bytes_raw().hex()")


class _Eval:
    def __reduce__(self):
        return (eval, (STEAL,))


@pytest.fixture
def handle(tmp_path, sim_root_dir):
    h = AggregatorHandle(AggregatorLaunch(provider="simulated", state_dir=tmp_path / "enc",
                                          simulated_root=sim_root_dir), fakes.plan(dp=False))
    yield h
    h.close()


def _raw_call(handle: AggregatorHandle, obj: object) -> str:
    """Write ``obj`` into the pipe as a plain pickle (bypassing the handle), return the
    enclave's error text."""
    handle._conn.writer.send_bytes(enclave_wire.frame(pickle.dumps(obj), []))
    with pytest.raises(CleanroomError) as caught:
        handle._result(10, "attack")
    return str(caught.value)


def test_a_pickle_that_runs_code_is_refused_and_the_key_stays_inside(handle):
    model = get_parameters(build_model("logreg", seed=1))
    public = handle.begin_round("run-1", 1, model, arrays_digest(model))
    error = _raw_call(handle, ("public_key", (_Eval(),), {}))
    assert "builtins.eval may not cross into the aggregator enclave" in error
    for word in error.split():  # no 32-byte key in the answer
        if len(word) == 64:
            key = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(word))
            assert key.public_key().public_bytes_raw() != public
    assert handle.public_key(1) == public  # and the enclave still answers


@pytest.mark.parametrize("name", ["__getattribute__", "_state", "_fold", "provider"])
def test_the_enclave_itself_refuses_calls_outside_its_allow_list(handle, name):
    model = get_parameters(build_model("logreg", seed=1))
    handle.begin_round("run-1", 1, model, arrays_digest(model))
    handle._conn.send_call((name, ("plan",), {}))
    with pytest.raises(CleanroomError, match="is not a call of the aggregator enclave"):
        handle._result(10, "attack")


@pytest.mark.parametrize("message", ["not a tuple", ("public_key",), (1, (), {}),
                                     ("public_key", [1], {}), ("public_key", (1,), {1: 2})])
def test_a_malformed_call_is_refused_and_the_enclave_goes_on(handle, message):
    model = get_parameters(build_model("logreg", seed=1))
    public = handle.begin_round("run-1", 1, model, arrays_digest(model))
    handle._conn.send_call(message)
    with pytest.raises(CleanroomError, match="EnclaveInputError"):
        handle._result(10, "attack")
    time.sleep(0.1)
    assert handle._process.poll() is None
    assert handle.public_key(1) == public


def test_garbage_bytes_are_one_typed_refusal(handle):
    handle._conn.writer.send_bytes(enclave_wire.frame(b"\x80\x05not a pickle", []))
    with pytest.raises(CleanroomError, match="malformed call"):
        handle._result(10, "attack")


# ------------------------------------------------------------------------------ the codec
def _round_trip(obj: object) -> object:
    head, buffers = enclave_wire.dumps(obj)
    _, data = enclave_wire.unframe(head)
    return enclave_wire.decode(enclave_wire.loads(data, [bytes(b) for b in buffers]))


def test_our_types_cross_through_their_validating_constructors(tmp_path):
    launch = AggregatorLaunch(provider="simulated", state_dir=tmp_path / "s",
                              measurement=b"\x01" * 48)
    slot = SiteSlot("alpha", b"\x02" * 32, 100)
    model = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3))
    call = ("x", (launch, slot, CentralDp(1.0, 0.5, 1e-5), model, fakes.plan()), {"k": [1]})
    back = _round_trip(call)
    assert back[1][0] == launch and isinstance(back[1][0].state_dir, Path)
    assert back[1][1] == slot and back[1][2] == CentralDp(1.0, 0.5, 1e-5)
    assert np.array_equal(back[1][3]["w"], model["w"]) and back[1][3]["w"].dtype == np.float32
    assert back[1][4] == fakes.plan()


@pytest.mark.parametrize(("tagged", "needle"), [
    ({"$type": "Popen", "fields": {}}, "may not cross"),
    ({"$type": "CentralDp", "fields": {"noise_multiplier": -1.0, "clip": 0.5,
                                       "delta": 1e-5}}, "bad 'CentralDp'"),
    ({"$type": "TrainPlan", "json": "{}"}, "bad 'TrainPlan'"),
    ({"$type": "strategy", "name": "FedAvg", "args": {}}, "does not run inside"),
    ({"$type": "strategy", "name": "Krum", "args": {"num_malicious_nodes": [1]}},
     "plain values"),
    ({"$type": "Path", "value": 3}, "expected str"),
])
def test_bad_tagged_values_are_refused(tagged, needle):
    with pytest.raises(EnclaveInputError, match=needle):
        enclave_wire.decode(tagged)


def test_a_robust_strategy_crosses_as_its_name_and_plain_arguments():
    from flwr.serverapp.strategy import Krum

    krum = Krum(num_malicious_nodes=1, min_train_nodes=3)
    krum.evaluate_metrics_aggr_fn = eval  # a callable the operator slipped in stays behind
    back = _round_trip(krum)
    assert type(back) is Krum and back.num_malicious_nodes == 1 and back.min_train_nodes == 3
    assert back.evaluate_metrics_aggr_fn is not eval


def test_deep_nesting_is_refused():
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(EnclaveInputError, match="nested"):
        enclave_wire.decode(nested)


# ------------------------------------------------------------------- framing, buffers
def test_large_values_cross_out_of_band_and_arrive_as_themselves():
    parts = (b"h" * 88, bytes(range(256)) * 1024)  # small, then 256 KiB
    model = OrderedDict(w=np.arange(50_000, dtype=np.float32))
    head, buffers = enclave_wire.dumps(("x", (parts, model), {}))
    assert [b.nbytes for b in buffers] == [256 * 1024, model["w"].nbytes]
    assert len(head) < 4096  # the pickle itself holds neither
    sizes, data = enclave_wire.unframe(head)
    assert sizes == [256 * 1024, model["w"].nbytes]
    back = enclave_wire.decode(enclave_wire.loads(data, [bytes(b) for b in buffers]))
    assert back[1][0] == parts and all(type(p) is bytes for p in back[1][0])
    assert np.array_equal(back[1][1]["w"], model["w"])


@pytest.mark.parametrize(("head", "needle"), [
    (b"", "no frame header"),
    ((enclave_wire.MAX_BUFFERS + 1).to_bytes(4, "little"), "buffers"),
    ((2).to_bytes(4, "little") + (5).to_bytes(8, "little"), "cut short"),
    ((1).to_bytes(4, "little") + (enclave_wire.MAX_CALL_BYTES).to_bytes(8, "little") + b"x",
     "larger than"),
])
def test_a_head_beyond_the_limits_is_refused_before_any_buffer_is_read(head, needle):
    with pytest.raises(EnclaveInputError, match=needle):
        enclave_wire.unframe(head)


def test_buffers_must_match_the_pickle_exactly():
    head, buffers = enclave_wire.dumps(("x", (b"z" * enclave_wire.OOB_BYTES,), {}))
    _, data = enclave_wire.unframe(head)
    with pytest.raises(EnclaveInputError, match="malformed call"):
        enclave_wire.loads(data, [])  # refers to a buffer that is not there
    with pytest.raises(EnclaveInputError, match="does not use"):
        enclave_wire.loads(data, [bytes(buffers[0]), b"extra"])


@pytest.mark.parametrize("attack", ["too-many", "short-buffer"])
def test_a_call_that_breaks_the_framing_is_answered_once_then_the_channel_ends(handle,
                                                                               attack):
    if attack == "too-many":
        handle._conn.writer.send_bytes((enclave_wire.MAX_BUFFERS + 1).to_bytes(4, "little"))
    else:
        handle._conn.writer.send_bytes(enclave_wire.frame(pickle.dumps(1), [10]))
        handle._conn.writer.send_bytes(b"12345")
    with pytest.raises(CleanroomError, match="ChannelError"):
        handle._result(10, "attack")
    with pytest.raises(CleanroomError, match="aggregator enclave stopped"):
        handle.public_key(1)  # a typed error, not a hang or a traceback
    assert handle._process is None and handle._conn is None  # the handle closed it


def test_updates_and_the_release_cross_the_pipe_intact(handle):
    """Model-sized calls through the real enclave process: the model and two sealed updates
    go in out of band, the weighted mean comes back as writable arrays."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from cleanroom.protocol.envelope import EnvelopeContext, signer_public_bytes
    from cleanroom.protocol.payload import seal_update
    from cleanroom.protocol.reports import TrainReport

    model = OrderedDict(w=np.linspace(-1, 1, 70_000, dtype=np.float32),
                        b=np.zeros(3, np.float32))
    handle.begin_round("run-1", 1, model, arrays_digest(model))
    updates = {}
    for site, rows, shift in (("alpha", 100, 1e-4), ("beta", 300, -2e-4)):
        signer = ed25519.Ed25519PrivateKey.generate()
        handle.admit(1, SiteSlot(site, signer_public_bytes(signer), rows))
        updates[site] = OrderedDict((k, v + np.float32(shift)) for k, v in model.items())
        report = TrainReport(num_examples=rows, steps=fakes.plan(dp=False).local_steps)
        sealed = seal_update(updates[site], report, handle.public_key(1),
                             EnvelopeContext("update", "run-1", 1, site,
                                             arrays_digest(model)), signer)
        assert max(len(p) for p in sealed.parts) >= enclave_wire.OOB_BYTES
        assert handle.submit_update(1, site, sealed).accepted
    result = handle.aggregate(1)
    for k in model:
        np.testing.assert_allclose(result.arrays[k], (updates["alpha"][k] * 100
                                                      + updates["beta"][k] * 300) / 400,
                                   rtol=1e-6, atol=1e-7)
        assert result.arrays[k].flags.writeable
