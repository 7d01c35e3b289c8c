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
    handle._conn.writer.send_bytes(pickle.dumps(obj))
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
    handle._conn.writer.send_bytes(b"\x80\x05not a pickle")
    with pytest.raises(CleanroomError, match="malformed call"):
        handle._result(10, "attack")


# ------------------------------------------------------------------------------ the codec
def test_our_types_cross_through_their_validating_constructors(tmp_path):
    launch = AggregatorLaunch(provider="simulated", state_dir=tmp_path / "s",
                              measurement=b"\x01" * 48)
    slot = SiteSlot("alpha", b"\x02" * 32, 100)
    model = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3))
    call = ("x", (launch, slot, CentralDp(1.0, 0.5, 1e-5), model, fakes.plan()), {"k": [1]})
    back = enclave_wire.decode(enclave_wire.loads(enclave_wire.dumps(call)))
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
    back = enclave_wire.decode(enclave_wire.loads(enclave_wire.dumps(krum)))
    assert type(back) is Krum and back.num_malicious_nodes == 1 and back.min_train_nodes == 3
    assert back.evaluate_metrics_aggr_fn is not eval


def test_deep_nesting_is_refused():
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(EnclaveInputError, match="nested"):
        enclave_wire.decode(nested)
