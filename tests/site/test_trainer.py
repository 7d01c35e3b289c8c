"""The site's trusted trainer: parity with train_local, the loss checks, and hostile tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cleanroom.errors import TaskError
from cleanroom.models import build_model, get_parameters
from cleanroom.site_agent.data import load_heart_disease_site
from cleanroom.site_agent.datasets import TaskData, frames_to_task_data
from cleanroom.site_agent.trainer import evaluate_task, train_task
from cleanroom.site_agent.training import (
    TrainSettings,
    epsilon_spent,
    evaluate,
    train_local,
)
from cleanroom.task import LoadedTask, load_task

HOSTILE = Path(__file__).parent / "hostile_tasks"


def _settings(**kw: object) -> TrainSettings:
    base: dict[str, object] = dict(local_steps=5, sample_rate=0.3, lr=0.1, optimizer="sgd",
                                   momentum=0.0, max_grad_norm=1.0, noise_multiplier=1.0)
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def heart() -> LoadedTask:
    return load_task("heart-disease")


@pytest.fixture(scope="module")
def cleveland(heart: LoadedTask) -> TaskData:
    train, test = heart.task.simulate(0, 4)  # type: ignore[misc]
    return frames_to_task_data(heart.task, train, test, digest="d" * 64)


def _synthetic(n: int = 60, seed: int = 0) -> TaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + rng.normal(0, 0.1, n)).astype(np.float32)
    y = np.abs(y) + 0.1  # positive: the Cox task reads it as a survival time
    return TaskData(dataset="synthetic", digest="s" * 64, features=("a", "b", "c"),
                    targets=("y",), train_x=x[:40], train_y=y[:40], test_x=x[40:],
                    test_y=y[40:])


def _start(loaded: LoadedTask) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return dict(get_parameters(loaded.task.model()))


# --------------------------------------------------------------------------- parity


def test_the_builtin_task_is_todays_logreg(heart: LoadedTask) -> None:
    from cleanroom.models.heart_disease.task import FEATURES
    from cleanroom.site_agent.data import FEATURE_NAMES

    assert FEATURES == FEATURE_NAMES
    assert heart.name == "heart-disease" and heart.n_features == 13 and heart.n_targets == 1
    assert list(get_parameters(heart.task.model())) == list(get_parameters(build_model("logreg")))
    assert heart.folder.name == "heart_disease"


@pytest.mark.parametrize("kw", [
    dict(noise_multiplier=None),
    dict(noise_multiplier=None, optimizer="adam", lr=0.01, sample_rate=1.0),
    dict(noise_multiplier=1.0),
    dict(noise_multiplier=1.0, optimizer="adam", lr=0.01),
    dict(noise_multiplier=0.8, momentum=0.9, proximal_mu=0.1, sample_rate=1.0),
    dict(noise_multiplier=1.0, sample_rate=1e-4),  # (almost surely) empty batches
])
def test_train_task_gives_train_locals_parameters(heart: LoadedTask, cleveland: TaskData,
                                                  kw: dict[str, object]) -> None:
    site = load_heart_disease_site("cleveland")
    start = get_parameters(build_model("logreg", seed=0))
    settings = _settings(local_steps=12, **kw)
    old = train_local("logreg", start, site, settings, seed=3)
    new = train_task(heart, start, cleveland, settings, seed=3)
    assert (new.steps, new.num_examples, new.noise_multiplier, new.sample_rate) == \
        (old.steps, old.num_examples, old.noise_multiplier, old.sample_rate)
    for k in start:
        if settings.dp:  # per-example gradients by vmap instead of hooks: float rounding
            np.testing.assert_allclose(new.parameters[k], old.parameters[k], rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(new.parameters[k], old.parameters[k])
    assert any(not np.array_equal(new.parameters[k], start[k]) for k in start)
    assert new.task_digest == heart.digest and new.dataset_digest == "d" * 64
    assert new.max_grad_norm == (1.0 if settings.dp else None)


@pytest.mark.parametrize("kw", [dict(sample_rate=1.0), dict(sample_rate=0.3),
                                dict(optimizer="adam", lr=0.01, momentum=0.0)])
def test_chunked_per_example_gradients_give_the_same_update(heart: LoadedTask,
                                                             cleveland: TaskData,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             kw: dict[str, object]) -> None:
    """A batch processed a few rows at a time (Opacus accumulating the clipped sum) trains
    exactly like one processed whole: same noise, same clipping, same update."""
    from cleanroom.site_agent import trainer

    start = get_parameters(build_model("logreg", seed=0))
    settings = _settings(local_steps=3, **kw)
    whole = train_task(heart, start, cleveland, settings, seed=5)
    row = sum(v.size for v in start.values()) * 4
    monkeypatch.setattr(trainer, "PER_EXAMPLE_BYTES", 7 * row)  # chunks of 7 rows
    assert trainer.chunk_rows([torch.from_numpy(v) for v in start.values()]) == 7
    chunked = train_task(heart, start, cleveland, settings, seed=5)
    for k in start:
        np.testing.assert_allclose(chunked.parameters[k], whole.parameters[k], rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize(("folder", "needle"), [
    ("write_param", "changed the model's parameters"),
])
def test_hostile_task_code_is_refused_in_chunks(folder: str, needle: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cleanroom.site_agent import trainer

    monkeypatch.setattr(trainer, "PER_EXAMPLE_BYTES", 1)  # one row per chunk
    try:
        loaded = load_task(HOSTILE / folder)
        with pytest.raises(TaskError, match=needle) as info:
            train_task(loaded, _start(loaded), _synthetic(), _settings(), seed=0)
        assert info.value.code == "task-tampered"
    finally:
        torch.normal = torch._C._VariableFunctions.normal  # type: ignore[assignment]


def test_evaluate_task_gives_todays_metrics(heart: LoadedTask, cleveland: TaskData) -> None:
    site = load_heart_disease_site("cleveland")
    params = train_task(heart, get_parameters(build_model("logreg", seed=0)), cleveland,
                        _settings(noise_multiplier=None, local_steps=20), seed=0).parameters
    loss, accuracy = evaluate("logreg", params, site.test_x, site.test_y)
    metrics = evaluate_task(heart, params, cleveland)
    assert set(metrics) == {"accuracy", "loss", "num-examples"}
    assert metrics["accuracy"] == pytest.approx(accuracy) and accuracy > 0.7
    assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["num-examples"] == site.n_test
    assert evaluate_task(heart, params, cleveland, split="train")["num-examples"] == site.n_train


def test_training_is_deterministic_by_seed_unless_secure(heart: LoadedTask,
                                                         cleveland: TaskData) -> None:
    start = get_parameters(build_model("logreg", seed=0))
    a = train_task(heart, start, cleveland, _settings(), seed=1)
    b = train_task(heart, start, cleveland, _settings(), seed=1)
    c = train_task(heart, start, cleveland, _settings(), seed=2)
    d = train_task(heart, start, cleveland, _settings(), seed=1, secure_noise=True)
    for k in start:
        np.testing.assert_array_equal(a.parameters[k], b.parameters[k])
    assert any(not np.array_equal(a.parameters[k], c.parameters[k]) for k in start)
    assert any(not np.array_equal(a.parameters[k], d.parameters[k]) for k in start)


def test_bad_parameters_and_mismatched_data_are_refused(heart: LoadedTask,
                                                        cleveland: TaskData) -> None:
    start = get_parameters(build_model("logreg", seed=0))
    with pytest.raises(TaskError, match="missing parameter") as info:
        train_task(heart, {"linear.weight": start["linear.weight"]}, cleveland, _settings(), 0)
    assert info.value.code == "parameters-invalid"
    with pytest.raises(TaskError, match="float32"):
        train_task(heart, {k: v.astype(np.float64) for k, v in start.items()}, cleveland,
                   _settings(), 0)
    with pytest.raises(TaskError, match="declares") as info:
        train_task(heart, start, _synthetic(), _settings(), 0)
    assert info.value.code == "task-data"


# --------------------------------------------------------------------------- loss checks


def test_a_cox_loss_is_refused_under_dp_and_trains_without() -> None:
    cox = load_task(HOSTILE / "cox_loss")
    data = _synthetic()
    with pytest.raises(TaskError, match="not decomposable") as info:
        train_task(cox, _start(cox), data, _settings(), seed=0)
    assert info.value.code == "task-loss"
    res = train_task(cox, _start(cox), data, _settings(noise_multiplier=None), seed=0)
    assert res.steps == 5 and res.noise_multiplier is None


def test_a_reduced_loss_is_refused() -> None:
    mean = load_task(HOSTILE / "mean_loss")
    for settings in (_settings(), _settings(noise_multiplier=None)):
        with pytest.raises(TaskError, match=r"shape \(32,\), got \(\)") as info:
            train_task(mean, _start(mean), _synthetic(), settings, seed=0)
        assert info.value.code == "task-loss"


def test_batchnorm_is_refused_under_dp_naming_the_module() -> None:
    bn = load_task(HOSTILE / "batchnorm")
    with pytest.raises(TaskError, match=r"module 1 \(BatchNorm1d\): BatchNorm cannot") as info:
        train_task(bn, _start(bn), _synthetic(), _settings(), seed=0)
    assert info.value.code == "task-model"


def test_a_raising_forward_is_a_typed_error() -> None:
    bad = load_task(HOSTILE / "raising_forward")
    with pytest.raises(TaskError, match="model forward raised RuntimeError: no") as info:
        train_task(bad, _start(bad), _synthetic(), _settings(), seed=0)
    assert info.value.code == "task-error"


# --------------------------------------------------------------------------- hostile tasks


def _after_refusal_torch_is_sane() -> None:
    assert torch.normal is torch._C._VariableFunctions.normal
    from torch.optim import optimizer

    assert not optimizer._global_optimizer_pre_hooks


@pytest.mark.parametrize(("folder", "dp", "needle"), [
    ("zero_noise_gc", True, "noise_multiplier changed"),
    ("patch_torch_normal", True, "torch.normal"),
    ("patch_at_import", True, "torch.normal"),
    ("swap_generator", True, "generator changed"),
    ("instance_add_noise", True, "noisy gradient differs"),
    ("reseed_generator", True, "noisy gradient differs"),
    ("noise_moves_param", True, "update differs"),
    ("shrink_clipped_sum", True, "noisy gradient differs"),
    ("raise_lr", True, "lr was changed"),
    ("raise_lr", False, "lr was changed"),
    ("optimizer_hook", True, "hooks were added"),
    ("extra_step", True, "changed the model's parameters"),
    ("extra_step", False, "changed the model's parameters"),
    ("write_param", True, "changed the model's parameters"),
    ("write_param", False, "changed the model's parameters"),
])
def test_hostile_task_code_is_refused(folder: str, dp: bool, needle: str) -> None:
    from torch.optim import optimizer

    try:
        loaded = load_task(HOSTILE / folder)
        start = _start(loaded)
        settings = _settings() if dp else _settings(noise_multiplier=None)
        with pytest.raises(TaskError, match=needle) as info:
            train_task(loaded, start, _synthetic(), settings, seed=0)
        assert info.value.code == "task-tampered"
        _after_refusal_torch_is_sane()
    finally:
        optimizer._global_optimizer_pre_hooks.clear()
        torch.normal = torch._C._VariableFunctions.normal  # type: ignore[assignment]
    # and the site trains honestly right after
    heart = load_task("heart-disease")
    train, test = heart.task.simulate(1, 4)  # type: ignore[misc]
    data = frames_to_task_data(heart.task, train, test)
    assert train_task(heart, get_parameters(build_model("logreg", seed=0)), data, _settings(),
                      seed=0).steps == 5


def test_task_attributes_never_set_the_charge() -> None:
    fake = load_task(HOSTILE / "fake_charge")
    settings = _settings(noise_multiplier=1.3, sample_rate=0.25, local_steps=7)
    res = train_task(fake, _start(fake), _synthetic(), settings, seed=0)
    assert (res.noise_multiplier, res.sample_rate, res.steps, res.max_grad_norm) == \
        (1.3, 0.25, 7, 1.0)
    charged = epsilon_spent([(res.noise_multiplier, res.sample_rate, res.steps)], 1e-5)
    assert charged == epsilon_spent([(1.3, 0.25, 7)], 1e-5) > 0


def test_noise_is_really_added_under_dp(heart: LoadedTask, cleveland: TaskData) -> None:
    """Same seed for sampling, noise 0 vs 1: the updates differ by the noise."""
    start = get_parameters(build_model("logreg", seed=0))
    quiet = train_task(heart, start, cleveland, _settings(noise_multiplier=0.0, lr=1.0), seed=0)
    noisy = train_task(heart, start, cleveland, _settings(noise_multiplier=5.0, lr=1.0), seed=0)
    gap = max(float(np.abs(quiet.parameters[k] - noisy.parameters[k]).max()) for k in start)
    assert gap > 0.05


# --------------------------------------------------------------------------- update check


@pytest.mark.parametrize("kw", [dict(optimizer="sgd", momentum=0.0),
                                dict(optimizer="sgd", momentum=0.9),
                                dict(optimizer="adam", lr=0.01, momentum=0.0)])
def test_the_update_check_takes_the_honest_step_and_refuses_an_altered_one(
        heart: LoadedTask, kw: dict[str, object]) -> None:
    """_Guard.check_update: the optimiser's own step passes (three steps, so momentum and
    Adam state matter), and so does one element a rounding away from it; the same step with
    one element moved by 0.1 % of its own step is refused, and so are a step made with a 1 %
    larger learning rate and a NaN element."""
    from cleanroom.site_agent.trainer import _Guard, _make_optimizer

    settings = _settings(**kw)
    for tamper in (None, "ulp", "element", "lr", "nan"):
        torch.manual_seed(1)
        model = torch.nn.Linear(300, 40)
        params = list(model.parameters())
        opt = _make_optimizer(params, settings)
        guard = _Guard(heart.task, model, opt, None, None, settings, params)
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
            start = [p.detach().clone() for p in params]
            opt.step()
            if step == 2 and tamper == "element":
                with torch.no_grad():
                    step_7 = float(params[0].view(-1)[7] - start[0].view(-1)[7])
                    params[0].view(-1)[7] += 1e-3 * abs(step_7)
            if step == 2 and tamper == "ulp":  # one rounding off: not bitwise, accepted
                with torch.no_grad():
                    x = params[0].view(-1)[7]
                    params[0].view(-1)[7] = torch.nextafter(x, x + 1)
            if step == 2 and tamper == "nan":
                with torch.no_grad():
                    params[0].view(-1)[7] = float("nan")
            if step == 2 and tamper == "lr":
                with torch.no_grad():
                    for p, p0 in zip(params, start, strict=True):
                        p.copy_(p0 + (p - p0) * 1.01)
            if step == 2 and tamper not in (None, "ulp"):
                with pytest.raises(TaskError, match="update differs") as info:
                    guard.check_update(start, grads)
                assert info.value.code == "task-tampered"
            else:
                guard.check_update(start, grads)


def test_the_noisy_gradient_comparison_refuses_any_element_off() -> None:
    """_within (the noisy-gradient check's comparison, max |a - e| <= tol in one temporary):
    equal and within-tolerance pass; one element past the tolerance, a NaN or an infinity on
    either side, or another shape, are refused."""
    from cleanroom.site_agent.trainer import CHECK_RTOL, _within

    torch.manual_seed(0)
    e = torch.randn(1000)
    tol = CHECK_RTOL * float(e.abs().max())
    assert _within(e.clone(), e)
    near = e.clone()
    near[3] += 0.5 * tol
    assert _within(near, e)
    assert _within(torch.zeros(0), torch.zeros(0))
    for bad in ("far", "nan", "inf", "expected-nan", "shape"):
        a, x = e.clone(), e.clone()
        if bad == "far":
            a[500] += 2 * tol
        elif bad == "nan":
            a[10] = float("nan")
        elif bad == "inf":
            a[10] = float("inf")
        elif bad == "expected-nan":
            x[10] = float("nan")
        else:
            a = a[:-1]
        assert not _within(a, x), bad
