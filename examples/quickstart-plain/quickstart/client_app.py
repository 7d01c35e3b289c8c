"""The ClientApp: trains and evaluates the MLP on this hospital's data."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart.task import Net, load_data, test
from quickstart.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y, _, _ = load_data(context.node_config["partition-id"],
                           context.node_config["num-partitions"])
    loss = train_fn(net, x, y, context.run_config["local-epochs"], context.run_config["lr"])
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, _, x, y = load_data(context.node_config["partition-id"],
                           context.node_config["num-partitions"])
    loss, accuracy = test(net, x, y)
    content = RecordDict({"metrics": MetricRecord({"loss": loss, "accuracy": accuracy,
                                                   "num-examples": len(x)})})
    return Message(content=content, reply_to=msg)
