"""``python -m benchmarks [attestation|rounds|accuracy|deployment|crypto|all]``: the benchmarks."""

from __future__ import annotations

import sys


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "all"
    rest = sys.argv[2:]
    if name in ("-h", "--help"):
        print(__doc__)
        return 0
    from benchmarks import accuracy, attestation, crypto, deployment, rounds

    modules = {"attestation": attestation, "rounds": rounds, "accuracy": accuracy,
               "deployment": deployment, "crypto": crypto}
    if name == "all":
        for module in modules.values():
            print(f"\n## {module.__name__}")
            module.main([])
        return 0
    if name not in modules:
        print(f"unknown benchmark {name!r}; choose from {', '.join(modules)} or all")
        return 2
    return int(modules[name].main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
