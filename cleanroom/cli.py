"""The ``cleanroom`` command: one entry point for sites, operators and researchers.

Each command lives with the side it belongs to (``cleanroom.attestation.cli``,
``cleanroom.coordinator.cli.*``, ``cleanroom.site_agent.cli``, ``cleanroom.simulations.cli``);
this dispatcher names them and imports a command's module only to build its parser, so the
shared package's own modules import neither side.
"""

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


COMMANDS: tuple[str, ...] = (
    "cleanroom.simulations.cli",            # simulate
    "cleanroom.attestation.cli",            # attest verify|show|simulate-root
    "cleanroom.task_cli",                   # task digest|show
    "cleanroom.coordinator.cli.audit",      # audit verify|show
    "cleanroom.site_agent.cli",             # site (daemon, keygen, approve, status)
    "cleanroom.coordinator.cli.daemon",     # coordinator
    "cleanroom.coordinator.cli.provision",  # provision
    "cleanroom.coordinator.cli.run",        # run
    "cleanroom.simulations.deploy_local_cli",  # deploy-local
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from cleanroom import __version__

    parser = argparse.ArgumentParser(prog="cleanroom", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    parser.add_argument("--version", action="version", version=f"cleanroom-fl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
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
