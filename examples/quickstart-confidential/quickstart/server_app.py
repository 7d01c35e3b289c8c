"""The ServerApp: FedAvg over the hospitals."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cleanroom import ConfidentialStrategy
from quickstart.task import Net, task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = ConfidentialStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), task=task)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=context.run_config["num-server-rounds"])
    print("final model:", list(result.arrays.keys()) if result.arrays else None)
