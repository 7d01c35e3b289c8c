"""The site's own decision about a round (policy, approval, DP caps), alone."""

from __future__ import annotations

import pytest

from cleanroom.errors import SiteRefusal
from cleanroom.protocol.wire import AttestChallenge
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


def test_an_approved_run_is_accepted(runtime):
    site = runtime(policy=SitePolicyConfig(require_approval=True))
    site.approvals.approve("r1")
    assert decide_settings(site, challenge()).dp


def test_a_plan_whose_model_digest_lies_is_refused(runtime):
    lying = fakes.plan().model_copy(update={"model_architecture_digest": "a" * 64})
    with pytest.raises(SiteRefusal) as info:
        decide_settings(runtime(), challenge(lying))
    assert info.value.code == "model-mismatch"


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
