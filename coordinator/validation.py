"""Validation of decrypted model updates before they reach the aggregator (pure functions)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from cleanroom.errors import UpdateRejected
from cleanroom.protocol.reports import TrainReport
from cleanroom.protocol.wire import TrainPlan

# Elements per step of the float64 arithmetic below: 64 KiB of float64. Each step's
# temporaries stay in the CPU cache and under glibc's trim and mmap thresholds (128 and 256 KiB
# here, see cleanroom.malloc), so they reuse the same heap memory: with 2 MiB steps every
# temporary was a fresh mapping, page-faulted in and unmapped, and validating and folding one
# update took 3-5x longer (python -m benchmarks aggregator).
CHUNK = 1 << 13


def chunks(size: int) -> Iterator[slice]:
    """Consecutive slices of at most :data:`CHUNK` elements covering ``range(size)``."""
    for lo in range(0, size, CHUNK):
        yield slice(lo, min(lo + CHUNK, size))


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` in float64, a bounded chunk at a time: no temporary
    the size of a parameter (a 10M-parameter layer would need three of 80 MB)."""
    total = 0.0
    for name, ref in reference.items():
        a = np.asarray(update[name]).reshape(-1)
        b = np.asarray(ref).reshape(-1)
        for part in chunks(a.size):
            diff = a[part].astype(np.float64) - b[part]
            total += float(np.dot(diff, diff))
    return float(np.sqrt(total))


def all_finite(value: np.ndarray) -> bool:
    """No NaN or infinity in ``value`` (chunked: no parameter-sized boolean temporary)."""
    flat = np.asarray(value).reshape(-1)
    return all(bool(np.isfinite(flat[part]).all()) for part in chunks(flat.size))


def add_scaled(total: np.ndarray, value: np.ndarray, weight: float) -> None:
    """``total += value * weight`` with ``total`` float64, chunked (in place)."""
    acc = total.reshape(-1)
    flat = np.asarray(value).reshape(-1)
    for part in chunks(flat.size):
        acc[part] += flat[part].astype(np.float64) * weight


def scaled(total: np.ndarray, factor: float, dtype: np.dtype) -> np.ndarray:
    """``(total * factor).astype(dtype)`` written chunk by chunk into one new array."""
    out = np.empty(total.shape, dtype)
    src, dst = total.reshape(-1), out.reshape(-1)
    for part in chunks(src.size):
        dst[part] = src[part] * factor
    return out


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
        if not all_finite(value):
            raise UpdateRejected(f"parameter {name}: contains NaN or infinite values")
    norm = update_norm(update, reference)
    if norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds the bound {max_norm:g}")
    return norm


def check_train_report(report: TrainReport, plan: TrainPlan, dataset_rows: int) -> None:
    """A site's training report against its attested row count and the plan (both sides of
    the update path: the aggregator enclave and the operator's own round)."""
    if report.num_examples != dataset_rows:
        raise UpdateRejected(f"the site reports {report.num_examples} examples, its "
                             f"attested dataset holds {dataset_rows} training rows")
    if report.steps != plan.local_steps:
        raise UpdateRejected(f"the site reports {report.steps} steps, the plan asks for "
                             f"{plan.local_steps}")
    if plan.dp.enabled and report.privacy is None:
        raise UpdateRejected("the plan trains with DP but the report has no privacy spend")


def site_update_bound(plan: TrainPlan, report: TrainReport,
                      model: Mapping[str, np.ndarray]) -> float:
    """The L2 bound of one site's update: derived from the plan, its noise and its row count
    under DP (docs/architecture.md, update bounds)."""
    from cleanroom.bounds import update_bound

    n_params = sum(int(np.asarray(v).size) for v in model.values())
    sigma = report.privacy.noise_multiplier if report.privacy is not None else None
    return update_bound(plan, noise_multiplier=sigma, n_examples=max(1, report.num_examples),
                        n_params=n_params)
