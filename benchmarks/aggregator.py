"""The aggregator enclave's arithmetic per update, by step size: check and fold one update.

What the enclave does with every opened update (:mod:`cleanroom.coordinator.validation`):
names, shapes, dtypes, finiteness and the float64 L2 norm of ``update - model``, then the
float64 running sum (``add_scaled``); and once per round the release (``scaled``). Those loops
run a bounded step (``CHUNK`` elements) at a time so that no temporary is parameter-sized.
This measures them at a few step sizes in one process, the steps interleaved, with glibc's
mmap threshold fixed as in the enclave (:func:`cleanroom.malloc.release_large_buffers`): a
step's float64 temporaries of 256 KiB or more are each a fresh mapping there.

Prints per model size and step: min / median / max milliseconds per update over
``--repeats``, and the ratio to the current step (``validation.CHUNK``) in the same repeat.
Run: ``python -m benchmarks aggregator [--params 1000000,10000000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import numpy as np

from benchmarks import spread

STEPS = (1 << 18, 1 << 15, 1 << 14, 1 << 13, 1 << 12)  # 1 << 18: the step before 2026-12-02


def _model(params: int, rng: np.random.Generator) -> OrderedDict[str, np.ndarray]:
    """A 1M/10M-like MLP's parameters: one large matrix, a bias, a small head."""
    head = min(10_000, params // 10)
    big = params - head - 1000
    return OrderedDict(w1=rng.standard_normal(big).astype(np.float32),
                       b1=rng.standard_normal(1000).astype(np.float32),
                       w2=rng.standard_normal(head).astype(np.float32))


def _one_update(validation: object, model: OrderedDict[str, np.ndarray],
                update: OrderedDict[str, np.ndarray],
                total: OrderedDict[str, np.ndarray]) -> float:
    t = time.perf_counter()
    validation.validate_update(update, model, max_norm=1e12)  # type: ignore[attr-defined]
    for name, value in update.items():
        validation.add_scaled(total[name], value, 0.05)  # type: ignore[attr-defined]
    return time.perf_counter() - t


def measure(params: int, repeats: int, updates: int = 4) -> dict[int, list[float]]:
    """Per step: milliseconds per update (mean over ``updates`` updates), one per repeat."""
    from cleanroom.coordinator import validation

    rng = np.random.default_rng(0)
    model = _model(params, rng)
    update = OrderedDict((k, v + np.float32(0.01)) for k, v in model.items())
    total = OrderedDict((k, np.zeros(v.shape, np.float64)) for k, v in model.items())
    current = validation.CHUNK
    out: dict[int, list[float]] = {s: [] for s in STEPS}
    try:
        for step in STEPS:  # untimed warm-up of every step
            validation.CHUNK = step
            _one_update(validation, model, update, total)
        for _ in range(repeats):
            for step in STEPS:
                validation.CHUNK = step
                spent = sum(_one_update(validation, model, update, total)
                            for _ in range(updates))
                out[step].append(spent / updates * 1000)
    finally:
        validation.CHUNK = current
    return out


def main(argv: list[str] | None = None) -> int:
    from cleanroom.coordinator import validation
    from cleanroom.malloc import release_large_buffers

    parser = argparse.ArgumentParser(prog="python -m benchmarks aggregator",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="1000000,10000000",
                        help="comma-separated model sizes (parameters)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    release_large_buffers()
    current = validation.CHUNK
    print(f"check + fold of one float32 update, ms (min / median / max over {args.repeats} "
          f"repeats); current step {current} elements")
    print("| parameters | step (elements) | float64 temporaries | ms per update | "
          "ratio to the current step |")
    print("|---|---|---|---|---|")
    for params in (int(p) for p in args.params.split(",") if p):
        times = measure(params, args.repeats)
        for step in STEPS:
            ratios = [a / b for a, b in zip(times[step], times[current], strict=True)] \
                if current in times else []
            mark = " (current)" if step == current else ""
            print(f"| {params:,} | {step}{mark} | {step * 8 // 1024} KiB | "
                  f"{spread(times[step], '{:.2f}')} | "
                  f"{spread(ratios, '{:.2f}') if ratios else '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
