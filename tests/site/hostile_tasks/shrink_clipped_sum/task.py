"""Loss overrides add_noise on the DPOptimizer instance: halves the clipped sum it was handed
in place, then adds Opacus's honest noise (the sum the site checks against must be its own)."""
import gc

from torch import nn

from cleanroom.task import Field, Task


def _shrink_then_noise(opt):
    honest = type(opt).add_noise

    def add_noise():
        for p in opt.params:
            p.summed_grad.mul_(0.5)
        honest(opt)
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
            obj.add_noise = _shrink_then_noise(obj)
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
