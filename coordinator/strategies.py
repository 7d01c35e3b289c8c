"""Named Flower strategies the coordinator can wrap (``--strategy NAME``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp import strategy as fs

from cleanroom.errors import ConfigError

# name -> (constructor, default keyword arguments beyond the node minimums)
STRATEGIES: dict[str, tuple[Callable[..., fs.Strategy], dict[str, Any]]] = {
    "fedavg": (fs.FedAvg, {}),
    "fedprox": (fs.FedProx, {"proximal_mu": 0.01}),
    "fedadam": (fs.FedAdam, {"eta": 0.1, "eta_l": 0.1, "tau": 1e-3}),
    "fedyogi": (fs.FedYogi, {"eta": 0.1, "eta_l": 0.1, "tau": 1e-3}),
    "fedadagrad": (fs.FedAdagrad, {"eta": 0.1, "eta_l": 0.1, "tau": 1e-3}),
    "fedavgm": (fs.FedAvgM, {"server_learning_rate": 1.0, "server_momentum": 0.5}),
    "fedmedian": (fs.FedMedian, {}),
    "fedtrimmedavg": (fs.FedTrimmedAvg, {"beta": 0.2}),
    "krum": (fs.Krum, {"num_malicious_nodes": 0}),
    "multikrum": (fs.MultiKrum, {"num_malicious_nodes": 0, "num_nodes_to_select": 2}),
    "bulyan": (fs.Bulyan, {"num_malicious_nodes": 0}),
}


def build_strategy(name: str, *, min_nodes: int = 2, **overrides: Any) -> fs.Strategy:
    """Build strategy ``name`` with every node minimum set to ``min_nodes``."""
    key = name.lower()
    if key not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    ctor, defaults = STRATEGIES[key]
    kwargs = {"min_train_nodes": min_nodes, "min_evaluate_nodes": min_nodes,
              "min_available_nodes": min_nodes, **defaults, **overrides}
    try:
        return ctor(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name}: {exc}") from None


# Strategies whose aggregation is a (weighted) mean of the updates, possibly followed by a
# server-side step on that mean (momentum, adaptive optimisers): they can work from the sum
# an attested aggregator (or secure aggregation) releases. Matched by the aggregate_train
# method a strategy runs, so a subclass that only changes configuration still counts.
SUM_BASED: tuple[type[fs.Strategy], ...] = (
    fs.FedAvg, fs.FedProx, fs.FedAvgM, fs.FedAdam, fs.FedYogi, fs.FedAdagrad)


def aggregates_by_sum(strategy: fs.Strategy) -> bool:
    """Whether ``strategy`` aggregates by a (weighted) mean of the updates (else it needs
    every single update: Krum, FedMedian, trimmed mean, Bulyan, QFedAvg, DP wrappers...)."""
    method = type(strategy).aggregate_train
    return any(method is cls.aggregate_train for cls in SUM_BASED)
