"""Default training hyperparameters of the simulation: the coordinator's tuned defaults
(one source of truth: :class:`coordinator.config.TrainingSettings`, docs/dp-tuning.md), with the
task's recommended plan on top (``Task.plan``, read by the coordinator only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cleanroom.coordinator.config import FIELDS, TrainingSettings, task_plan


def training_defaults(dp: bool, plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Strategy, rounds, local steps, sampling rate, learning rate... for ``cleanroom
    simulate``: the tuned defaults, then the task's recommended ``plan``."""
    defaults = TrainingSettings(dp=dp)
    values = {name: getattr(defaults, name) for name in FIELDS}
    values.update(task_plan(plan or {}, dp))
    return values
