"""Local training of one site: DP-SGD with Opacus, evaluation, and the privacy accountant.

One call of :func:`train_local` is one round of local work: exactly ``local_steps`` optimiser
steps, each on a Poisson-sampled logical batch (every training row is included independently
with probability ``sample_rate``; an empty batch is a valid step, exactly as Opacus's
``DPDataLoader`` produces it). With DP, Opacus's :class:`GradSampleModule` computes per-sample
gradients and :class:`DPOptimizer` clips them to ``max_grad_norm``, adds Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` to their sum and divides by the
*expected* batch size ``sample_rate * n_train`` (the unbiased estimator for Poisson sampling).
Without DP the loop is the same, minus clipping and noise.

Privacy accounting uses one accountant everywhere: Opacus's RDP accountant. A site calibrates
its noise with :func:`calibrate_noise` for the whole run (``rounds * local_steps`` steps at its
own sampling rate) and charges every round's :class:`TrainResult` (``noise_multiplier``,
``sample_rate``, ``steps``) to its ledger; :func:`epsilon_spent` turns the ledger's history into
epsilon. The guarantee covers the released parameters only: ``train_loss`` is computed on the
private rows without noise, so it must not leave the site under DP.

Randomness (batch sampling and DP noise) is drawn from generators seeded with ``seed``, so a
call is reproducible. The DP guarantee assumes the noise is unpredictable to the adversary:
in production use ``secure_noise=True`` (seeds from the OS CSPRNG) or a secret seed.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cleanroom.models import build_model, get_parameters, set_parameters
from cleanroom.privacy import RDP_ALPHAS, calibrate_noise, epsilon_spent  # noqa: F401 (re-exported)
from cleanroom.site_agent.data import SiteData

log = logging.getLogger(__name__)

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one round of local training.

    ``noise_multiplier=None`` disables DP (no clipping, no noise). ``proximal_mu`` > 0 adds
    FedProx's proximal term ``mu/2 * ||w - w_global||^2``; its gradient is data-independent, so
    under DP it is added after clipping and noise and costs no privacy.
    """

    local_steps: int
    sample_rate: float
    lr: float
    optimizer: str
    momentum: float
    max_grad_norm: float
    noise_multiplier: float | None
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not (
                self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0 or None, got "
                             f"{self.noise_multiplier}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_local`; ``(noise_multiplier, sample_rate, steps)`` is the charge."""

    parameters: OrderedDict[str, np.ndarray]
    steps: int
    num_examples: int
    train_loss: float
    noise_multiplier: float | None
    sample_rate: float
    max_grad_norm: float | None = None
    """The clip actually used (DP only; :func:`train_local` leaves it unset)."""
    task_digest: str = ""
    """:func:`cleanroom.site_agent.trainer.train_task`: the task that ran."""
    dataset_digest: str = ""
    """:func:`cleanroom.site_agent.trainer.train_task`: the registered data it ran on."""


def _loss_fn() -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="sum")


def _make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)


def _seeds(seed: int, secure: bool) -> tuple[int, int]:
    if secure:
        return (int.from_bytes(os.urandom(8), "little") >> 1,
                int.from_bytes(os.urandom(8), "little") >> 1)
    ss = np.random.SeedSequence(seed % (1 << 128))
    a, b = ss.generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def train_local(model_name: str, global_params: Mapping[str, np.ndarray], data: SiteData,
                settings: TrainSettings, seed: int, *, secure_noise: bool = False) -> TrainResult:
    """Train ``model_name`` from ``global_params`` on ``data.train_*`` for one round.

    Takes exactly ``settings.local_steps`` optimiser steps (each one DP step when DP is on) and
    returns the new parameters, the steps taken (the number to charge to the privacy ledger),
    ``num_examples = data.n_train``, the mean training loss over the sampled batches, and the
    DP settings used. Deterministic given ``seed`` unless ``secure_noise`` is set.
    Raises ``ValueError`` for bad parameters or settings.
    """
    if data.n_train < 1:
        raise ValueError(f"site {data.site} has no training rows")
    model = build_model(model_name, n_features=data.n_features)
    set_parameters(model, global_params)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    sample_seed, noise_seed = _seeds(seed, secure_noise)
    sampler = torch.Generator().manual_seed(sample_seed)
    x_all = torch.from_numpy(np.ascontiguousarray(data.train_x, dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(data.train_y, dtype=np.float32))
    n = data.n_train
    expected_batch = settings.sample_rate * n
    base_opt = _make_optimizer(params, settings)
    loss_fn = _loss_fn()

    net: nn.Module = model
    dp_opt = None
    if settings.dp:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        net = GradSampleModule(model, loss_reduction="sum")
        dp_opt = DPOptimizer(base_opt, noise_multiplier=float(settings.noise_multiplier or 0.0),
                             max_grad_norm=settings.max_grad_norm,
                             expected_batch_size=expected_batch,  # type: ignore[arg-type]
                             loss_reduction="mean",
                             generator=torch.Generator().manual_seed(noise_seed))
    net.train()

    losses: list[float] = []
    seen = 0
    steps = 0
    for _ in range(settings.local_steps):
        if settings.sample_rate >= 1.0:
            xb, yb = x_all, y_all
        else:
            mask = torch.rand(n, generator=sampler) < settings.sample_rate
            xb, yb = x_all[mask], y_all[mask]
        if dp_opt is not None:
            dp_opt.zero_grad(set_to_none=True)
        else:
            base_opt.zero_grad(set_to_none=True)
        if dp_opt is not None:
            # Opacus's full backward hooks warn when no input requires grad; the input
            # gradient of these tiny models is free.
            xb = xb.detach().requires_grad_(True)
        loss = loss_fn(net(xb), yb)
        loss.backward()
        if xb.shape[0] > 0:
            losses.append(float(loss.detach()))
            seen += int(xb.shape[0])
        if dp_opt is not None:
            took = dp_opt.pre_step()
            if not took:  # only with gradient accumulation, which we never use
                raise RuntimeError("Opacus skipped a step")
        else:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad /= expected_batch
        if anchor is not None:
            for p, p0 in zip(params, anchor, strict=True):
                p.grad.add_(p.detach() - p0, alpha=settings.proximal_mu)  # type: ignore[union-attr]
        base_opt.step()
        steps += 1

    new_params = get_parameters(model)
    if net is not model:
        # Opacus's hooks tie the model, its parameters and per-sample gradients into reference
        # cycles that live until the next GC pass (~0.8-1 GB per call at 10M parameters):
        # remove them now, so reference counting frees everything on return.
        net._close()  # type: ignore[operator]
        for p in params:
            p.grad = None
            p.summed_grad = None  # type: ignore[attr-defined]
    bad = [k for k, v in new_params.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"training diverged: parameter {bad[0]!r} is not finite (lower lr)")
    train_loss = sum(losses) / seen if seen else float("nan")
    log.debug("site %s: %d local steps (%s), mean batch %.1f", data.site, steps,
              "dp" if settings.dp else "no dp", seen / steps)
    return TrainResult(parameters=new_params, steps=steps, num_examples=n,
                       train_loss=float(train_loss), noise_multiplier=settings.noise_multiplier,
                       sample_rate=settings.sample_rate)


def evaluate(model_name: str, params: Mapping[str, np.ndarray], x: np.ndarray,
             y: np.ndarray) -> tuple[float, float]:
    """(mean binary cross-entropy, accuracy at threshold 0.5) of ``params`` on ``(x, y)``."""
    x_arr = np.ascontiguousarray(x, dtype=np.float32)
    y_arr = np.ascontiguousarray(y, dtype=np.float32).reshape(-1)
    if x_arr.ndim != 2 or x_arr.shape[0] != y_arr.shape[0]:
        raise ValueError(f"x must be (n, d) and y (n,), got {x_arr.shape} and {y_arr.shape}")
    if x_arr.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set")
    model = build_model(model_name, n_features=x_arr.shape[1])
    set_parameters(model, params)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_arr)).reshape(-1)
        yt = torch.from_numpy(y_arr)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, yt)
        accuracy = ((logits > 0).to(torch.float32) == yt).to(torch.float32).mean()
    return float(loss), float(accuracy)


