"""Default training hyperparameters of the simulation: the coordinator's tuned defaults
(one source of truth: :class:`coordinator.config.TrainingSettings`, docs/dp-tuning.md)."""

from __future__ import annotations

from typing import Any

from cleanroom.coordinator.config import TrainingSettings

_FIELDS = ("rounds", "model", "local_steps", "sample_rate", "lr", "optimizer", "momentum",
           "max_grad_norm", "max_update_norm")


def training_defaults(dp: bool) -> dict[str, Any]:
    """Rounds, local steps, sampling rate, learning rate... for ``cleanroom simulate``."""
    defaults = TrainingSettings(dp=dp)
    return {name: getattr(defaults, name) for name in _FIELDS}
