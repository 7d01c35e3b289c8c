"""Model registry of Cleanroom FL: the architectures a site may agree to train.

Every model maps a float32 batch ``(n, n_features)`` to **logits of shape** ``(n,)`` (the last
unit dimension is squeezed); the probability of the positive class is ``sigmoid(logit)`` and the
training loss is binary cross-entropy on the logits (``BCEWithLogitsLoss``), i.e. FLamby's
Fed-Heart-Disease ``Baseline`` (a linear layer + sigmoid, BCE loss).

* ``logreg``: ``Linear(n_features, 1)``: FLamby's baseline.
* ``mlp``: ``Linear(n_features, 16) -> ReLU -> Linear(16, 1)``.

:func:`architecture_digest` is what sites pin in their policy: a SHA-256 over a canonical
description of the architecture (module tree, classes, parameter names, shapes, dtypes,
activation, output convention), independent of the weights, the seed, the process and the
machine. Parameters travel as ``OrderedDict[str, np.ndarray]`` (float32) via
:func:`get_parameters` / :func:`set_parameters`; Opacus wrappers are transparent.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["MODEL_NAMES", "HeartLogReg", "HeartMLP", "architecture_digest", "build_model",
           "get_parameters", "set_parameters"]

OPACUS_PREFIX = "_module."
DIGEST_SCHEMA = "cleanroom-fl/model-architecture/v1"
MLP_HIDDEN = 16


class HeartLogReg(nn.Module):
    """Logistic regression: ``Linear(n_features, 1)``; forward returns logits of shape (n,)."""

    activation = "none"
    output = "logit (n,), sigmoid + BCE"

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class HeartMLP(nn.Module):
    """``Linear(n_features, 16) -> ReLU -> Linear(16, 1)``; logits of shape (n,)."""

    activation = "relu"
    output = "logit (n,), sigmoid + BCE"

    def __init__(self, n_features: int, hidden: int = MLP_HIDDEN) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(x))).squeeze(-1)


_REGISTRY: dict[str, Callable[[int], nn.Module]] = {
    "logreg": HeartLogReg,
    "mlp": HeartMLP,
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _check_name(name: str) -> Callable[[int], nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of "
                         f"{', '.join(MODEL_NAMES)}") from None


def build_model(name: str, n_features: int = 13, seed: int | None = None) -> nn.Module:
    """A fresh float32 model; ``seed`` makes its initial weights reproducible.

    The forward pass returns logits of shape ``(n,)``. With ``seed=None`` the weights come from
    torch's global generator; otherwise they are re-drawn (PyTorch's default initialisation)
    from a private generator seeded with ``seed``, so they depend on nothing else.
    """
    factory = _check_name(name)
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    model = factory(n_features).to(torch.float32)
    if seed is not None:
        _reset_parameters(model, torch.Generator().manual_seed(seed))
    return model


def _reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    bound = 1.0 / math.sqrt(m.in_features) if m.in_features > 0 else 0.0
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif any(True for _ in m.parameters(recurse=False)):
                raise NotImplementedError(f"no seeded initialisation for {type(m).__name__}")


def _describe(name: str, n_features: int) -> dict[str, object]:
    model = _check_name(name)(n_features)
    modules = [{"path": path, "class": type(m).__name__, "config": m.extra_repr()}
               for path, m in model.named_modules()]
    params = [{"name": p_name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
              for p_name, p in model.named_parameters()]
    buffers = [{"name": b_name, "shape": list(b.shape), "dtype": str(b.dtype)}
               for b_name, b in model.named_buffers()]
    return {"schema": DIGEST_SCHEMA, "model": name, "n_features": n_features,
            "modules": modules, "parameters": params, "buffers": buffers,
            "activation": getattr(model, "activation", "none"),
            "output": getattr(model, "output", "logit")}


def architecture_digest(name: str, n_features: int = 13) -> str:
    """Hex SHA-256 of the canonical JSON description of the architecture (not the weights)."""
    canonical = json.dumps(_describe(name, n_features), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _plain_name(name: str) -> str:
    while name.startswith(OPACUS_PREFIX):
        name = name[len(OPACUS_PREFIX):]
    return name


def get_parameters(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Float32 numpy copies of the trainable parameters, Opacus's ``_module.`` prefix removed."""
    return OrderedDict((_plain_name(n), p.detach().cpu().numpy().astype(np.float32, copy=True))
                       for n, p in model.named_parameters())


def set_parameters(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``arrays`` into ``model`` in place (strict).

    Raises ``ValueError`` naming the parameter if a name is missing or unexpected, or if an array
    has the wrong shape, is not float32, or holds a NaN/inf. Nothing is changed on error.
    """
    params = OrderedDict((_plain_name(n), p) for n, p in model.named_parameters())
    missing = [n for n in params if n not in arrays]
    if missing:
        raise ValueError(f"missing parameter {missing[0]!r} (missing: {', '.join(missing)})")
    unexpected = [n for n in arrays if n not in params]
    if unexpected:
        raise ValueError(f"unexpected parameter {unexpected[0]!r} "
                         f"(unexpected: {', '.join(map(str, unexpected))})")
    tensors: dict[str, torch.Tensor] = {}
    for n, p in params.items():
        a = arrays[n]
        if not isinstance(a, np.ndarray):
            raise ValueError(f"parameter {n!r}: expected a numpy array, got {type(a).__name__}")
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"parameter {n!r}: shape {tuple(a.shape)}, expected "
                             f"{tuple(p.shape)}")
        if a.dtype != np.float32:
            raise ValueError(f"parameter {n!r}: dtype {a.dtype}, expected float32")
        if not np.isfinite(a).all():
            raise ValueError(f"parameter {n!r}: contains NaN or infinite values")
        tensors[n] = torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
