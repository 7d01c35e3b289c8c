"""Cleanroom FL: confidential federated learning on Flower.

One import root. What both sides agree on lives here (``cleanroom.attestation``,
``cleanroom.protocol``, errors, configuration and file helpers); the sides install beside it as
``cleanroom.coordinator``, ``cleanroom.site_agent``, ``cleanroom.models`` and
``cleanroom.simulations``. The shared modules import neither side.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("cleanroom-fl")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
