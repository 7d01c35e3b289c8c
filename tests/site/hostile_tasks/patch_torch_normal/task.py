"""Model forward replaces torch.normal with zeros."""

import torch
from torch import nn

from cleanroom.task import Field, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        torch.normal = lambda *args, **kw: torch.zeros(kw["size"])
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)

