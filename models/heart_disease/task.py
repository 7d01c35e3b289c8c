"""FLamby's Fed-Heart-Disease as a task: logistic regression on 13 features, BCE, accuracy.

The same model, loss and metric as the ``logreg`` model of :mod:`cleanroom.models` with the
training loop of :func:`cleanroom.site_agent.training.train_local`: ``Linear(13, 1)`` logits,
binary cross-entropy with logits (per example), accuracy at logit 0.

A site's dataset must provide FLamby's 13 feature columns (age ... restecg_2, already
normalised with the site's own training statistics, as FLamby does) and a 0/1 ``target``
(``num > 0``). ``simulate`` gives simulated site ``k`` of 4 FLamby centre ``k`` (Cleveland,
Hungary, Switzerland, VA Long Beach) from the vendored UCI files.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cleanroom.models import HeartLogReg
from cleanroom.task import Field, Task

FEATURES: tuple[str, ...] = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang",
                             "oldpeak", "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
TARGET = "target"
N_CENTRES = 4


def model() -> nn.Module:
    return HeartLogReg(len(FEATURES))


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example binary cross-entropy on the logits."""
    return nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((outputs.reshape(-1) > 0) == (targets.reshape(-1) > 0.5)))


def simulate(partition_id: int, num_partitions: int):  # -> tuple[DataFrame, DataFrame]
    """FLamby centre ``partition_id`` (of 4): its train and test frames, normalised."""
    import pandas as pd

    from cleanroom.site_agent.data import HEART_DISEASE_SITES, load_heart_disease_site

    if num_partitions != N_CENTRES or not 0 <= partition_id < N_CENTRES:
        raise ValueError(f"heart-disease has {N_CENTRES} centres; got partition "
                         f"{partition_id} of {num_partitions}")
    data = load_heart_disease_site(HEART_DISEASE_SITES[partition_id])

    def frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
        out = pd.DataFrame(x.astype(np.float64), columns=list(FEATURES))
        out[TARGET] = y.astype(np.int64)
        return out

    return frame(data.train_x, data.train_y), frame(data.test_x, data.test_y)


task = Task(
    name="heart-disease",
    features=tuple(Field(name) for name in FEATURES),
    targets=(Field(TARGET, "bool"),),
    model=model,
    loss=loss,
    metrics={"accuracy": accuracy},
    dataset="heart-disease",
    description="FLamby Fed-Heart-Disease: logistic regression (13 normalised features -> "
    "heart disease yes/no), binary cross-entropy, accuracy",
    simulate=simulate,
    sites=("cleveland", "hungary", "switzerland", "va"),
)
