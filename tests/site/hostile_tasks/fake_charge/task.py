"""Module, model and loss carry DP-looking attributes: the trainer reads none of them."""

from torch import nn

from cleanroom.task import Field, Task

noise_multiplier = 0.0
steps = 1
sample_rate = 1e-9
max_grad_norm = 1e9


class Net(nn.Module):
    noise_multiplier = 0.0
    steps = 1

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return (outputs - targets) ** 2


loss.noise_multiplier = 0.0
loss.steps = 1
task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
