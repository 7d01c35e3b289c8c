"""Model registry: architecture digests and strict parameter loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleanroom.models import (
    MODEL_NAMES,
    architecture_digest,
    build_model,
    get_parameters,
    set_parameters,
)


def test_registry_and_output_shape() -> None:
    assert {"logreg", "mlp"} <= set(MODEL_NAMES)
    for name in MODEL_NAMES:
        out = build_model(name, seed=0)(torch.zeros(5, 13))
        assert out.shape == (5,)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")


def test_digest_stable_and_distinct() -> None:
    d1 = architecture_digest("logreg")
    build_model("logreg", seed=1)
    build_model("logreg", seed=2)
    assert architecture_digest("logreg") == d1
    assert len(d1) == 64 and int(d1, 16) >= 0
    assert architecture_digest("mlp") != d1
    assert architecture_digest("logreg", n_features=12) != d1


def test_seeded_builds_differ_in_weights_not_architecture() -> None:
    a = get_parameters(build_model("mlp", seed=1))
    b = get_parameters(build_model("mlp", seed=2))
    c = get_parameters(build_model("mlp", seed=1))
    assert list(a) == list(b)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_get_parameters_strips_opacus_prefix() -> None:
    from opacus import GradSampleModule

    model = build_model("logreg", seed=0)
    wrapped = GradSampleModule(model)
    params = get_parameters(wrapped)
    assert list(params) == ["linear.weight", "linear.bias"]
    assert all(v.dtype == np.float32 for v in params.values())
    set_parameters(wrapped, params)


def test_set_parameters_roundtrip_and_rejects() -> None:
    model = build_model("logreg", seed=0)
    params = get_parameters(model)
    new = {k: np.full_like(v, 0.5) for k, v in params.items()}
    set_parameters(model, new)
    assert all(np.all(v == 0.5) for v in get_parameters(model).values())

    wrong_shape = dict(new, **{"linear.weight": np.zeros((1, 12), np.float32)})
    with pytest.raises(ValueError, match=r"linear\.weight"):
        set_parameters(model, wrong_shape)
    nan = dict(new, **{"linear.bias": np.array([np.nan], np.float32)})
    with pytest.raises(ValueError, match=r"linear\.bias"):
        set_parameters(model, nan)
    with pytest.raises(ValueError, match="float32"):
        set_parameters(model, dict(new, **{"linear.bias": np.zeros(1, np.float64)}))
    with pytest.raises(ValueError, match=r"missing parameter 'linear\.bias'"):
        set_parameters(model, {"linear.weight": new["linear.weight"]})
    with pytest.raises(ValueError, match="unexpected parameter 'extra'"):
        set_parameters(model, dict(new, extra=np.zeros(1, np.float32)))
    # nothing was changed by the failed calls
    assert all(np.all(v == 0.5) for v in get_parameters(model).values())
