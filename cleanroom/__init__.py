"""Cleanroom FL: confidential federated learning on Flower.

The public API (docs/public-api.md)::

    from cleanroom import ConfidentialStrategy, ConfidentialClientApp, Task, Field

    strategy = ConfidentialStrategy(FedAvg(), task=task)   # in the ServerApp
    app = ConfidentialClientApp(task)                        # the ClientApp

One import root. What both sides agree on lives here (``cleanroom.attestation``,
``cleanroom.protocol``, ``cleanroom.task``, errors, configuration and file helpers); the sides
install beside it as ``cleanroom.coordinator``, ``cleanroom.site_agent``, ``cleanroom.models``
and ``cleanroom.simulations``. The shared modules import neither side; the names below are
resolved on first use (importing ``cleanroom`` stays light).
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("cleanroom-fl")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_PUBLIC = {
    "ConfidentialStrategy": "cleanroom.coordinator.strategy",
    "ConfidentialMod": "cleanroom.site_agent.mod",
    "ConfidentialClientApp": "cleanroom.site_agent.mod",
    "Task": "cleanroom.task",
    "Field": "cleanroom.task",
    "load_task": "cleanroom.task",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cleanroom' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
