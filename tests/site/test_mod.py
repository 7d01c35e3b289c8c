"""The client mod alone: it routes, stores the sealed session blob, and refuses a model that
arrives without an attested session."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict

from cleanroom.coordinator.rounds import CoordinatorRound
from cleanroom.errors import ProtocolError
from cleanroom.models import build_model, get_parameters
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.flower import (
    ATTEST_MESSAGE_TYPE,
    ATTEST_RECORD,
    ENVELOPE_RECORD,
    challenge_content,
    instruction_content,
    read_attest,
    read_envelope,
)
from cleanroom.site_agent.mod import SESSION_RECORD, ConfidentialMod
from tests import fakes


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps new messages with the process's task identity (a ServerApp's here)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _never(msg, ctx):
    raise AssertionError("the mod answers this itself")


def test_attest_then_train_through_the_mod(tmp_path, sim_root_dir, sim_root):
    runtime = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    mod = ConfidentialMod(lambda ctx: runtime)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    model = get_parameters(build_model("logreg", seed=0))
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {1: "alpha"}),
                              plan=fakes.plan(), run_id="r", round=1,
                              model_digest=arrays_digest(model))
    query = Message(challenge_content(round_.challenge(1)), 1, ATTEST_MESSAGE_TYPE)
    reply = mod(query, ctx, _never)
    assert set(reply.content) == {ATTEST_RECORD}
    assert round_.admit(1, *read_attest(reply.content)).admitted
    assert SESSION_RECORD in ctx.state.config_records  # sealed: no key in clear
    assert runtime.session_key() not in bytes(ctx.state.config_records[SESSION_RECORD]["sealed"])
    round_.end_attestation()
    sealed = round_.seal([1], model, direction="model", model_digest=round_.model_digest)[1]
    train = Message(instruction_content(sealed, RecordDict()), 1, "train")
    out = mod(train, ctx, _never)
    assert set(out.content) == {ENVELOPE_RECORD}
    assert round_.open_update(1, read_envelope(out.content), model) is not None


def test_a_model_without_an_attested_session_is_refused(tmp_path, sim_root_dir, sim_root):
    runtime = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    mod = ConfidentialMod(lambda ctx: runtime)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    model = get_parameters(build_model("logreg", seed=0))
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {}, strict=False),
                              plan=fakes.plan(), run_id="r", round=1,
                              model_digest=arrays_digest(model))
    round_.end_attestation()
    from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
    from cleanroom.protocol.payload import seal_model

    context = EnvelopeContext("model", "r", 1, "alpha", round_.model_digest)
    sealed = seal_model(model, [(KeyPair.generate().public_bytes, context)])[0]
    with pytest.raises(ProtocolError, match="no attested session"):
        mod(Message(instruction_content(sealed, RecordDict()), 1, "train"), ctx, _never)
