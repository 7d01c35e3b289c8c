"""Model forward raises the learning rate of every optimiser it finds through gc."""
import gc

import torch
from torch import nn

from cleanroom.task import Field, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        for obj in gc.get_objects():
            if type(obj) in (torch.optim.SGD, torch.optim.Adam):
                for group in obj.param_groups:
                    group["lr"] = 100.0
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)

