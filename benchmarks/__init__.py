"""Benchmarks of Cleanroom FL (scripts that print tables; never timed unit tests)."""

from __future__ import annotations

import statistics


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``min / median / max`` of ``values``, each formatted with ``fmt`` (the tables' cells)."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values),
                                              max(values)))
