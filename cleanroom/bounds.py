"""How far an honest site's update can move the model in one round, derived from the plan.

An honest site runs exactly ``T = plan.local_steps`` optimiser steps of DP-SGD on its own
``n`` training rows. Each step's gradient is ``(sum of B per-example gradients, each clipped to
C) + N(0, sigma^2 C^2 I_d)`` divided by the expected batch ``q n``, where ``B ~ Binomial(n, q)``
is the Poisson batch. So, with probability at least ``1 - p`` per site and round:

* batch: ``B <= b`` with ``b = n`` when ``q = 1`` and otherwise the Chernoff bound
  ``P(B >= (1 + e) q n) <= exp(-e^2 q n / (2 + e))`` solved for ``e`` at ``p / (2T)``;
* noise: ``||N(0, sigma^2 C^2 I_d)|| <= sigma C (sqrt(d) + sqrt(2 ln(2T / p)))`` (Gaussian
  concentration of a 1-Lipschitz function);
* a step's gradient norm is then at most ``g = (b C + sigma C (sqrt(d) + t)) / (q n)``;
* SGD with momentum ``beta``: ``||update|| <= lr T g / (1 - beta)`` (each step's velocity is a
  geometric sum of gradients; FedProx's proximal pull only shrinks ``w - w_global``);
* Adam: each coordinate moves at most ``lr (1 - beta1) / sqrt(1 - beta2)`` per step (Kingma &
  Ba, sec. 2.1; ``lr`` when that ratio is below 1), so ``||update|| <= lr T r sqrt(d)``.

The union bound over the ``T`` steps gives the stated false-refusal probability ``p``
(:data:`FALSE_REFUSAL`) for an honest site. Without DP nothing clips the gradients, so no
bound follows from the plan: the operator's configured bound applies.
"""

from __future__ import annotations

import math

from cleanroom.protocol.wire import TrainPlan

FALSE_REFUSAL = 1e-9  # probability that an honest site's update exceeds its bound, per round
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the site's trainer uses


def batch_bound(n: int, q: float, p: float) -> float:
    """An upper bound on a Binomial(n, q) batch that fails with probability at most ``p``."""
    if q >= 1.0:
        return float(n)
    mean = q * n
    log_term = math.log(1.0 / p)
    # smallest e with e^2 mean / (2 + e) >= log_term:  mean e^2 - L e - 2 L = 0
    e = (log_term + math.sqrt(log_term**2 + 8 * mean * log_term)) / (2 * mean)
    return min(float(n), (1.0 + e) * mean)


def dp_update_bound(plan: TrainPlan, *, noise_multiplier: float, n_examples: int,
                    n_params: int, false_refusal: float = FALSE_REFUSAL) -> float:
    """The L2 bound on ``update - global`` for an honest DP site with ``n_examples`` rows."""
    if n_examples < 1 or n_params < 1:
        raise ValueError("n_examples and n_params must be >= 1")
    steps = plan.local_steps
    q, clip, lr = plan.sample_rate, plan.dp.max_grad_norm, plan.lr
    p_each = false_refusal / (2 * steps)  # union over T batch and T noise events
    if plan.optimizer == "adam":
        beta1, beta2 = ADAM_BETAS
        ratio = max(1.0, (1 - beta1) / math.sqrt(1 - beta2))
        return lr * steps * ratio * math.sqrt(n_params)
    t = math.sqrt(2 * math.log(1.0 / p_each))
    noise = noise_multiplier * clip * (math.sqrt(n_params) + t)
    grad = (batch_bound(n_examples, q, p_each) * clip + noise) / (q * n_examples)
    return lr * steps * grad / (1.0 - plan.momentum)


def update_bound(plan: TrainPlan, *, noise_multiplier: float | None, n_examples: int,
                 n_params: int) -> float:
    """The bound a site's update is held to: derived under DP (the operator's configured
    ``max_update_norm`` can only tighten it), the configured one without DP."""
    configured = plan.max_update_norm if plan.max_update_norm is not None else math.inf
    if noise_multiplier is None:
        return configured
    return min(configured, dp_update_bound(plan, noise_multiplier=noise_multiplier,
                                           n_examples=n_examples, n_params=n_params))
