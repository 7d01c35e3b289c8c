"""The ``cleanroom`` command: one entry point for sites, operators and researchers."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cleanroom.errors import CleanroomError

DESCRIPTION = """\
Cleanroom FL: confidential federated learning for hospitals.

Every round each site proves with TEE evidence (AMD SEV-SNP or Intel TDX) that it runs the
approved code; the model and updates travel end-to-end encrypted; sites train with
differential privacy under their own budget; everything is tracked and audited.
"""

EPILOG = """\
start here:
  cleanroom simulate                      4 hospitals, honest sites, DP on (see --help)
  cleanroom simulate --scenario tampered-site
  cleanroom attest verify report.bin --vcek vcek.pem --measurement HEX
"""


def build_parser() -> argparse.ArgumentParser:
    from cleanroom.cli import attest

    parser = argparse.ArgumentParser(prog="cleanroom", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    attest.add_parser(sub)
    for module_name in ("simulate", "audit", "site", "coordinator", "provision", "run",
                        "deploy_local"):
        try:
            module = __import__(f"cleanroom.cli.{module_name}", fromlist=["add_parser"])
        except ModuleNotFoundError as exc:
            if exc.name != f"cleanroom.cli.{module_name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower logs every step at INFO through its own handler; keep it for -vv.
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO if args.verbose >= 2 else logging.WARNING)
    flwr_logger.propagate = False
    try:
        return int(args.func(args) or 0)
    except CleanroomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
