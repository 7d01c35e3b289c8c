"""Local DP training, evaluation and the RDP accountant."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cleanroom.models import build_model, get_parameters
from cleanroom.site_agent.data import load_heart_disease_site
from cleanroom.site_agent.training import (
    TrainSettings,
    calibrate_noise,
    epsilon_spent,
    evaluate,
    train_local,
)


@pytest.fixture(scope="module")
def cleveland():  # -> SiteData
    return load_heart_disease_site("cleveland")


def _settings(**kw: object) -> TrainSettings:
    base: dict[str, object] = dict(local_steps=7, sample_rate=0.2, lr=0.1, optimizer="sgd",
                                   momentum=0.0, max_grad_norm=1.0, noise_multiplier=1.0)
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_dp_training_takes_exact_steps_and_changes_params(cleveland, model: str) -> None:
    start = get_parameters(build_model(model, seed=0))
    res = train_local(model, start, cleveland, _settings(), seed=3)
    assert res.steps == 7
    assert res.num_examples == cleveland.n_train
    assert res.noise_multiplier == 1.0 and res.sample_rate == 0.2
    assert list(res.parameters) == list(start)
    assert any(not np.array_equal(res.parameters[k], start[k]) for k in start)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in res.parameters.values())
    again = train_local(model, start, cleveland, _settings(), seed=3)
    assert all(np.array_equal(res.parameters[k], again.parameters[k]) for k in start)
    other = train_local(model, start, cleveland, _settings(), seed=4)
    assert any(not np.array_equal(res.parameters[k], other.parameters[k]) for k in start)


def test_dp_training_with_empty_batches_still_counts_steps(cleveland) -> None:
    start = get_parameters(build_model("logreg", seed=0))
    res = train_local("logreg", start, cleveland, _settings(sample_rate=1e-4, local_steps=5),
                      seed=0)
    assert res.steps == 5  # (almost surely) empty Poisson batches are still DP steps


def test_no_dp_training_improves_accuracy(cleveland) -> None:
    start = get_parameters(build_model("logreg", seed=0))
    _, acc0 = evaluate("logreg", start, cleveland.test_x, cleveland.test_y)
    loss0, _ = evaluate("logreg", start, cleveland.train_x, cleveland.train_y)
    res = train_local("logreg", start, cleveland,
                      _settings(noise_multiplier=None, sample_rate=1.0, local_steps=30), seed=0)
    assert res.steps == 30 and res.noise_multiplier is None
    loss1, _ = evaluate("logreg", res.parameters, cleveland.train_x, cleveland.train_y)
    _, acc1 = evaluate("logreg", res.parameters, cleveland.test_x, cleveland.test_y)
    assert loss1 < loss0
    assert acc1 > acc0 + 0.1 and acc1 > 0.7


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        _settings(optimizer="rmsprop")
    with pytest.raises(ValueError, match="sample_rate"):
        _settings(sample_rate=0.0)
    with pytest.raises(ValueError, match="local_steps"):
        _settings(local_steps=0)


@pytest.mark.parametrize(("epsilon", "rate", "steps"), [(1.0, 1.0, 10), (1.0, 0.2, 50),
                                                       (4.0, 0.05, 200)])
def test_calibrate_then_spend(epsilon: float, rate: float, steps: int) -> None:
    sigma = calibrate_noise(epsilon, 1e-5, rate, steps)
    spent = epsilon_spent([(sigma, rate, steps)], 1e-5)
    assert spent <= epsilon
    assert spent > epsilon - 0.02
    # the same charge split over rounds composes to the same epsilon
    per_round = [(sigma, rate, steps // 5)] * 5
    assert epsilon_spent(per_round, 1e-5) == pytest.approx(spent, rel=1e-9)


def test_epsilon_grows_with_charges() -> None:
    charge = (2.0, 0.5, 5)
    eps = [epsilon_spent([charge] * k, 1e-5) for k in range(0, 5)]
    assert eps[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(eps))
    assert epsilon_spent([(0.0, 1.0, 1)], 1e-5) == float("inf")
    with pytest.raises(ValueError):
        calibrate_noise(1.0, 0.0, 0.5, 10)
