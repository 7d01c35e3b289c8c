"""Binding, envelopes and the canonical array encoding."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.errors import EnvelopeError, ProtocolError
from cleanroom.protocol.arrays import arrays_digest, decode_arrays, encode_arrays
from cleanroom.protocol.binding import Binding
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair, open_sealed, seal

DIGEST = "ab" * 32


def binding(**kw) -> Binding:
    base = dict(run_id="7", round=3, site="cleveland", nonce=b"\x01" * 32,
                site_public_key=b"\x02" * 32, model_digest=DIGEST)
    base.update(kw)
    return Binding(**base)


def test_binding_is_64_bytes_and_deterministic():
    assert len(binding().report_data()) == 64
    assert binding().report_data() == binding().report_data()


@pytest.mark.parametrize("change", [
    {"run_id": "8"}, {"round": 4}, {"site": "hungary"}, {"nonce": b"\x03" * 32},
    {"site_public_key": b"\x04" * 32}, {"model_digest": "cd" * 32},
    {"node_public_key": b"node-key"}, {"ledger_records": 5}, {"ledger_head": "ab" * 32},
    {"task_digest": "ef" * 32}, {"dataset_digest": "01" * 32}, {"dataset_rows": 9},
    {"update_signer": b"\x05" * 32}, {"secagg_keys": b"\x06" * 32},
])
def test_every_bound_field_changes_report_data(change):
    assert binding(**change).report_data() != binding().report_data()


def test_length_prefix_prevents_ambiguity():
    a = binding(run_id="1", site="2x")
    b = binding(run_id="12", site="x")
    assert a.report_data() != b.report_data()


def test_nonce_size_enforced():
    with pytest.raises(ValueError):
        binding(nonce=b"short").report_data()


def ctx(**kw) -> EnvelopeContext:
    base = dict(direction="model", run_id="1", round=1, site="va", model_digest=DIGEST)
    base.update(kw)
    return EnvelopeContext(**base)


def test_envelope_roundtrip():
    kp = KeyPair.generate()
    ct = seal(b"secret model", kp.public_bytes, ctx())
    assert b"secret model" not in ct
    assert open_sealed(ct, kp, ctx()) == b"secret model"


@pytest.mark.parametrize("other", [
    {"direction": "update"}, {"run_id": "2"}, {"round": 2}, {"site": "cleveland"},
    {"model_digest": "cd" * 32},
])
def test_envelope_refuses_other_context(other):
    kp = KeyPair.generate()
    ct = seal(b"secret", kp.public_bytes, ctx())
    with pytest.raises(EnvelopeError):
        open_sealed(ct, kp, ctx(**other))


def test_envelope_refuses_other_key_and_tampering():
    kp = KeyPair.generate()
    ct = seal(b"secret", kp.public_bytes, ctx())
    with pytest.raises(EnvelopeError):
        open_sealed(ct, KeyPair.generate(), ctx())
    tampered = bytearray(ct)
    tampered[-1] ^= 1
    with pytest.raises(EnvelopeError):
        open_sealed(bytes(tampered), kp, ctx())


def test_bad_public_key_typed():
    with pytest.raises(EnvelopeError):
        seal(b"x", b"short", ctx())


def test_arrays_roundtrip_and_digest():
    arrays = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3),
                         b=np.array([1.5], dtype=np.float64))
    out = decode_arrays(encode_arrays(arrays))
    assert list(out) == ["w", "b"]
    for k in arrays:
        assert out[k].dtype == arrays[k].dtype and np.array_equal(out[k], arrays[k])
    assert arrays_digest(out) == arrays_digest(arrays)
    changed = OrderedDict(arrays, b=np.array([1.5000001], dtype=np.float64))
    assert arrays_digest(changed) != arrays_digest(arrays)


def test_arrays_refuse_unsupported_dtype():
    with pytest.raises(ProtocolError):
        encode_arrays({"x": np.array(["a"])})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_arrays_random_bytes_only_typed_errors(data):
    with contextlib.suppress(ProtocolError):
        decode_arrays(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_decode_arrays_mutations_only_typed_errors(pos, value):
    blob = bytearray(encode_arrays({"w": np.ones((3, 2), np.float32)}))
    blob[pos % len(blob)] = value
    with contextlib.suppress(ProtocolError):
        decode_arrays(bytes(blob))




def test_ledger_size_out_of_range_is_refused_at_the_wire():
    """A ledger size the binding cannot encode is a validation error, not a crash of the
    coordinator's round."""
    from pydantic import ValidationError

    from cleanroom.protocol.wire import AttestResponse

    base = {"site": "va", "run_id": "1", "round": 1, "nonce": "00" * 32}
    assert AttestResponse.model_validate({**base, "ledger_records": 2**63 - 1})
    for bad in (2**63, 2**64, -1):
        with pytest.raises(ValidationError, match="ledger_records"):
            AttestResponse.model_validate({**base, "ledger_records": bad})


def test_an_attestation_round_trip_maps_every_reply_to_an_answer_or_a_reason(monkeypatch):
    """send_challenges: one attestation query per challenge, and for each reply (in the order
    the Grid returns them) the typed answer, the site's error, or why it is unreadable."""
    from types import SimpleNamespace

    from flwr.app import RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from cleanroom.protocol.flower import (
        ATTEST_MESSAGE_TYPE,
        attest_content,
        read_challenge,
        send_challenges,
    )
    from cleanroom.protocol.wire import AttestChallenge, AttestResponse
    from tests import fakes

    plan = fakes.plan()
    challenges = {n: AttestChallenge(run_id="run", round=3, nonce=bytes([n]) * 32,
                                     coordinator_public_key=bytes(32), model_digest="0" * 64,
                                     plan=plan, issued_at=1.0) for n in (1, 2, 3)}
    response = AttestResponse(site="alpha", run_id="run", round=3, nonce=bytes([1]) * 32)

    def reply(node_id, content=None, error=None):
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node_id),
                               has_error=lambda: error is not None, content=content,
                               error=SimpleNamespace(reason=error))

    class Grid:
        def send_and_receive(self, messages, timeout):
            self.sent, self.timeout = list(messages), timeout
            return iter([reply(3, RecordDict()), reply(1, attest_content(response, b"ev")),
                         reply(2, error="<class 'x.RuntimeError'>:<'boom'>")])

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # the ServerApp's run, as on a Grid
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 11)
    grid = Grid()
    answers = send_challenges(grid, challenges, group_id="3", timeout=9.0)
    assert [(m.metadata.dst_node_id, m.metadata.message_type, m.metadata.group_id)
            for m in grid.sent] == [(n, ATTEST_MESSAGE_TYPE, "3") for n in (1, 2, 3)]
    assert read_challenge(grid.sent[1].content) == challenges[2] and grid.timeout == 9.0
    assert answers == [(3, "protocol: message has no cleanroom.attest record"),
                       (1, (response, b"ev", b"")), (2, "site error: RuntimeError: boom")]
    assert send_challenges(None, {}, group_id="3", timeout=9.0) == []  # nothing sent
