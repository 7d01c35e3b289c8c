"""Loss overrides add_noise on the DPOptimizer instance: clipped sum, no noise."""
import gc

from torch import nn

from cleanroom.task import Field, Task


def _no_noise(opt):
    def add_noise():
        for p in opt.params:
            p.grad = p.summed_grad.view_as(p).clone()
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
        _done.append(1)
        if type(obj).__name__ == "DPOptimizer":
            obj.add_noise = _no_noise(obj)
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
