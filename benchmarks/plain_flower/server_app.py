"""Plain Flower ServerApp: FedAdam over a logistic regression, train + evaluate each round.

Like the coordinator, it pulls replies every 50 ms instead of Flower's 3 s
``send_and_receive`` loop (plain Flower API: ``push_messages`` + ``pull_messages``), and
writes when each round ended to the ``result`` file. Evaluation metrics are averaged over
clients without weights (the coordinator's "client average"), not Flower's default weighting
by ``num-examples``, so the two final accuracies are the same quantity.
"""

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam

app = ServerApp()


def client_average(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Each metric's mean over the replying clients (unweighted, as the coordinator reports)."""
    values: dict[str, list[float]] = {}
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if key != weighting_metric_name and isinstance(value, (int, float)):
                    values.setdefault(key, []).append(float(value))
    return MetricRecord({k: sum(v) / len(v) for k, v in values.items()})


class FastGrid(Grid):
    """Delegates to the deployment Grid; ``send_and_receive`` polls every 50 ms."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.finished: list[float] = []

    def set_run(self, run):
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        pending = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + (timeout or 600)
        replies = []
        while pending and time.monotonic() < deadline:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(0.05)
        self.finished.append(time.time())
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["min-nodes"])
    started = time.time()
    torch.manual_seed(0)
    model = torch.nn.Linear(13, 1)
    strategy = FedAdam(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes,
                       min_evaluate_nodes=nodes, min_available_nodes=nodes,
                       eta=float(cfg["eta"]), eta_l=0.1, tau=1e-3,
                       evaluate_metrics_aggr_fn=client_average)
    fast = FastGrid(grid)
    result = strategy.start(grid=fast, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=int(cfg["rounds"]))
    accuracy = result.evaluate_metrics_clientapp.get(int(cfg["rounds"]), {})
    Path(str(cfg["result"])).write_text(json.dumps({
        "started": started,
        "round_ends": fast.finished[1::2],  # each round: train, then evaluate
        "accuracy": dict(accuracy).get("accuracy")}))
