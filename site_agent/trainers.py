"""The site's trusted trainers (:class:`~cleanroom.site_agent.session.SiteTrainer`).

:class:`RegistryTrainer` trains the built-in model registry's models (``cleanroom.models``) on
the site's data with the site's DP settings; torch and Opacus are imported only when it
trains or evaluates, so an attestation query stays light.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from cleanroom.protocol.flower import PROXIMAL_MU
from cleanroom.protocol.reports import EvaluateReport
from cleanroom.protocol.wire import TrainPlan
from cleanroom.site_agent.runtime import SiteRuntime
from cleanroom.site_agent.session import TrainOutcome
from cleanroom.site_agent.settings import RoundSettings


def float32_model(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The parameters as float32 (the models' dtype), like ``load_state_dict`` would cast
    them; server optimisers may send float64."""
    return OrderedDict((k, v.astype(np.float32, copy=False) if v.dtype == np.float64 else v)
                       for k, v in arrays.items())


class RegistryTrainer:
    """DP-SGD (or plain SGD where the site allows it) of a registry model on the site's data."""

    def train(self, runtime: SiteRuntime, plan: TrainPlan, arrays: Mapping[str, np.ndarray],
              settings: RoundSettings, seed: int,
              strategy_config: Mapping[str, Any]) -> TrainOutcome:
        from cleanroom.site_agent.training import TrainSettings, train_local

        mu = strategy_config.get(PROXIMAL_MU, 0.0)
        train = TrainSettings(
            local_steps=settings.local_steps, sample_rate=settings.sample_rate, lr=plan.lr,
            optimizer=plan.optimizer, momentum=plan.momentum,
            max_grad_norm=plan.dp.max_grad_norm, noise_multiplier=settings.noise_multiplier,
            proximal_mu=float(mu) if isinstance(mu, (int, float)) and math.isfinite(mu) else 0.0)
        result = train_local(plan.model, float32_model(arrays), runtime.data, train, seed=seed,
                             secure_noise=not runtime.config.reproducible_noise)
        return TrainOutcome(parameters=result.parameters, steps=result.steps,
                            num_examples=result.num_examples,
                            noise_multiplier=result.noise_multiplier,
                            sample_rate=result.sample_rate, train_loss=result.train_loss)

    def evaluate(self, runtime: SiteRuntime, plan: TrainPlan,
                 arrays: Mapping[str, np.ndarray]) -> EvaluateReport:
        from cleanroom.site_agent.training import evaluate

        data = runtime.data
        loss, accuracy = evaluate(plan.model, float32_model(arrays), data.test_x, data.test_y)
        return EvaluateReport(num_examples=data.n_test,
                              metrics={"loss": float(loss), "accuracy": float(accuracy)})
