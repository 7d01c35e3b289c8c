"""Secure aggregation in the round (issue 13, item 2): attested secagg keys, the stages on the
Message API, dropouts after masking, the aggregator seeing only masked inputs, and the
combinations that must be refused."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from cleanroom.coordinator.aggregator_enclave import AggregatorHandle
from cleanroom.coordinator.rounds import CoordinatorRound
from cleanroom.coordinator.secagg_round import SecAggStages
from cleanroom.errors import ConfigError, SecAggError
from cleanroom.models import build_model, get_parameters
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.secagg import SiteSecAgg
from cleanroom.site_agent.session import SiteProtocol
from cleanroom.site_agent.trainers import TaskTrainer
from tests import fakes
from tests.coordinator.test_aggregator import launch, site


@pytest.fixture
def model() -> OrderedDict[str, np.ndarray]:
    return get_parameters(build_model("logreg", seed=1))


def secagg_round(tmp_path, sim_root_dir, sim_root, model, n=4):
    sites = {i + 1: site(tmp_path, sim_root_dir, sim_root, f"s{i}", i) for i in range(n)}
    plan = fakes.plan(secure_aggregation=True)
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir), plan)
    names = {n_: r.site for n_, r in sites.items()}
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, names), plan=plan,
                              run_id="run-1", round=1, model_digest=arrays_digest(model),
                              aggregator=handle, model=model)
    blobs = {}
    for node_id, runtime in sites.items():
        answer = SiteProtocol(runtime, TaskTrainer()).answer(round_.challenge(node_id))
        assert answer.response.secagg_channel_key and answer.response.secagg_mask_key
        round_.admit(node_id, answer.response, answer.evidence, answer.endorsement)
        blobs[node_id] = answer.session
    assert round_.end_attestation() == sorted(sites)
    return round_, SecAggStages(round_), sites, blobs, handle


def stage(stages, sites, blobs, name, requests):
    for node_id, data in requests.items():
        reply, blobs[node_id] = SiteProtocol(sites[node_id], TaskTrainer()).secagg_step(
            blobs[node_id], name, data)
        stages.receive(node_id, name, reply)


def test_a_masked_round_with_a_dropout_after_sharing_keys(tmp_path, sim_root_dir, sim_root,
                                                           model):
    round_, stages, sites, blobs, _ = secagg_round(tmp_path, sim_root_dir, sim_root, model)
    stage(stages, sites, blobs, "share-keys", stages.start())
    requests = stages.requests("masked-input")
    assert sorted(requests) == [1, 2, 3, 4]
    for node_id in (1, 2, 3):  # node 4 goes offline after sharing its masks
        sealed = round_.seal([node_id], model, direction="model",
                             model_digest=round_.model_digest)[node_id]
        reply, blobs[node_id] = SiteProtocol(sites[node_id], TaskTrainer()).train(
            blobs[node_id], sealed, {}, round_.aggregator_evidence(node_id),
            stages.masked_input(node_id))
        assert round_.submit_update(node_id, reply) is not None
    round_.reject(4, "site error: offline")
    for name in ("consistency", "unmask"):
        stage(stages, sites, blobs, name, stages.requests(name))
    result = round_.aggregate()
    assert result.sites == ("s0", "s1", "s2") and result.dropped == ("s3",)
    assert result.failure is None and list(result.arrays) == list(model)
    info = round_.record.secure_aggregation
    assert info["survivors"] == ["s0", "s1", "s2"] and info["not_in_sum"] == ["s3"]
    assert info["threshold"] == 3 and round_.record.aggregated == ["s0", "s1", "s2"]
    # the mean moved the model, within the bound checked on the sum
    moved = sum(float(np.sum((result.arrays[k] - model[k]) ** 2)) for k in model)
    assert 0 < moved ** 0.5 <= info["clip"]


def test_too_many_dropouts_release_nothing(tmp_path, sim_root_dir, sim_root, model):
    round_, stages, sites, blobs, _ = secagg_round(tmp_path, sim_root_dir, sim_root, model)
    stage(stages, sites, blobs, "share-keys", stages.start())
    stages.requests("masked-input")
    for node_id in (1, 2):  # t = 3: two masked inputs are not enough
        sealed = round_.seal([node_id], model, direction="model",
                             model_digest=round_.model_digest)[node_id]
        reply, blobs[node_id] = SiteProtocol(sites[node_id], TaskTrainer()).train(
            blobs[node_id], sealed, {}, round_.aggregator_evidence(node_id),
            stages.masked_input(node_id))
        round_.submit_update(node_id, reply)
    assert stages.requests("consistency") == {}
    result = round_.aggregate()
    assert result.arrays is None and "Threshold" in result.failure


def test_the_aggregator_holds_masked_inputs_only(tmp_path, sim_root_dir, sim_root, model):
    """Inside the aggregator a site's input is masked: it differs from the site's quantized
    delta in (almost) every coordinate, and only the sum unmasks."""
    round_, stages, sites, blobs, handle = secagg_round(tmp_path, sim_root_dir, sim_root, model,
                                                        n=3)
    stage(stages, sites, blobs, "share-keys", stages.start())
    stages.requests("masked-input")
    for node_id in sites:
        sealed = round_.seal([node_id], model, direction="model",
                             model_digest=round_.model_digest)[node_id]
        reply, _ = SiteProtocol(sites[node_id], TaskTrainer()).train(
            blobs[node_id], sealed, {}, round_.aggregator_evidence(node_id),
            stages.masked_input(node_id))
        round_.submit_update(node_id, reply)
    state = handle._core._rounds[1]
    vectors = [state.secagg._inputs[s][1] for s in ("s0", "s1", "s2")]
    assert all(v[-1] != np.uint32(fakes.ROWS) for v in vectors)  # the weight slot is masked
    # unmasked, every coordinate would be |w * q(delta)| <= 200 * 2^20 (a tenth of the 32-bit
    # range); masked, they are uniform: about 10 % fall that low (P(>= 50 %) < 1e-12)
    values = np.concatenate([v.view(np.int32).astype(np.int64) for v in vectors])
    assert np.mean(np.abs(values) <= fakes.ROWS * 2**20) < 0.5
    assert state.accepted == ["s0", "s1", "s2"] and not state.total  # no plaintext sum kept


def test_site_secagg_state_survives_sealing_between_messages():
    a = SiteSecAgg("a", "run", 1)
    restored = SiteSecAgg.restore(a.export_state())
    assert restored.advertisement == a.advertisement and restored.stage == "share-keys"
    with pytest.raises(SecAggError, match="does not restore"):
        SiteSecAgg.restore(b'{"v": 2}')
    broken = json.loads(a.export_state())
    broken["channel"] = "00"
    with pytest.raises(SecAggError):
        SiteSecAgg.restore(json.dumps(broken).encode())


def test_a_reply_without_secagg_keys_is_quarantined(tmp_path, sim_root_dir, sim_root, model):
    """Evidence must bind the secagg keys the reply carries: keys dropped from the reply, or
    replaced, fail the binding."""
    alpha = site(tmp_path, sim_root_dir, sim_root)
    plan = fakes.plan(secure_aggregation=True)
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {1: "alpha", 2: "alpha2"}),
                              plan=plan, run_id="run-1", round=1,
                              model_digest=arrays_digest(model))
    answer = SiteProtocol(alpha, TaskTrainer()).answer(round_.challenge(1))
    stripped = answer.response.model_copy(update={"secagg_mask_key": None})
    assert not round_.admit(1, stripped, answer.evidence, answer.endorsement).admitted
    assert "no secure-aggregation keys" in round_.record.sites["alpha"].reason
    beta = site(tmp_path / "b", sim_root_dir, sim_root, "alpha2", 1)
    answer = SiteProtocol(beta, TaskTrainer()).answer(round_.challenge(2))
    swapped = answer.response.model_copy(update={"secagg_mask_key": b"\x09" * 32})
    admission = round_.admit(2, swapped, answer.evidence, answer.endorsement)
    assert not admission.admitted and "report_data" in admission.reason


@pytest.mark.parametrize("strategy", ["krum", "fedmedian"])
def test_secure_aggregation_refuses_strategies_that_need_every_update(tmp_path, strategy):
    from cleanroom.simulations.engine import SimulationConfig, run_simulation

    with pytest.raises(ConfigError, match="secure aggregation releases only their sum"):
        run_simulation(SimulationConfig(out=tmp_path / "out", rounds=1, strategy=strategy,
                                        secure_aggregation=True, tracking=False,
                                        progress=False))


def test_secure_aggregation_needs_the_aggregator(tmp_path):
    from cleanroom.simulations.engine import SimulationConfig, run_simulation

    with pytest.raises(ConfigError, match="secure aggregation runs inside the attested"):
        run_simulation(SimulationConfig(out=tmp_path / "out", rounds=1, strategy="fedavg",
                                        secure_aggregation=True, aggregator=False,
                                        tracking=False, progress=False))


def test_secure_aggregation_stages_need_the_rounds_aggregator(tmp_path, sim_root, model):
    from cleanroom.coordinator.rounds import RoundStateError

    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {1: "alpha"}),
                              plan=fakes.plan(secure_aggregation=True), run_id="run-1",
                              round=1, model_digest=arrays_digest(model))
    with pytest.raises(RoundStateError, match="inside the attested aggregator"):
        SecAggStages(round_)
