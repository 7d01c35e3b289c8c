"""The site's trusted trainer (:class:`~cleanroom.site_agent.session.SiteTrainer`).

:class:`TaskTrainer` trains the approved task the plan names on the fields of the site's
registered dataset that the task declares, with the DP settings the site decided
(:func:`cleanroom.site_agent.trainer.train_task` wraps the task's model and loss; task code
never sets the noise, the clip, the sampling or the steps). torch and Opacus are imported only
when it trains or evaluates, so an attestation query stays light.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from cleanroom.errors import SiteRefusal
from cleanroom.protocol.flower import PROXIMAL_MU
from cleanroom.protocol.reports import NUM_EXAMPLES, EvaluateReport
from cleanroom.protocol.wire import TrainPlan
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.session import TrainOutcome
from cleanroom.site_agent.settings import RoundSettings


def float32_model(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The parameters as float32 (the models' dtype), like ``load_state_dict`` would cast
    them; server optimisers may send float64."""
    return OrderedDict((k, v.astype(np.float32, copy=False) if v.dtype == np.float64 else v)
                       for k, v in arrays.items())


def _loaded(runtime: SiteRuntime, plan: TrainPlan) -> Any:
    """The plan's task, checked against what the plan says about it (a coordinator cannot
    describe one task and ship another)."""
    loaded = runtime.task(plan.task)
    if loaded.architecture_digest != plan.task.architecture_digest:
        raise SiteRefusal("model-mismatch", f"task {plan.task.name}: its model's architecture "
                          f"digest is {loaded.architecture_digest[:16]}..., the plan says "
                          f"{plan.task.architecture_digest[:16]}...")
    fields = tuple(f.name for f in loaded.task.fields)
    if fields != tuple(plan.task.fields) or loaded.task.dataset_name != plan.task.dataset:
        raise SiteRefusal("task-mismatch", f"task {plan.task.name}: the plan's dataset or "
                          "fields are not the task's own")
    return loaded


class TaskTrainer:
    """DP-SGD (or plain SGD where the site allows it) of the plan's task on the site's data."""

    def train(self, runtime: SiteRuntime, plan: TrainPlan, arrays: Mapping[str, np.ndarray],
              settings: RoundSettings, seed: int,
              strategy_config: Mapping[str, Any]) -> TrainOutcome:
        from cleanroom.site_agent.trainer import train_task
        from cleanroom.site_agent.training import TrainSettings

        loaded = _loaded(runtime, plan)
        data = runtime.task_data(loaded, plan.task.dataset)
        if settings.dataset_digest and data.digest != settings.dataset_digest:
            raise SiteRefusal("dataset-changed", f"dataset {plan.task.dataset} changed since "
                              "this round's attestation")
        mu = strategy_config.get(PROXIMAL_MU, 0.0)
        train = TrainSettings(
            local_steps=settings.local_steps, sample_rate=settings.sample_rate, lr=plan.lr,
            optimizer=plan.optimizer, momentum=plan.momentum,
            max_grad_norm=plan.dp.max_grad_norm, noise_multiplier=settings.noise_multiplier,
            proximal_mu=float(mu) if isinstance(mu, (int, float)) and math.isfinite(mu) else 0.0)
        result = train_task(loaded, float32_model(arrays), data, train, seed=seed,
                            secure_noise=not runtime.config.reproducible_noise)
        return TrainOutcome(parameters=result.parameters, steps=result.steps,
                            num_examples=result.num_examples,
                            noise_multiplier=result.noise_multiplier,
                            sample_rate=result.sample_rate, train_loss=result.train_loss)

    def evaluate(self, runtime: SiteRuntime, plan: TrainPlan,
                 arrays: Mapping[str, np.ndarray]) -> EvaluateReport:
        from cleanroom.site_agent.trainer import evaluate_task

        loaded = _loaded(runtime, plan)
        values = dict(evaluate_task(loaded, float32_model(arrays),
                                    runtime.task_data(loaded, plan.task.dataset)))
        count = int(values.pop(NUM_EXAMPLES))
        return EvaluateReport(num_examples=count, metrics={
            k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()})
