"""The update bound derived from the plan: honest DP updates pass (with the stated
false-refusal probability), a 10x update does not."""

from __future__ import annotations

import math

import pytest

from cleanroom.bounds import batch_bound, dp_update_bound, update_bound
from tests import fakes


def test_full_batch_bound_is_the_batch():
    assert batch_bound(200, 1.0, 1e-9) == 200


def test_poisson_batch_bound_holds_empirically():
    import numpy as np

    rng = np.random.default_rng(0)
    n, q = 500, 0.05
    bound = batch_bound(n, q, 1e-4)
    assert q * n < bound < n
    assert (rng.binomial(n, q, size=200_000) > bound).mean() <= 1e-4


def test_the_bound_grows_with_noise_and_shrinks_with_data():
    plan = fakes.plan()
    small = dp_update_bound(plan, noise_multiplier=2.0, n_examples=50, n_params=14)
    large = dp_update_bound(plan, noise_multiplier=2.0, n_examples=5000, n_params=14)
    noisier = dp_update_bound(plan, noise_multiplier=8.0, n_examples=50, n_params=14)
    assert large < small < noisier
    assert large == pytest.approx(plan.lr * plan.dp.max_grad_norm, rel=0.05)  # -> lr * C


def test_without_dp_the_configured_bound_applies():
    plan = fakes.plan(dp=False)
    assert update_bound(plan, noise_multiplier=None, n_examples=10, n_params=14) == \
        plan.max_update_norm
    assert math.isfinite(plan.max_update_norm)


def test_a_configured_bound_can_only_tighten_the_derived_one():
    plan = fakes.plan(max_update_norm=0.01)
    assert update_bound(plan, noise_multiplier=2.0, n_examples=50, n_params=14) == 0.01


def test_adam_bound_is_per_coordinate():
    plan = fakes.plan(optimizer="adam", lr=0.01)
    assert dp_update_bound(plan, noise_multiplier=1.0, n_examples=10, n_params=100) == \
        pytest.approx(0.01 * 1 * (0.1 / math.sqrt(0.001)) * 10)


def test_honest_dp_updates_pass_and_ten_times_one_does_not(tmp_path, sim_root_dir, sim_root):
    """Real DP training at a site, many times: every honest update is within its bound; the
    same update scaled by 10 is not."""
    from cleanroom.coordinator.validation import update_norm
    from cleanroom.models import build_model, get_parameters
    from cleanroom.site_agent.settings import decide_settings
    from cleanroom.site_agent.trainers import TaskTrainer
    from tests.site.test_settings import challenge

    runtime = fakes.site(tmp_path, sim_root_dir, sim_root, "alpha", 0)
    plan = fakes.plan()
    settings = decide_settings(runtime, challenge(plan))
    model = get_parameters(build_model("logreg", seed=0))
    trainer = TaskTrainer()
    ratios = []
    for seed in range(30):
        out = trainer.train(runtime, plan, model, settings, seed, {})
        bound = update_bound(plan, noise_multiplier=settings.noise_multiplier,
                             n_examples=out.num_examples, n_params=14)
        norm = update_norm(out.parameters, model)
        ratios.append(norm / bound)
        scaled = {k: model[k] + 10 * (out.parameters[k] - model[k]) for k in model}
        assert update_norm(scaled, model) > bound or norm < bound / 10
    assert max(ratios) < 1.0
    assert sorted(ratios)[len(ratios) // 2] > 0.1  # the bound is not vacuous: 10x is refused
