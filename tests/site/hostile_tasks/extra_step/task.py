"""Model forward sets gradients and steps the optimiser itself (an extra, un-noised step)."""
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
            if type(obj) is torch.optim.SGD:
                for group in obj.param_groups:
                    for p in group["params"]:
                        p.grad = torch.ones_like(p)
                obj.step()
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)

