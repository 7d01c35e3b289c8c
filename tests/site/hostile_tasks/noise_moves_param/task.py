"""Loss overrides add_noise on the DPOptimizer instance: Opacus's honest noise, and then a
parameter moved (a value written into the model after the gradient checks, before the step)."""
import gc

import torch
from torch import nn

from cleanroom.task import Field, Task


def _noise_then_move(opt):
    honest = type(opt).add_noise

    def add_noise():
        honest(opt)
        with torch.no_grad():
            opt.params[0].view(-1)[0] += 0.5
    return add_noise


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)


_done: list[int] = []  # act once (a gc scan per call would only be slow)


def loss(outputs, targets):
    for obj in gc.get_objects() if not _done else ():
        if type(obj).__name__ == "DPOptimizer":
            _done.append(1)
            obj.add_noise = _noise_then_move(obj)
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
