"""Plain Flower ClientApp: Opacus DP-SGD on the site's rows (one Poisson batch per step).

Started fresh by Flower for every message (stock ``flwr-clientapp``): torch and Opacus are
imported per message, as in any plain Flower deployment. The site's rows come from the npz
file its node config names (``data``)."""

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus import PrivacyEngine

app = ClientApp()


def _model(msg: Message) -> torch.nn.Module:
    model = torch.nn.Linear(13, 1)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _data(ctx: Context, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(str(ctx.node_config["data"]))
    return (torch.tensor(data[f"{split}_x"], dtype=torch.float32),
            torch.tensor(data[f"{split}_y"], dtype=torch.float32))


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    cfg = ctx.run_config
    model = _model(msg)
    x, y = _data(ctx, "train")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=len(x))  # sample rate 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=float(cfg["noise-multiplier"]),
        max_grad_norm=float(cfg["max-grad-norm"]), poisson_sampling=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    steps = 0
    while steps < int(cfg["local-steps"]):
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(xb):
                loss_fn(model(xb).squeeze(-1), yb).backward()
            optimizer.step()
            steps += 1
            if steps >= int(cfg["local-steps"]):
                break
    state = {k.removeprefix("_module."): v for k, v in model.state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(state),
                               "metrics": MetricRecord({"num-examples": len(x)})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, ctx: Context) -> Message:
    model = _model(msg)
    x, y = _data(ctx, "test")
    with torch.no_grad():
        logits = model(x).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        accuracy = float(((logits > 0).float() == y).float().mean())
    return Message(RecordDict({"metrics": MetricRecord({
        "num-examples": len(x), "loss": loss, "accuracy": accuracy})}), reply_to=msg)
