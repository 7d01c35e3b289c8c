"""quickstart: a plain Flower App (MLP, FedAvg)."""
