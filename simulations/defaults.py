"""Default training hyperparameters of the simulation: the coordinator's tuned defaults
(one source of truth: :class:`coordinator.config.TrainingSettings`, docs/dp-tuning.md), with the
task's recommended plan on top (``Task.plan``, read by the coordinator only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cleanroom.coordinator.config import TrainingSettings
from cleanroom.errors import ConfigError

FIELDS = ("strategy", "rounds", "local_steps", "sample_rate", "lr", "optimizer", "momentum",
          "max_grad_norm", "max_update_norm", "strategy_options")


def task_plan(plan: Mapping[str, Any], dp: bool) -> dict[str, Any]:
    """A task's recommended coordinator settings for a DP (or non-DP) run, checked."""
    values = {k: v for k, v in plan.items() if k not in ("dp", "no_dp")}
    nested = plan.get("dp" if dp else "no_dp") or {}
    if not isinstance(nested, Mapping):
        raise ConfigError("the task's plan: 'dp' and 'no_dp' must be mappings")
    values.update(nested)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"the task's plan names unknown settings {unknown}; known: "
                          f"{', '.join(FIELDS)}")
    return values


def training_defaults(dp: bool, plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Strategy, rounds, local steps, sampling rate, learning rate... for ``cleanroom
    simulate``: the tuned defaults, then the task's recommended ``plan``."""
    defaults = TrainingSettings(dp=dp)
    values = {name: getattr(defaults, name) for name in FIELDS}
    values.update(task_plan(plan or {}, dp))
    return values
