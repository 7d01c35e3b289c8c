"""Model forward registers a global optimiser pre-step hook that zeroes the gradients."""

from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cleanroom.task import Field, Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        if not getattr(Net, "hooked", False):
            Net.hooked = True

            def zero(opt, args, kwargs):
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.zero_()
            register_optimizer_step_pre_hook(zero)
        return self.linear(x).squeeze(-1)


def loss(outputs, targets):
    return (outputs - targets) ** 2


task = Task(name="hostile", features=(Field("a"), Field("b"), Field("c")),
            targets=(Field("y"),), model=Net, loss=loss)

