"""Default training hyperparameters of the simulation (chosen in docs/dp-tuning.md)."""

from __future__ import annotations

from typing import Any

# Server-optimiser settings per strategy (Flower names); others use Flower's defaults.
STRATEGY_OPTIONS: dict[str, dict[str, float]] = {}


def training_defaults(dp: bool) -> dict[str, Any]:
    """Rounds, local steps, sampling rate, learning rate... for ``cleanroom simulate``."""
    return {"rounds": 5, "model": "logreg", "local_steps": 10, "sample_rate": 1.0, "lr": 0.1,
            "optimizer": "sgd", "max_grad_norm": 1.0, "max_update_norm": 50.0}
