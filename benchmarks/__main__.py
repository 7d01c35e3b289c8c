"""``python -m benchmarks NAME [options]``: the benchmarks, each printing a table.

NAME: attestation, rounds, memory, scale, accuracy, deployment, secagg, trust, crypto, fuzz,
codeshape, trainer, aggregator, or all.
``all`` runs the timing benchmarks; ``fuzz`` (minutes per target), ``codeshape`` (function and
class sizes, no timing) run only when named.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

TIMING = ("attestation", "rounds", "memory", "scale", "accuracy", "deployment", "secagg",
          "trust", "crypto")
ON_DEMAND = ("fuzz", "codeshape", "trainer", "aggregator")


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "all"
    rest = sys.argv[2:]
    if name in ("-h", "--help"):
        print(__doc__)
        return 0
    names = [n for n in (*TIMING, *ON_DEMAND)
             if importlib.util.find_spec(f"benchmarks.{n}") is not None]
    if name == "all":
        for module_name in TIMING:
            module = importlib.import_module(f"benchmarks.{module_name}")
            print(f"\n## {module_name}")
            module.main([])
        return 0
    if name not in names:
        print(f"unknown benchmark {name!r}; choose from {', '.join(names)} or all")
        return 2
    return int(importlib.import_module(f"benchmarks.{name}").main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
