"""Validation of decrypted model updates before they reach the aggregator (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cleanroom.errors import UpdateRejected


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def validate_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
                    max_norm: float) -> float:
    """Check names, shapes, dtypes, finiteness and the L2 norm of ``update - reference``.

    Returns the norm; raises :class:`UpdateRejected` naming the first bad parameter.
    """
    if list(update.keys()) != list(reference.keys()):
        missing = sorted(set(reference) - set(update))
        extra = sorted(set(update) - set(reference))
        raise UpdateRejected(f"parameter names differ (missing {missing}, unexpected {extra})")
    for name, ref in reference.items():
        value = np.asarray(update[name])
        if value.shape != np.asarray(ref).shape:
            raise UpdateRejected(f"parameter {name}: shape {value.shape}, expect "
                                 f"{np.asarray(ref).shape}")
        if value.dtype != np.asarray(ref).dtype:
            raise UpdateRejected(f"parameter {name}: dtype {value.dtype}, expect "
                                 f"{np.asarray(ref).dtype}")
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"parameter {name}: contains NaN or infinite values")
    norm = update_norm(update, reference)
    if norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds the bound {max_norm:g}")
    return norm
