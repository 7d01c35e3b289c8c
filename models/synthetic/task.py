"""Synthetic non-IID logistic regression: any number of simulated sites, no clinical meaning.

All sites share one ground-truth model; site ``k`` gets its own feature shift and scale, a
perturbed copy of the model and its own intercept (label skew), from
:func:`cleanroom.site_agent.data.synthetic_site`. The model, loss and metric are the
heart-disease task's (``Linear(13, 1)``, binary cross-entropy, accuracy). For scale tests
and benchmarks (``cleanroom simulate --task synthetic --sites 1000``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cleanroom.models import HeartLogReg
from cleanroom.task import Field, Task

N_FEATURES = 13
FEATURES = tuple(f"x{i:02d}" for i in range(N_FEATURES))
TARGET = "y"
ROWS = (200, 100)  # train, test rows per site


def model() -> nn.Module:
    return HeartLogReg(N_FEATURES)


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((outputs.reshape(-1) > 0) == (targets.reshape(-1) > 0.5)))


def simulate(partition_id: int, num_partitions: int):  # -> tuple[DataFrame, DataFrame]
    import pandas as pd

    from cleanroom.site_agent.data import synthetic_site

    data = synthetic_site(f"site{partition_id:02d}", partition_id, *ROWS, seed=partition_id)

    def frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
        out = pd.DataFrame(x.astype(np.float64), columns=list(FEATURES))
        out[TARGET] = y.astype(np.int64)
        return out

    return frame(data.train_x, data.train_y), frame(data.test_x, data.test_y)


task = Task(
    name="synthetic",
    features=tuple(Field(name) for name in FEATURES),
    targets=(Field(TARGET, "bool"),),
    model=model,
    loss=loss,
    metrics={"accuracy": accuracy},
    dataset="synthetic",
    description="Synthetic non-IID logistic regression (13 features), binary cross-entropy, "
    "accuracy; no clinical meaning",
    simulate=simulate,
)
