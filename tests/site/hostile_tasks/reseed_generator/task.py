"""Loss re-seeds the DPOptimizer's OWN generator with a seed the task knows (the same
object, so an identity check passes; the noise becomes predictable)."""
import gc

from torch import nn

from cleanroom.task import Field, Task


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
            obj.generator.manual_seed(0)
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)
