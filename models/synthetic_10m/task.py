"""Synthetic non-IID data with a 9,998,181-parameter MLP: the model size of the scale and memory
benchmarks (``python -m benchmarks rounds|memory``), no clinical meaning.

The data, loss and metric are the built-in ``synthetic`` task's (13 features, 200 train and
100 test rows per site, binary cross-entropy, accuracy); the model is
``Linear(13, W) -> ReLU -> Linear(W, W) -> ReLU -> Linear(W, 1)`` with W = 3154
(W^2 + 16 W + 1 parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from cleanroom.models.synthetic.task import FEATURES, TARGET, accuracy, loss, simulate
from cleanroom.task import Field, Task

WIDTH = 3154


class SyntheticMLP(nn.Module):
    """Two hidden layers of ``width`` units; logits of shape (n,)."""

    def __init__(self, n_features: int, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, width)
        self.inner = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inner(torch.relu(self.hidden(x))))
        return self.out(h).squeeze(-1)


def model() -> nn.Module:
    return SyntheticMLP(len(FEATURES), WIDTH)


task = Task(
    name="synthetic-10m",
    features=tuple(Field(name) for name in FEATURES),
    targets=(Field(TARGET, "bool"),),
    model=model,
    loss=loss,
    metrics={"accuracy": accuracy},
    dataset="synthetic",
    description="Synthetic non-IID data (13 features), 9,998,181-parameter MLP, binary "
    "cross-entropy, accuracy; no clinical meaning (scale benchmarks)",
    simulate=simulate,
)
