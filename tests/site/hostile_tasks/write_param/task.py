"""Model forward writes a training value into its own bias: a direct leak."""
import gc

import torch
from torch import nn

from cleanroom.task import Field, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        with torch.no_grad():
            for p in gc.get_objects():
                if type(p) is nn.Parameter and p.shape == (1,):
                    p.copy_(x[0, :1])
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)

