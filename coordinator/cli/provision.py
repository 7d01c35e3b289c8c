"""``cleanroom provision``: create a federation's keys, certificates, policy and configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cleanroom.errors import ConfigError

EPILOG = """\
examples:
  cleanroom provision --out fed --sites cleveland,hungary,switzerland,va
  # a hospital made its own key with 'cleanroom site keygen' and sent node_auth.pub:
  cleanroom provision --out fed --sites cleveland,va --site-key va=received/va.pub
  # real SEV-SNP/TDX sites: approved image measurement(s), configfs-tsm provider
  cleanroom provision --out fed --sites a,b --enclave configfs-tsm --measurement HEX \
      --aggregator-measurement HEX

The coordinator's aggregator enclave is attested by every site each round (sites get
aggregator-trust.json and [aggregator] required = true); --no-aggregator provisions the
earlier protocol (the coordinator's process opens updates; sites share their metrics).

then: cleanroom coordinator --config fed/coordinator/coordinator.toml
      cleanroom site --config fed/sites/<name>/site.toml      (at each site)
      cleanroom run --config fed/coordinator/coordinator.toml --out results
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("provision", help="create CA, TLS, node keys, policy and configs",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Provision a federation into an empty folder. Private keys "
                       "are mode 0600 and never printed; tokens are written to *.token files.")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--sites", required=True, help="comma-separated site names")
    p.add_argument("--site-key", action="append", default=[], metavar="NAME=PUBFILE",
                   help="use the public key a site generated itself (repeatable)")
    p.add_argument("--enclave", choices=["simulated", "configfs-tsm"], default="simulated",
                   help="evidence provider of the sites: simulated TEE (trials, default) or "
                   "configfs-tsm (real SEV-SNP/TDX guests)")
    p.add_argument("--measurement", action="append", default=[], metavar="HEX",
                   help="allowed launch measurement (repeatable; required for configfs-tsm)")
    p.add_argument("--aggregator-measurement", action="append", default=[], metavar="HEX",
                   help="launch measurement of the aggregator enclave's image (repeatable; "
                   "required for configfs-tsm unless --no-aggregator)")
    p.add_argument("--no-aggregator", action="store_true",
                   help="no attested aggregator enclave (sites do not require one)")
    p.add_argument("--host", default="127.0.0.1", help="SuperLink address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9400, help="public SuperLink port, Fleet only "
                   "(default 9400)")
    p.add_argument("--api-port", type=int, default=9401, help="coordinator API port")
    p.add_argument("--control-port", type=int, help="loopback port of the SuperLink itself "
                   "(its Control API; default: the API port + 1)")
    p.add_argument("--site-port", type=int, default=9500, help="first SuperNode port")
    p.add_argument("--site-api-port", type=int, default=9600, help="first site API port")
    p.add_argument("--task", default="heart-disease", help="the federation's task: an "
                   "installed task's name or a task folder (default heart-disease); pinned in "
                   "the coordinator policy and approved in every site's policy; simulated "
                   "sites get its simulated data registered")
    p.add_argument("--rounds", type=int, default=5, help="default rounds of a run")
    p.set_defaults(func=cmd_provision)


def cmd_provision(args: argparse.Namespace) -> int:
    from cleanroom.coordinator.provision import ProvisionRequest, provision

    keys = {}
    for item in args.site_key:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--site-key {item!r}: expected NAME=PUBFILE")
        keys[name] = Path(path)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    for flag, values in (("--measurement", args.measurement),
                         ("--aggregator-measurement", args.aggregator_measurement)):
        for m in values:
            try:
                if len(bytes.fromhex(m)) != 48:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{flag} {m!r} is not 48 bytes of hex") from None
    result = provision(ProvisionRequest(
        out=args.out, sites=sites, enclave=args.enclave, site_keys=keys,
        measurements=list(args.measurement), superlink_host=args.host,
        superlink_port=args.port, api_port=args.api_port, control_port=args.control_port,
        site_base_port=args.site_port,
        site_api_base_port=args.site_api_port, task=args.task, rounds=args.rounds,
        aggregator=not args.no_aggregator,
        aggregator_measurements=list(args.aggregator_measurement)))
    print(f"provisioned {len(sites)} site(s) in {result.out}")
    print(f"  coordinator: cleanroom coordinator --config {result.coordinator_config}")
    for name, path in result.site_configs.items():
        print(f"  site {name}: cleanroom site --config {path}")
    print(f"  API tokens (keep them secret): {', '.join(str(p) for p in result.tokens.values())}")
    return 0
