"""A loss reduced to one number (mean over the batch): not per-example."""

from torch import nn

from cleanroom.task import Field, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return ((outputs - targets) ** 2).mean()


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
