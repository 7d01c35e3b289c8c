"""The coordinator's round state machine against real site protocols, with no Flower at all:
challenge -> evidence -> admission -> sealed model -> DP training -> sealed update -> opened
and validated update -> evaluation with the next round's challenge riding on it."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.coordinator.rounds import CoordinatorRound, Phase, RoundStateError
from cleanroom.errors import ProtocolError
from cleanroom.models import build_model, get_parameters
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
from cleanroom.protocol.payload import seal_update
from cleanroom.protocol.reports import TrainReport
from cleanroom.site_agent.session import SiteProtocol
from cleanroom.site_agent.trainers import TaskTrainer
from tests import fakes


@pytest.fixture
def model() -> OrderedDict[str, np.ndarray]:
    return get_parameters(build_model("logreg", seed=1))


@pytest.fixture
def two_sites(tmp_path, sim_root_dir, sim_root):
    return {1: fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0),
            2: fakes.site(tmp_path, sim_root_dir, sim_root, "beta", 1)}


def new_round(tmp_path, sim_root, model, names, **kw) -> CoordinatorRound:
    return CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, names, **kw), plan=fakes.plan(),
                            run_id="run-1", round=1, model_digest=arrays_digest(model))


def attest_all(round_, sites):
    blobs = {}
    for node_id, runtime in sites.items():
        answer = SiteProtocol(runtime, TaskTrainer()).answer(round_.challenge(node_id))
        round_.admit(node_id, answer.response, answer.evidence, answer.endorsement)
        blobs[node_id] = answer.session
    return blobs


def test_a_whole_round_without_flower(tmp_path, sim_root, two_sites, model):
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    blobs = attest_all(round_, two_sites)
    assert round_.end_attestation() == [1, 2]
    record = round_.record
    assert record.attested == ["alpha", "beta"]
    nonce = round_._challenges[1].nonce
    assert record.sites["alpha"].nonce_sha256 == hashlib.sha256(nonce).hexdigest()

    updates = {}
    for node_id, runtime in two_sites.items():
        sealed = round_.seal([node_id], model, direction="model",
                             model_digest=round_.model_digest)[node_id]
        assert record.sites[runtime.site].model_ciphertext_sha256 == sealed.sha256
        reply, _ = SiteProtocol(runtime, TaskTrainer()).train(blobs[node_id], sealed, {})
        opened = round_.open_update(node_id, reply, model)
        assert opened is not None
        updates[node_id] = opened
    update, report = updates[1]
    assert list(update) == list(model) and report.steps == 1
    assert report.privacy is not None and 0 < report.privacy.epsilon_run <= 1.0
    assert report.train_loss is None  # raw loss is not private: never reported under DP
    assert record.sites["alpha"].train == report
    assert record.sites["alpha"].update_norm is not None

    round_.end_training(arrays_digest(update))
    ahead = round_.look_ahead(arrays_digest(update))
    for node_id, runtime in two_sites.items():
        sealed = round_.seal([node_id], update, direction="evaluate",
                             model_digest=arrays_digest(update))[node_id]
        metrics, answer = SiteProtocol(runtime, TaskTrainer()).evaluate(
            blobs[node_id], sealed, ahead.challenge(node_id))
        assert round_.open_metrics(node_id, metrics, arrays_digest(update)) is not None
        assert answer is not None
        ahead.admit(node_id, answer.response, answer.evidence, answer.endorsement)
    assert set(record.sites["beta"].evaluation.metrics) == {"accuracy", "loss"}
    closed = round_.close()
    assert closed.round == 1 and round_.keys is None and round_.admitted == []
    assert ahead.end_attestation() == [1, 2]  # round 2 needs no attestation query at all


def test_steps_out_of_order_are_refused(tmp_path, sim_root, model):
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha"})
    with pytest.raises(RoundStateError):
        round_.seal([1], model, direction="model", model_digest=round_.model_digest)
    round_.end_attestation()
    with pytest.raises(RoundStateError):
        round_.challenge(1)
    round_.end_training(None)
    round_.close()
    with pytest.raises(RoundStateError):
        round_.close()


def test_silent_and_unattested_nodes_get_nothing(tmp_path, sim_root, model):
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha"})
    round_.challenge(1)
    assert round_.end_attestation() == []
    assert round_.record.quarantined == {"alpha": "no attestation reply before the timeout"}
    assert round_.seal([1, 7], model, direction="model", model_digest=round_.model_digest) == {}


def test_a_node_answering_as_another_site_is_filed_under_its_own_name(
        tmp_path, sim_root_dir, sim_root, model):
    """Quarantine goes to the authenticated identity: node 2 (registered as beta) claiming to
    be alpha neither takes alpha's place nor knocks alpha out of the round."""
    alpha = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    impostor = fakes.site(tmp_path / "x", sim_root_dir, sim_root, "alpha", 1)
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    attest_all(round_, {2: impostor, 1: alpha})  # the impostor answers first
    assert round_.end_attestation() == [1]
    assert round_.record.attested == ["alpha"]
    assert round_.record.quarantined["beta"] == \
        "identity: node 2 is registered as 'beta', not 'alpha'"


def test_an_unregistered_node_is_refused_when_strict(tmp_path, sim_root_dir, sim_root, model):
    stranger = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha"})
    attest_all(round_, {9: stranger})
    round_.end_attestation()
    assert round_.record.quarantined == {"node-9": "identity: node 9 is not a registered site"}


def test_claimed_names_are_unique_when_nodes_cannot_be_mapped(
        tmp_path, sim_root_dir, sim_root, model):
    """Flower's simulation runtime: node ids unknown in advance, claimed names first come."""
    first = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    second = fakes.site(tmp_path / "x", sim_root_dir, sim_root, "alpha", 1)
    round_ = new_round(tmp_path, sim_root, model, {}, strict=False)
    attest_all(round_, {1: first, 2: second})
    round_.end_attestation()
    assert round_.record.attested == ["alpha"]
    assert round_.record.quarantined == {
        "node-2": "identity: site name 'alpha' already answered this round"}


def test_each_node_is_judged_once_and_only_for_its_own_challenge(
        tmp_path, sim_root_dir, sim_root, model):
    alpha = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "alpha2"})
    answer = SiteProtocol(alpha, TaskTrainer()).answer(round_.challenge(1))
    assert round_.admit(1, answer.response, answer.evidence, answer.endorsement).admitted
    again = round_.admit(1, answer.response, answer.evidence, answer.endorsement)
    assert not again.admitted and again.reason == "protocol: answered twice"
    unasked = round_.admit(2, answer.response, answer.evidence, answer.endorsement)
    assert not unasked.admitted and "never sent" in unasked.reason
    # an error reply after the verdict (or a second one) changes neither verdict nor reason
    late_error = round_.fail(1, "site error: RuntimeError: boom")
    assert not late_error.admitted and late_error.reason == "protocol: answered twice"
    assert round_.record.sites["alpha"].admitted
    assert round_.fail(3, "site error: first").reason == "site error: first"
    round_.fail(3, "site error: second")
    assert round_.record.sites["node-3"].reason == "site error: first"


def test_an_unanswered_look_ahead_challenge_is_replaced(tmp_path, sim_root_dir, sim_root,
                                                        model):
    alpha = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha"})
    stale = SiteProtocol(alpha, TaskTrainer()).answer(round_.challenge(1))
    assert round_.awaiting(1) and round_.needs_challenge(1)
    fresh = round_.challenge(1)  # e.g. the piggybacked answer never came
    assert fresh.nonce != stale.response.nonce
    late = round_.admit(1, stale.response, stale.evidence, stale.endorsement)
    assert not late.admitted and "does not answer this round's challenge" in late.reason


def _admitted_round(tmp_path, sim_root_dir, sim_root, model):
    alpha = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha"})
    blob = attest_all(round_, {1: alpha})[1]
    round_.end_attestation()
    return round_, alpha, blob


def _report(**kw) -> TrainReport:
    fields = {"num_examples": 200, "steps": 1, "train_loss": None}
    return TrainReport(**{**fields, **kw})


def test_an_update_sealed_to_another_key_is_rejected(tmp_path, sim_root_dir, sim_root, model):
    round_, _, _ = _admitted_round(tmp_path, sim_root_dir, sim_root, model)
    context = EnvelopeContext("update", "run-1", 1, "alpha", round_.model_digest)
    forged = seal_update(model, _report(), KeyPair.generate().public_bytes, context,
                         ed25519.Ed25519PrivateKey.generate())
    assert round_.open_update(1, forged, model) is None
    entry = round_.record.sites["alpha"]
    assert not entry.admitted and entry.reason.startswith("update rejected: cannot open update")
    assert round_.admitted == []


def test_a_relays_update_sealed_to_the_public_round_key_is_refused(
        tmp_path, sim_root_dir, sim_root, model):
    """The coordinator's round key is public (it is in the challenge): anyone can seal an
    update to it. Only the key the site's evidence bound may sign one."""
    round_, _, _ = _admitted_round(tmp_path, sim_root_dir, sim_root, model)
    context = EnvelopeContext("update", "run-1", 1, "alpha", round_.model_digest)
    relay = seal_update(model, _report(), round_.keys.public_bytes, context,
                        ed25519.Ed25519PrivateKey.generate())
    assert round_.open_update(1, relay, model) is None
    assert "signature" in round_.record.sites["alpha"].reason


@pytest.mark.parametrize("case,expect", [
    ("norm", "update norm"), ("rows", "attested dataset holds 200 training rows"),
    ("steps", "reports 2 steps"), ("no-privacy", "no privacy spend"),
    ("shape", "shape"), ("context", "envelope is for update/run-1/round 2")])
def test_bad_updates_are_rejected_with_the_reason(tmp_path, sim_root_dir, sim_root, model, case,
                                                  expect):
    round_, alpha, blob = _admitted_round(tmp_path, sim_root_dir, sim_root, model)
    signer = SiteProtocol(alpha, TaskTrainer())._session(blob).signer  # the attested key
    update, report, rnd = OrderedDict(model), _report(), 1
    if case == "norm":
        update = OrderedDict((k, v + 100.0) for k, v in model.items())
    elif case == "steps":
        report = _report(steps=2)
    elif case == "rows":
        report = _report(num_examples=10**9)  # would dominate a weighted average
    elif case == "shape":
        update = OrderedDict((k, np.zeros((2, 2), np.float32)) for k in model)
    elif case == "context":
        rnd = 2
    if case != "no-privacy" and round_.plan.dp.enabled:
        from cleanroom.protocol.reports import PrivacySpend

        report = report.model_copy(update={"privacy": PrivacySpend(
            noise_multiplier=1.0, sample_rate=1.0, steps=1, epsilon_round=0.1,
            epsilon_run=0.1, epsilon_lifetime=0.1, delta=1e-5, ledger_records=2)})
    context = EnvelopeContext("update", "run-1", rnd, "alpha", round_.model_digest)
    sealed = seal_update(update, report, round_.keys.public_bytes, context, signer)
    assert round_.open_update(1, sealed, model) is None
    assert expect in round_.record.sites["alpha"].reason


def test_the_site_refuses_a_model_other_than_the_one_its_evidence_bound(
        tmp_path, sim_root_dir, sim_root, model):
    round_, alpha, blob = _admitted_round(tmp_path, sim_root_dir, sim_root, model)
    other = OrderedDict((k, v + 1.0) for k, v in model.items())
    context = EnvelopeContext("model", "run-1", 1, "alpha", round_.model_digest)
    # a coordinator cannot use seal_model for this (it checks the digest): seal raw bytes
    from cleanroom.protocol.arrays import encode_arrays
    from cleanroom.protocol.envelope import Recipient, seal_envelope
    from cleanroom.protocol.payload import Sealed, _header

    raw = seal_envelope(encode_arrays(other), [Recipient(round_._sessions[1].public_key,
                                                         context)])
    swapped = Sealed(_header(context, raw), raw.parts, raw.wrapped_keys[0])
    with pytest.raises(ProtocolError, match="is not the model bound in this round's attest"):
        SiteProtocol(alpha, TaskTrainer()).train(blob, swapped, {})
    assert alpha.ledger.state()[0] == 0  # nothing charged


def test_phases_advance(tmp_path, sim_root, model):
    round_ = new_round(tmp_path, sim_root, model, {})
    assert round_.phase is Phase.ATTESTING
    round_.end_attestation()
    assert round_.phase is Phase.TRAINING
    round_.end_training(None)
    assert round_.phase is Phase.EVALUATING


def test_a_site_that_sends_no_update_is_quarantined_with_a_timeout(tmp_path, sim_root, two_sites,
                                                                    model):
    """A site that attested, got the model and then went silent (killed, hung, cut off) is
    quarantined for the round with a timeout reason; the one that answered is aggregated."""
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    blobs = attest_all(round_, two_sites)
    assert round_.end_attestation() == [1, 2]
    sealed = round_.seal([1, 2], model, direction="model", model_digest=round_.model_digest)
    reply, _ = SiteProtocol(two_sites[1], TaskTrainer()).train(blobs[1], sealed[1], {})
    assert round_.open_update(1, reply, model) is not None  # beta never answers
    round_.end_updates()
    assert round_.admitted == [1]
    assert round_.record.attested == ["alpha"]
    assert round_.record.quarantined == {"beta": "no training reply before the timeout"}
    round_.end_updates()  # idempotent: alpha's update is in
    assert round_.admitted == [1]


def test_one_call_per_step_returns_what_to_send(tmp_path, sim_root_dir, sim_root, two_sites,
                                                model):
    """The adapter's view: challenges to send, the answers judged in one call, instructions
    only for admitted nodes, the train replies (an update, an error, a stranger) in one."""
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    challenges = round_.challenges([1, 2, 7])
    assert sorted(challenges) == [1, 2, 7]
    assert round_.record.bytes_sent == sum(len(c.model_dump_json())
                                           for c in challenges.values())
    answers = []
    for node_id in (1, 2):
        answer = SiteProtocol(two_sites[node_id], TaskTrainer()).answer(challenges[node_id])
        answers.append((node_id, (answer.response, answer.evidence, answer.endorsement)))
    answers.append((7, "site error: RuntimeError: boom"))
    assert round_.attest(answers) == [1, 2]
    assert round_.record.quarantined == {"node-7": "site error: RuntimeError: boom"}
    with pytest.raises(RoundStateError):
        round_.challenges([9])  # attestation is over


def test_steps_send_models_only_to_admitted_nodes_and_take_updates_in_order(
        tmp_path, sim_root_dir, sim_root, two_sites, model):
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    blobs = attest_all(round_, {1: two_sites[1]})
    assert round_.attest([]) == [1]  # beta was never challenged: nothing to judge
    sent = round_.instructions([1, 2], model, direction="model",
                               model_digest=round_.model_digest,
                               masked=lambda n: b"mask" if n == 1 else None)
    assert list(sent) == [1] and sent[1].masked_input == b"mask"
    assert sent[1].challenge is None and sent[1].aggregator is None
    reply, _ = SiteProtocol(two_sites[1], TaskTrainer()).train(blobs[1], sent[1].sealed, {})
    updates = round_.updates([(2, "site error: not asked"), (1, reply)], model)
    assert updates.aggregate is None and updates.opened[0] is None
    assert updates.opened[1] is not None and list(updates.opened[1][0]) == list(model)
    assert round_.record.aggregated == ["alpha"] and "beta" not in round_.record.sites
    assert round_.phase is Phase.TRAINING


def test_a_reply_that_is_no_update_rejects_its_site(tmp_path, sim_root, two_sites, model):
    from cleanroom.protocol.wire import Refusal

    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    attest_all(round_, two_sites)
    round_.end_attestation()
    refusal = Refusal(code="aggregator-unattested", detail="no evidence")
    updates = round_.updates([(1, "update rejected: garbled"), (2, refusal)], model)
    assert updates.opened == [None, None] and round_.admitted == []
    assert round_.record.quarantined == {"alpha": "update rejected: garbled"}
    assert round_.record.site_refusals == {"beta": "aggregator-unattested: no evidence"}


def _answer(runtime, challenge):
    answer = SiteProtocol(runtime, TaskTrainer()).answer(challenge)
    return answer.response, answer.evidence, answer.endorsement


def test_a_batch_of_answers_is_judged_as_one_by_one_with_one_gate_call(
        tmp_path, sim_root, two_sites, model, monkeypatch):
    """judge: the round's own checks see the answers before them in the same batch (a node
    answering twice, a second node claiming a site name already answered), the gate gets the
    rest in one call, and the verdicts are filed in the order received."""
    round_ = new_round(tmp_path, sim_root, model, {}, strict=False)
    phases: list[list[int]] = []
    admit_phase = round_.gate.admit_phase
    monkeypatch.setattr(round_.gate, "admit_phase", lambda candidates: phases.append(
        [c[0] for c in candidates]) or admit_phase(candidates))
    challenges = round_.challenges([1, 2, 3])
    alpha = _answer(two_sites[1], challenges[1])
    impostor = _answer(two_sites[1], challenges[2])  # node 2 answers as "alpha" too
    verdicts = round_.judge([(1, alpha), (1, alpha), (2, impostor), (3, "site error: boom"),
                             (3, "site error: again")])
    assert phases == [[1]]
    assert [v.admitted for v in verdicts] == [True, False, False, False, False]
    assert verdicts[1].reason == verdicts[4].reason == "protocol: answered twice"
    assert verdicts[2].reason == "identity: site name 'alpha' already answered this round"
    assert list(round_.record.sites) == ["alpha", "node-2", "node-3"]
    assert round_.record.quarantined["node-3"] == "site error: boom"
    assert round_.record.sites["alpha"].nonce_sha256 == hashlib.sha256(
        challenges[1].nonce).hexdigest()
    assert round_.end_attestation() == [1]


def test_the_attestation_phase_is_one_call_around_the_adapters_round_trip(
        tmp_path, sim_root, two_sites, model):
    """attest_nodes: challenges only for nodes with no verdict yet (an answer that rode on
    the evaluation needs none), one exchange, the answers judged, the phase ended."""
    round_ = new_round(tmp_path, sim_root, model, {1: "alpha", 2: "beta"})
    attest_all(round_, {1: two_sites[1]})  # alpha's answer rode on last round's evaluation
    sent: list[list[int]] = []

    def exchange(challenges):
        sent.append(sorted(challenges))
        return [(n, _answer(two_sites[n], c)) for n, c in challenges.items()]

    assert round_.attest_nodes([1, 2], exchange) == [1, 2]
    assert sent == [[2]] and round_.phase is Phase.TRAINING
    assert round_.record.attestation_seconds > 0
    quiet = new_round(tmp_path / "quiet", sim_root, model, {1: "alpha"})
    attest_all(quiet, {1: two_sites[1]})
    assert quiet.attest_nodes([1], exchange) == [1] and sent == [[2]]  # nothing to send
