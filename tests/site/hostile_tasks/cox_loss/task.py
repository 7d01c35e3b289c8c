"""A Cox partial likelihood over the batch: each example's loss depends on its risk set."""

import torch
from torch import nn

from cleanroom.task import Field, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    # targets: survival time; every example counts as an event; risk set = times >= own time
    at_risk = (targets.unsqueeze(0) >= targets.unsqueeze(1)).to(outputs.dtype)
    log_risk = torch.logsumexp(outputs.unsqueeze(0) + torch.log(at_risk), dim=1)
    return log_risk - outputs


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
