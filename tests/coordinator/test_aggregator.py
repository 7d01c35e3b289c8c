"""Trust both ways: the attested aggregator and the sites that verify it (issue 13).

The aggregator core (keys generated inside, updates opened, checked and folded only there,
central DP, per-site metrics released only when shared), the enclave process boundary, and
every refusal a site gives a coordinator whose aggregator it cannot verify: no evidence,
the wrong measurement, a debug enclave, a stale nonce, a swapped round key. A refusal comes
before any budget is reserved.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.attestation.measure import aggregator_measurement, write_aggregator_trust
from cleanroom.coordinator.aggregator import AggregatorCore, CentralDp, SiteSlot
from cleanroom.coordinator.aggregator_enclave import AggregatorHandle, AggregatorLaunch
from cleanroom.coordinator.rounds import CoordinatorRound
from cleanroom.coordinator.strategies import aggregates_by_sum, build_strategy
from cleanroom.errors import CleanroomError, ConfigError, SiteRefusal
from cleanroom.models import build_model, get_parameters
from cleanroom.protocol.arrays import arrays_digest
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
from cleanroom.protocol.payload import seal_metrics, seal_update
from cleanroom.protocol.reports import EvaluateReport, TrainReport
from cleanroom.protocol.wire import Refusal
from cleanroom.site_agent.config import AggregatorTrust, SitePolicyConfig
from cleanroom.site_agent.session import SiteProtocol
from cleanroom.site_agent.trainers import TaskTrainer
from tests import fakes


@pytest.fixture
def model() -> OrderedDict[str, np.ndarray]:
    return get_parameters(build_model("logreg", seed=1))


def launch(tmp_path: Path, sim_root_dir: Path, **kw) -> AggregatorLaunch:
    return AggregatorLaunch(provider="simulated", state_dir=tmp_path / "aggregator-enclave",
                            simulated_root=sim_root_dir, isolation="inprocess", **kw)


def trust(tmp_path: Path, sim_root, *, required: bool = True) -> AggregatorTrust:
    path = write_aggregator_trust(tmp_path / "aggregator-trust.json",
                                  simulated_root=sim_root.bundle_path,
                                  measurements=[aggregator_measurement()])
    return AggregatorTrust(required=required, policy=path)


def no_dp_plan():
    return fakes.plan(dp=False)


def site(tmp_path, sim_root_dir, sim_root, name="alpha", index=0, *, required=True,
         share=True):
    return fakes.site(tmp_path, sim_root_dir, sim_root, name, index,
                      aggregator=trust(tmp_path, sim_root, required=required),
                      policy=SitePolicyConfig(tasks=[fakes.ApprovedTask(
                          digest=fakes.TASK.digest)], share_metrics=share))


def admitted(tmp_path, sim_root_dir, sim_root, model, aggregator, sites, plan=None):
    """A round on ``aggregator`` with ``sites`` ({node_id: runtime}) attested."""
    names = {n: r.site for n, r in sites.items()}
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, names), plan=plan or
                              fakes.plan(), run_id="run-1", round=1,
                              model_digest=arrays_digest(model), aggregator=aggregator,
                              model=model)
    blobs = {}
    for node_id, runtime in sites.items():
        answer = SiteProtocol(runtime, TaskTrainer()).answer(round_.challenge(node_id))
        assert answer.response.aggregator_nonce is not None
        round_.admit(node_id, answer.response, answer.evidence, answer.endorsement)
        blobs[node_id] = answer.session
    assert round_.end_attestation() == sorted(sites)
    return round_, blobs


def train(round_, runtime, node_id, blob, model, evidence="from-round"):
    sealed = round_.seal([node_id], model, direction="model",
                         model_digest=round_.model_digest)[node_id]
    if evidence == "from-round":
        evidence = round_.aggregator_evidence(node_id)
    return SiteProtocol(runtime, TaskTrainer()).train(blob, sealed, {}, evidence)[0]


# ----------------------------------------------------------------------------- whole round


def test_a_round_through_the_aggregator(tmp_path, sim_root_dir, sim_root, model):
    sites = {1: site(tmp_path, sim_root_dir, sim_root, "alpha", 0),
             2: site(tmp_path, sim_root_dir, sim_root, "beta", 1)}
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir), fakes.plan())
    round_, blobs = admitted(tmp_path, sim_root_dir, sim_root, model, handle, sites)
    assert round_.keys is None  # the operator's round object holds no private key
    assert round_.public_key == handle.public_key(1)
    for node_id, runtime in sites.items():
        assert round_.record.sites[runtime.site].aggregator_evidence_sha256
        report = round_.submit_update(node_id, train(round_, runtime, node_id,
                                                     blobs[node_id], model))
        assert report is not None and report.privacy is not None
    assert round_.record.aggregated == ["alpha", "beta"]
    result = round_.aggregate()
    assert result.sites == ("alpha", "beta") and result.total_examples == 2 * fakes.ROWS
    assert list(result.arrays) == list(model)
    assert round_.record.sites["alpha"].update_norm is not None


# ----------------------------------------------------------------------------- refusals


def _refusal(excinfo) -> SiteRefusal:
    return excinfo.value


def test_a_site_refuses_an_aggregator_with_the_wrong_measurement(tmp_path, sim_root_dir,
                                                                  sim_root, model):
    alpha = site(tmp_path, sim_root_dir, sim_root)
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir, measurement=b"\x11" * 48),
                              fakes.plan())
    round_, blobs = admitted(tmp_path, sim_root_dir, sim_root, model, handle, {1: alpha})
    before = alpha.ledger.state()
    with pytest.raises(SiteRefusal) as excinfo:
        train(round_, alpha, 1, blobs[1], model)
    assert excinfo.value.code == "aggregator-attestation"
    assert "MEASUREMENT 1111" in excinfo.value.detail
    assert alpha.ledger.state() == before  # refused before any budget was reserved


def test_a_site_refuses_a_debug_aggregator(tmp_path, sim_root_dir, sim_root, model):
    alpha = site(tmp_path, sim_root_dir, sim_root)
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir, debug=True), fakes.plan())
    round_, blobs = admitted(tmp_path, sim_root_dir, sim_root, model, handle, {1: alpha})
    with pytest.raises(SiteRefusal) as excinfo:
        train(round_, alpha, 1, blobs[1], model)
    assert excinfo.value.code == "aggregator-attestation" and "debug" in excinfo.value.detail


def test_a_site_refuses_evidence_for_a_stale_nonce(tmp_path, sim_root_dir, sim_root, model):
    """Evidence the aggregator produced for another (earlier) nonce of this site: replayed
    evidence does not bind this round's nonce."""
    alpha = site(tmp_path, sim_root_dir, sim_root)
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir), fakes.plan())
    round_, blobs = admitted(tmp_path, sim_root_dir, sim_root, model, handle, {1: alpha})
    stale = handle.attest(1, "alpha", b"\x07" * 32)
    with pytest.raises(SiteRefusal) as excinfo:
        train(round_, alpha, 1, blobs[1], model, evidence=stale)
    assert excinfo.value.code == "aggregator-attestation"
    assert "report_data" in excinfo.value.detail


def test_a_site_refuses_a_round_key_the_aggregator_did_not_attest(tmp_path, sim_root_dir,
                                                                   sim_root, model):
    """Key swap: the operator puts its own key in the challenge and forwards genuine
    aggregator evidence (for the aggregator's key): the binding does not match."""
    alpha = site(tmp_path, sim_root_dir, sim_root)
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir), fakes.plan())
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {1: "alpha"}),
                              plan=fakes.plan(), run_id="run-1", round=1,
                              model_digest=arrays_digest(model), aggregator=handle,
                              model=model)
    operator_key = KeyPair.generate()
    round_.public_key = operator_key.public_bytes  # what the operator would like sites to use
    answer = SiteProtocol(alpha, TaskTrainer()).answer(round_.challenge(1))
    round_.admit(1, answer.response, answer.evidence, answer.endorsement)
    round_.end_attestation()
    with pytest.raises(SiteRefusal) as excinfo:
        train(round_, alpha, 1, answer.session, model)
    assert excinfo.value.code == "aggregator-attestation"
    assert "report_data" in excinfo.value.detail


def test_a_site_that_requires_an_aggregator_refuses_a_coordinator_without_one(
        tmp_path, sim_root_dir, sim_root, model):
    alpha = site(tmp_path, sim_root_dir, sim_root)
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {1: "alpha"}),
                              plan=fakes.plan(), run_id="run-1", round=1,
                              model_digest=arrays_digest(model))
    answer = SiteProtocol(alpha, TaskTrainer()).answer(round_.challenge(1))
    round_.admit(1, answer.response, answer.evidence, answer.endorsement)
    round_.end_attestation()
    assert round_.aggregator_evidence(1) is None
    with pytest.raises(SiteRefusal) as excinfo:
        train(round_, alpha, 1, answer.session, model)
    assert excinfo.value.code == "aggregator-unattested"


def test_a_site_that_does_not_require_one_trains_for_a_coordinator_without_one(
        tmp_path, sim_root_dir, sim_root, model):
    alpha = site(tmp_path, sim_root_dir, sim_root, required=False)
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {1: "alpha"}),
                              plan=fakes.plan(), run_id="run-1", round=1,
                              model_digest=arrays_digest(model))
    answer = SiteProtocol(alpha, TaskTrainer()).answer(round_.challenge(1))
    round_.admit(1, answer.response, answer.evidence, answer.endorsement)
    round_.end_attestation()
    sealed = train(round_, alpha, 1, answer.session, model)
    assert round_.open_update(1, sealed, model) is not None


def test_a_refusal_is_recorded_and_the_site_stays_attested(tmp_path, sim_root_dir, sim_root,
                                                           model):
    alpha = site(tmp_path, sim_root_dir, sim_root)
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir), fakes.plan())
    round_, _ = admitted(tmp_path, sim_root_dir, sim_root, model, handle, {1: alpha})
    round_.refused(1, Refusal(code="aggregator-attestation", detail="measurement: X"))
    assert round_.record.site_refusals == {"alpha": "aggregator-attestation: measurement: X"}
    assert round_.record.attested == ["alpha"] and round_.record.quarantined == {}
    assert round_.admitted == [] and round_.aggregate().arrays is None


def test_aggregator_required_without_a_policy_is_a_config_error():
    with pytest.raises(ValueError, match=r"aggregator\.required needs aggregator\.policy"):
        AggregatorTrust(required=True)


# ----------------------------------------------------------------------------- metrics


def _evaluate(round_, runtime, node_id, blob, model, *, with_evidence=True):
    digest = arrays_digest(model)
    sealed = round_.seal([node_id], model, direction="evaluate", model_digest=digest)[node_id]
    evidence = round_.aggregator_evidence(node_id) if with_evidence else None
    result, _ = SiteProtocol(runtime, TaskTrainer()).evaluate(blob, sealed, None, evidence)
    return result, digest


def test_per_site_metrics_leave_the_aggregator_only_when_the_site_shares_them(
        tmp_path, sim_root_dir, sim_root, model):
    sites = {1: site(tmp_path, sim_root_dir, sim_root, "alpha", 0, share=True),
             2: site(tmp_path, sim_root_dir, sim_root, "beta", 1, share=False)}
    handle = AggregatorHandle(launch(tmp_path, sim_root_dir), fakes.plan())
    round_, blobs = admitted(tmp_path, sim_root_dir, sim_root, model, handle, sites)
    round_.end_training(None)
    for node_id, runtime in sites.items():
        sealed, digest = _evaluate(round_, runtime, node_id, blobs[node_id], model)
        assert round_.submit_metrics(node_id, sealed, digest)
    released = round_.release_metrics()
    assert set(released.per_site) == {"alpha"} and released.sites == ("alpha", "beta")
    assert round_.record.sites["alpha"].evaluation is not None
    assert round_.record.sites["beta"].evaluation is None  # the operator never sees beta's
    assert set(round_.record.metrics_mean) >= {"accuracy", "loss"}


def test_a_site_that_does_not_share_refuses_to_evaluate_for_an_unattested_coordinator(
        tmp_path, sim_root_dir, sim_root, model):
    beta = site(tmp_path, sim_root_dir, sim_root, "beta", 1, required=False, share=False)
    round_ = CoordinatorRound(gate=fakes.gate(tmp_path, sim_root, {2: "beta"}),
                              plan=fakes.plan(), run_id="run-1", round=1,
                              model_digest=arrays_digest(model))
    answer = SiteProtocol(beta, TaskTrainer()).answer(round_.challenge(2))
    round_.admit(2, answer.response, answer.evidence, answer.endorsement)
    round_.end_attestation()
    round_.end_training(None)
    result, _ = _evaluate(round_, beta, 2, answer.session, model, with_evidence=False)
    assert isinstance(result, Refusal) and result.code == "metrics-not-shared"


# ----------------------------------------------------------------------------- the core


def _core(tmp_path, sim_root_dir, plan=None, **kw) -> AggregatorCore:
    from cleanroom.coordinator.aggregator_enclave import build_provider

    return AggregatorCore(build_provider(launch(tmp_path, sim_root_dir)), plan or
                          no_dp_plan(), **kw)


def _sealed_update(core, update, rows, site="alpha", loss=None):
    signer = ed25519.Ed25519PrivateKey.generate()
    from cleanroom.protocol.envelope import signer_public_bytes

    core.admit(1, SiteSlot(site, signer_public_bytes(signer), rows))
    report = TrainReport(num_examples=rows, steps=core.plan.local_steps, train_loss=loss)
    context = EnvelopeContext("update", "run-1", 1, site, arrays_digest(core._state(1).model))
    return seal_update(update, report, core.public_key(1), context, signer)


def test_the_core_releases_the_weighted_mean_only(tmp_path, sim_root_dir, model):
    core = _core(tmp_path, sim_root_dir)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    a = OrderedDict((k, v + 0.01) for k, v in model.items())
    b = OrderedDict((k, v - 0.03) for k, v in model.items())
    assert core.submit_update(1, "alpha", _sealed_update(core, a, 100, "alpha", 0.5)).accepted
    assert core.submit_update(1, "beta", _sealed_update(core, b, 300, "beta", 0.7)).accepted
    result = core.aggregate(1)
    for k in model:
        np.testing.assert_allclose(result.arrays[k], (a[k] * 100 + b[k] * 300) / 400,
                                   rtol=1e-6)
    assert result.total_examples == 400 and result.train_loss == pytest.approx(0.65)
    core.end_round(1)
    with pytest.raises(CleanroomError, match="no round 1"):
        core.aggregate(1)


def test_the_weighted_mean_is_released_once_and_chunked(tmp_path, sim_root_dir, model,
                                                        monkeypatch):
    """The running sums are folded and released a few elements at a time (no parameter-sized
    float64 temporaries; here 5-element chunks), freed by the release: a second release and
    an update after it are refused."""
    from cleanroom.coordinator import validation

    monkeypatch.setattr(validation, "CHUNK", 5)
    core = _core(tmp_path, sim_root_dir)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    a = OrderedDict((k, v + 0.01) for k, v in model.items())
    b = OrderedDict((k, v - 0.03) for k, v in model.items())
    assert core.submit_update(1, "alpha", _sealed_update(core, a, 100, "alpha")).accepted
    late = _sealed_update(core, b, 300, "gamma")
    assert core.submit_update(1, "beta", _sealed_update(core, b, 300, "beta")).accepted
    result = core.aggregate(1)
    for k in model:
        assert result.arrays[k].dtype == model[k].dtype
        np.testing.assert_allclose(result.arrays[k], (a[k] * 100 + b[k] * 300) / 400,
                                   rtol=1e-6)
    with pytest.raises(CleanroomError, match="already released"):
        core.aggregate(1)
    assert "was released" in core.submit_update(1, "gamma", late).reason


def test_the_core_refuses_unadmitted_duplicate_and_foreign_updates(tmp_path, sim_root_dir,
                                                                    model):
    core = _core(tmp_path, sim_root_dir)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    sealed = _sealed_update(core, model, 100)
    assert "not admitted" in core.submit_update(1, "mallory", sealed).reason
    assert core.submit_update(1, "alpha", sealed).accepted
    assert "already sent" in core.submit_update(1, "alpha", sealed).reason
    other = _sealed_update(core, model, 100, "beta")  # beta's signer is now registered...
    core.admit(1, SiteSlot("beta", ed25519.Ed25519PrivateKey.generate().public_key()
                           .public_bytes_raw(), 100))  # ...and replaced by another key
    assert "signature" in core.submit_update(1, "beta", other).reason


def test_the_core_keeps_at_most_two_rounds(tmp_path, sim_root_dir, model):
    core = _core(tmp_path, sim_root_dir)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    core.begin_round("run-1", 2, model, arrays_digest(model))
    with pytest.raises(CleanroomError, match="at most two rounds"):
        core.begin_round("run-1", 3, model, arrays_digest(model))


def test_central_dp_adds_noise_and_accounts_for_it(tmp_path, sim_root_dir, model):
    dp = CentralDp(noise_multiplier=1.0, clip=0.1, delta=1e-5)
    core = _core(tmp_path, sim_root_dir, central_dp=dp)
    epsilons = []
    for rnd in (1, 2):
        core.begin_round("run-1", rnd, model, arrays_digest(model))
        big = OrderedDict((k, v + 0.05) for k, v in model.items())  # clipped to 0.1
        for site in ("alpha", "beta"):
            signer = ed25519.Ed25519PrivateKey.generate()
            core.admit(rnd, SiteSlot(site, signer.public_key().public_bytes_raw(), 100))
            context = EnvelopeContext("update", "run-1", rnd, site, arrays_digest(model))
            report = TrainReport(num_examples=100, steps=core.plan.local_steps)
            assert core.submit_update(rnd, site, seal_update(
                big, report, core.public_key(rnd), context, signer)).accepted
        result = core.aggregate(rnd)
        delta = np.concatenate([(result.arrays[k] - model[k]).ravel() for k in model])
        assert not np.allclose(delta, 0.1 / np.sqrt(delta.size))  # noise, not just the clip

        epsilons.append(result.central_epsilon)
        core.end_round(rnd)
    assert 0 < epsilons[0] < epsilons[1]


def test_central_dp_clips_each_delta_chunk_by_chunk(tmp_path, sim_root_dir, model,
                                                    monkeypatch):
    """With the noise drawn as zeros, the release is exactly the mean of the clipped deltas:
    the clip is applied over the whole update although it is folded 3 elements at a time."""
    from cleanroom.coordinator import aggregator as aggregator_module
    from cleanroom.coordinator import validation

    class ZeroNoise:
        def normal(self, loc, scale, size):
            assert scale == pytest.approx(0.1)  # multiplier x clip
            return np.zeros(size)

    monkeypatch.setattr(validation, "CHUNK", 3)
    monkeypatch.setattr(aggregator_module.np.random, "default_rng", lambda: ZeroNoise())
    core = _core(tmp_path, sim_root_dir,
                 central_dp=CentralDp(noise_multiplier=1.0, clip=0.1, delta=1e-5))
    core.begin_round("run-1", 1, model, arrays_digest(model))
    size = sum(v.size for v in model.values())
    steps = {"alpha": 0.05, "beta": 0.001}  # alpha's delta is clipped, beta's is not
    for site, step in steps.items():
        moved = OrderedDict((k, v + np.float32(step)) for k, v in model.items())
        assert core.submit_update(1, site, _sealed_update(core, moved, 100, site)).accepted
    result = core.aggregate(1)
    expect = (0.1 / np.sqrt(size) + 0.001) / 2
    for k in model:
        np.testing.assert_allclose(result.arrays[k] - model[k], expect, atol=2e-6)


def test_robust_strategies_aggregate_inside(tmp_path, sim_root_dir, model):
    krum = build_strategy("krum", min_nodes=2)
    core = _core(tmp_path, sim_root_dir, robust=krum)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    near = [OrderedDict((k, v + d) for k, v in model.items()) for d in (0.01, 0.011, 0.012)]
    for i, update in enumerate(near):
        assert core.submit_update(1, f"s{i}", _sealed_update(core, update, 100, f"s{i}")
                                  ).accepted
    result = core.aggregate(1)
    assert any(all(np.allclose(result.arrays[k], u[k]) for k in model) for u in near)


def test_which_strategies_aggregate_by_a_mean():
    assert aggregates_by_sum(build_strategy("fedavg")) and \
        aggregates_by_sum(build_strategy("fedadam"))
    assert not aggregates_by_sum(build_strategy("krum"))
    assert not aggregates_by_sum(build_strategy("fedmedian"))


def test_central_dp_with_a_robust_strategy_is_refused(tmp_path):
    from cleanroom.simulations.engine import SimulationConfig, run_simulation

    with pytest.raises(ConfigError, match="does not aggregate by a mean"):
        run_simulation(SimulationConfig(out=tmp_path / "out", rounds=1, strategy="krum",
                                        central_epsilon=1.0, tracking=False, progress=False))


def test_metrics_sealed_for_another_round_are_refused(tmp_path, sim_root_dir, model):
    core = _core(tmp_path, sim_root_dir)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    signer = ed25519.Ed25519PrivateKey.generate()
    core.admit(1, SiteSlot("alpha", signer.public_key().public_bytes_raw(), 100))
    core.begin_evaluation(1, arrays_digest(model))
    report = EvaluateReport(num_examples=10, metrics={"accuracy": 0.5})
    wrong = EnvelopeContext("metrics", "run-1", 2, "alpha", arrays_digest(model))
    verdict = core.submit_metrics(1, "alpha", seal_metrics(report, core.public_key(1), wrong,
                                                           signer))
    assert not verdict.accepted and "refused" in verdict.reason


# ----------------------------------------------------------------------------- the process


def test_the_enclave_process_answers_and_types_its_errors(tmp_path, sim_root_dir, model):
    handle = AggregatorHandle(AggregatorLaunch(
        provider="simulated", state_dir=tmp_path / "enclave", simulated_root=sim_root_dir),
        no_dp_plan())
    try:
        assert handle.measurement == aggregator_measurement()
        public = handle.begin_round("run-1", 1, model, arrays_digest(model))
        assert len(public) == 32 and handle.public_key(1) == public
        with pytest.raises(CleanroomError, match="aggregator enclave: CleanroomError: the "
                           "aggregator has no round 5 open"):
            handle.aggregate(5)
        with pytest.raises(AttributeError):
            handle._rounds  # noqa: B018 - nothing but the listed calls crosses the pipe
    finally:
        handle.close()
    with pytest.raises(CleanroomError, match="closed"):
        handle.public_key(1)


def test_one_sites_update_alone_is_never_released(tmp_path, sim_root_dir, model):
    """The operator's process passes on only alpha's update (beta's is withheld): the
    aggregate would be alpha's update itself, so nothing is released."""
    core = _core(tmp_path, sim_root_dir)
    core.begin_round("run-1", 1, model, arrays_digest(model))
    signers = {}
    for site in ("alpha", "beta"):
        signers[site] = ed25519.Ed25519PrivateKey.generate()
        core.admit(1, SiteSlot(site, signers[site].public_key().public_bytes_raw(), 100))
    context = EnvelopeContext("update", "run-1", 1, "alpha", arrays_digest(model))
    report = TrainReport(num_examples=100, steps=core.plan.local_steps)
    moved = OrderedDict((k, v + 0.01) for k, v in model.items())
    assert core.submit_update(1, "alpha", seal_update(moved, report, core.public_key(1),
                                                      context, signers["alpha"])).accepted
    result = core.aggregate(1)
    assert result.arrays is None and result.sites == ()
    assert "at least 2" in (result.failure or "")
