"""Differential-privacy accounting both sides agree on: Opacus's RDP accountant.

A site calibrates its noise with :func:`calibrate_noise` and charges every step it takes to
its sealed ledger, which turns the history into epsilon with :func:`epsilon_spent`; the
attested aggregator accounts its central (user-level) noise the same way. Opacus is imported
only when a function runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

RDP_ALPHAS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)), *range(12, 64), 64, 80, 96, 128, 192, 256, 384, 512)
"""RDP orders of the accountant: Opacus's defaults extended to 512, so that the large noise
multipliers of full-batch training are not bounded loosely (same epsilon otherwise)."""

def _check_privacy_args(delta: float, sample_rate: float, steps: int) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) with epsilon_spent <= ``epsilon``.

    Opacus's ``get_noise_multiplier`` with the RDP accountant (orders :data:`RDP_ALPHAS`, as in
    :func:`epsilon_spent`): ``steps`` steps at ``sample_rate``, for (``epsilon``, ``delta``)-DP.
    Raises ``ValueError`` for bad arguments or a budget too small to reach.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    _check_privacy_args(delta, sample_rate, steps)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                 sample_rate=sample_rate, steps=int(steps), accountant="rdp",
                                 epsilon_tolerance=0.01, alphas=list(RDP_ALPHAS))
    return float(sigma)


def epsilon_spent(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of a sequence of ``(noise_multiplier, sample_rate, steps)`` charges.

    Composes the charges with Opacus's RDP accountant and the orders :data:`RDP_ALPHAS`, exactly
    the accountant :func:`calibrate_noise` uses, so ``epsilon_spent([(calibrate_noise(e, d, q, T),
    q, T)], d) <= e``.
    An empty history costs 0; a charge with noise multiplier 0 costs infinity.
    """
    from opacus.accountants import RDPAccountant

    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    # RDP composes additively and is linear in the number of steps, so charges with the same
    # (noise multiplier, sample rate) are merged: same epsilon, one RDP evaluation per pair.
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"noise multiplier must be >= 0, got {sigma}")
        _check_privacy_args(delta, rate, int(steps))
        if sigma == 0:
            return math.inf
        key = (float(sigma), float(rate))
        merged[key] = merged.get(key, 0) + int(steps)
    if not merged:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    return float(accountant.get_epsilon(delta=delta, alphas=list(RDP_ALPHAS)))
