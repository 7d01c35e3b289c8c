"""The site's own decision about a round (policy, approval, DP caps), alone."""

from __future__ import annotations

import pytest

from cleanroom.errors import SiteRefusal
from cleanroom.protocol.wire import AttestChallenge
from cleanroom.site_agent.approvals import ApprovalRequest
from cleanroom.site_agent.config import PrivacyConfig, SitePolicyConfig
from cleanroom.site_agent.settings import decide_settings, noise_for, round_seed
from tests import fakes


def challenge(plan=None, coordinator="coord-a") -> AttestChallenge:
    return AttestChallenge(run_id="r1", round=1, nonce=bytes(32),
                           coordinator_public_key=bytes(32), model_digest="0" * 64,
                           plan=plan or fakes.plan(), coordinator_id=coordinator, issued_at=0.0)


@pytest.fixture
def runtime(tmp_path, sim_root_dir, sim_root):
    def make(**config):
        return fakes.site(tmp_path, sim_root_dir, sim_root, **config)
    return make


@pytest.mark.parametrize("policy,code", [
    ({"coordinators": ["someone-else"]}, "coordinator-not-allowed"),
    ({"models": ["f" * 64]}, "model-not-allowed"),
    ({"require_approval": True}, "approval-required"),
])
def test_policy_refusals_are_typed(runtime, policy, code):
    with pytest.raises(SiteRefusal) as info:
        decide_settings(runtime(policy=SitePolicyConfig(**policy)), challenge())
    assert info.value.code == code


def test_an_approved_run_is_accepted_up_to_its_epsilon(runtime):
    site = runtime(policy=SitePolicyConfig(require_approval=True))
    with pytest.raises(SiteRefusal):
        decide_settings(site, challenge())
    site.approvals.approve(ApprovalRequest(run_id="r1", task_digest=fakes.TASK.digest,
                                           epsilon=0.25))
    settings = decide_settings(site, challenge())
    assert settings.dp and settings.epsilon_target == 0.25


def test_an_approval_of_another_task_does_not_count(runtime):
    site = runtime(policy=SitePolicyConfig(require_approval=True))
    site.approvals.approve(ApprovalRequest(run_id="r1", task_digest="cd" * 32, epsilon=1.0))
    with pytest.raises(SiteRefusal) as info:
        decide_settings(site, challenge())
    assert info.value.code == "approval-required"


def test_a_task_outside_the_policy_is_refused_before_anything_loads(runtime):
    """No [[policy.tasks]] entry and no approval: refused on digests alone."""
    with pytest.raises(SiteRefusal) as info:
        decide_settings(runtime(policy=SitePolicyConfig()), challenge())
    assert info.value.code == "task-not-approved"
    assert "nothing of it was loaded" in info.value.detail


def test_a_plan_whose_model_digest_lies_is_refused_by_the_trainer(runtime):
    """The coordinator cannot describe one model and ship another: the site's trainer loads
    the approved task by digest and compares."""
    from cleanroom.models import build_model, get_parameters
    from cleanroom.site_agent.trainers import TaskTrainer

    site = runtime()
    lying = fakes.plan().model_copy(update={"task": fakes.plan().task.model_copy(
        update={"architecture_digest": "a" * 64})})
    settings = decide_settings(site, challenge(lying))
    with pytest.raises(SiteRefusal) as info:
        TaskTrainer().train(site, lying, get_parameters(build_model("logreg", seed=0)),
                            settings, 0, {})
    assert info.value.code == "model-mismatch"


@pytest.mark.parametrize("mark,code", [("y", "field-identifying"), (None, "field-missing")])
def test_fields_the_site_will_not_serve_are_refused_at_attestation(runtime, mark, code):
    site = runtime()
    plan = fakes.plan()
    if mark:
        site.datasets.mark(plan.task.dataset, mark, identifying=True)
    else:
        plan = plan.model_copy(update={"task": plan.task.model_copy(
            update={"fields": (*plan.task.fields, "mrn")})})
    with pytest.raises(SiteRefusal) as info:
        decide_settings(site, challenge(plan))
    assert info.value.code == code


def test_no_dp_only_where_the_site_allows_it(runtime):
    no_dp = fakes.plan(dp=False)
    with pytest.raises(SiteRefusal) as info:
        decide_settings(runtime(), challenge(no_dp))
    assert info.value.code == "dp-required"
    allowed = runtime(privacy=PrivacyConfig(allow_no_dp=True))
    assert decide_settings(allowed, challenge(no_dp)).noise_multiplier is None


def test_the_site_caps_epsilon_and_calibrates_its_own_noise(runtime):
    greedy = fakes.plan(epsilon=50.0)
    site = runtime(privacy=PrivacyConfig(max_epsilon_per_run=0.5))
    settings = decide_settings(site, challenge(greedy))
    assert settings.epsilon_target == 0.5
    assert settings.noise_multiplier == pytest.approx(
        noise_for(0.5, 1e-5, greedy.sample_rate, greedy.rounds * greedy.local_steps))


def test_round_seed_differs_per_round_and_site():
    assert len({round_seed(s, r) for s in range(3) for r in range(1, 4)}) == 9
