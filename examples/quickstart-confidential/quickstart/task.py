"""The model, the data and the training loop of this app."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cleanroom import Field, Task

N_FEATURES = 10


class Net(nn.Module):
    """A small MLP: 10 features -> 32 -> 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(N_FEATURES, 32)
        self.out = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def load_data(partition_id: int, num_partitions: int) -> tuple[np.ndarray, ...]:
    """This hospital's rows (synthetic here; each hospital sees a shifted population)."""
    weights = np.random.default_rng(7).normal(size=N_FEATURES)
    rng = np.random.default_rng(1000 + partition_id)
    x = rng.normal(loc=0.3 * partition_id / max(1, num_partitions), size=(300, N_FEATURES))
    y = (x @ weights + rng.normal(scale=0.5, size=300) > 0).astype(np.int64)
    return x[:200].astype(np.float32), y[:200], x[200:].astype(np.float32), y[200:]


def train(net: Net, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    return float(loss)


def test(net: Net, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        out = net(torch.from_numpy(x))
        loss = nn.functional.cross_entropy(out, torch.from_numpy(y))
        accuracy = (out.argmax(1).numpy() == y).mean()
    return float(loss), float(accuracy)


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (the site's trainer clips and noises each example)."""
    return nn.functional.cross_entropy(outputs, targets.long(), reduction="none")


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float((outputs.argmax(1) == targets).mean())


def simulate(partition_id: int, num_partitions: int):  # -> (train, test) pandas frames
    import pandas as pd

    x, y, xt, yt = load_data(partition_id, num_partitions)
    names = [f"x{i}" for i in range(N_FEATURES)]
    return (pd.DataFrame(x, columns=names).assign(y=y),
            pd.DataFrame(xt, columns=names).assign(y=yt))


task = Task(name="quickstart-mlp", features=tuple(Field(f"x{i}") for i in range(N_FEATURES)),
            targets=(Field("y", "int"),), model=Net, loss=loss, metrics={"accuracy": accuracy},
            simulate=simulate, description="A small MLP on each hospital's own data")
