"""Plain Flower with Opacus: the baseline of ``python -m benchmarks rounds`` and ``memory``.

No cleanroom code is on this path: a plain Flower ``ClientApp`` trains the task's model (the
same ``nn.Module`` factory and loss) with Opacus DP-SGD exactly as the site's trainer does
(Poisson sampling at ``sample_rate``, ``local_steps`` steps, clip ``max_grad_norm``, the same
calibrated noise multiplier, mean over the expected batch size, per-sample gradients in
chunks of at most 64 MiB accumulated by Opacus, as its ``BatchMemoryManager`` does), and
Flower's own FedAdam (same options) aggregates, casting its float64 result back to float32
as the confidential strategy does. Only the data (the task's ``simulate`` frames) and the
model factory come from the task; the transport (the in-process Grid, which serialises every
message to protobuf and back) is shared with the confidential path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam

CHUNK_BYTES = 64 * 2**20  # per-sample gradients held at once (the site's trainer uses the same)


@dataclass(frozen=True)
class PlainSettings:
    rounds: int
    local_steps: int
    sample_rate: float
    lr: float
    max_grad_norm: float
    noise_multiplier: float
    eta: float = 0.3


def task_arrays(task: Any, partition: int, partitions: int) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) of a site, float32, from the task's frames."""
    train, test = task.simulate(partition, partitions)
    features = [f.name for f in task.features]
    target = task.targets[0].name
    return tuple(np.ascontiguousarray(frame[cols].to_numpy(dtype=np.float32)).reshape(shape)
                 for frame in (train, test)
                 for cols, shape in ((features, (len(frame), len(features))),
                                     (target, (len(frame),))))


def _chunk_rows(model: torch.nn.Module) -> int:
    per_row = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, CHUNK_BYTES // per_row)


def opacus_train(task: Any, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                 settings: PlainSettings, seed: int) -> None:
    """One round of Opacus DP-SGD of ``model`` (in place) on the rows ``x, y``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    net = GradSampleModule(model, loss_reduction="sum")
    base = torch.optim.SGD(model.parameters(), lr=settings.lr)
    n = len(x)
    opt = DPOptimizer(base, noise_multiplier=settings.noise_multiplier,
                      max_grad_norm=settings.max_grad_norm,
                      expected_batch_size=settings.sample_rate * n,  # type: ignore[arg-type]
                      loss_reduction="mean", generator=torch.Generator().manual_seed(seed))
    sampler = torch.Generator().manual_seed(seed ^ 0x5EED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    chunk = _chunk_rows(model)
    net.train()
    for _ in range(settings.local_steps):
        mask = torch.rand(n, generator=sampler) < settings.sample_rate
        xb, yb = xt[mask], yt[mask]
        opt.zero_grad(set_to_none=True)
        starts = list(range(0, len(xb), chunk)) or [0]
        for i, lo in enumerate(starts):
            xc = xb[lo:lo + chunk].detach().requires_grad_(True)
            task.loss(net(xc), yb[lo:lo + chunk]).sum().backward()
            last = i == len(starts) - 1
            opt.signal_skip_step(do_skip=not last)
            opt.step()
            if not last:
                opt.zero_grad(set_to_none=True)  # keeps the accumulated clipped sum
    net._close()


def client_app(task: Any, partitions: int, settings: PlainSettings) -> ClientApp:
    """The plain ClientApp: Opacus DP-SGD on the site's rows, evaluation on its test rows."""
    app = ClientApp()
    data: dict[int, tuple[np.ndarray, ...]] = {}

    def rows(ctx: Context) -> tuple[np.ndarray, ...]:
        pid = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        if pid not in data:
            data[pid] = task_arrays(task, pid, partitions)
        return data[pid]

    def model_of(msg: Message) -> torch.nn.Module:
        model = task.model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return model

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        x, y, _, _ = rows(ctx)
        rnd = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        model = model_of(msg)
        seed = int(ctx.node_config["partition-id"]) * 1_000_003 + rnd  # type: ignore[operator]
        opacus_train(task, model, x, y, settings, seed)
        arrays = ArrayRecord(model.state_dict())
        return Message(RecordDict({"arrays": arrays,
                                   "metrics": MetricRecord({"num-examples": len(x)})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        _, _, tx, ty = rows(ctx)
        model = model_of(msg)
        model.eval()
        with torch.no_grad():
            out = model(torch.from_numpy(tx))
            loss = float(task.loss(out, torch.from_numpy(ty)).mean())
        accuracy = float(((out.reshape(-1) > 0).numpy() == (ty > 0.5)).mean())
        return Message(RecordDict({"metrics": MetricRecord({
            "num-examples": len(tx), "loss": loss, "accuracy": accuracy})}), reply_to=msg)

    return app


class Float32FedAdam(FedAdam):
    """Flower's FedAdam, its float64 result cast back to the model's float32 (as the
    confidential strategy keeps the model's dtypes), timing each round's end."""

    def __init__(self, on_round_end: Callable[[], None] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.on_round_end = on_round_end

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=np.float32))
                                  for k, v in arrays.items()})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        result = super().aggregate_evaluate(server_round, replies)
        if self.on_round_end is not None:
            self.on_round_end()
        return result


def run(task: Any, sites: int, settings: PlainSettings, *, seed: int = 0,
        on_round_end: Callable[[], None] | None = None) -> Any:
    """One plain Flower run on the in-process Grid; returns the final ArrayRecord."""
    from cleanroom.simulations.inprocess import InProcessGrid

    app = client_app(task, sites, settings)
    grid = InProcessGrid.build(lambda _nid: app, {1000 + i: {"partition-id": i}
                                                  for i in range(sites)}, run_id=1)
    torch.manual_seed(seed)
    initial = ArrayRecord(task.model().state_dict())
    strategy = Float32FedAdam(on_round_end=on_round_end, eta=settings.eta,
                              min_train_nodes=sites, min_evaluate_nodes=sites,
                              min_available_nodes=sites)
    try:
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.rounds,
                                train_config=ConfigRecord({}))
    finally:
        grid.close()
    return result.arrays


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus's RDP calibration (the site's accountant; computed outside timed rounds)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp",
                                      epsilon_tolerance=0.01))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
