"""``cleanroom site``: the hospital's site-agent daemon and its local tools."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
examples:
  cleanroom site --config site.toml                 run the daemon (SuperNode + local API)
  cleanroom site keygen --out keys/                 make this site's node key; send the .pub
  cleanroom site approve 123 --task DIGEST --epsilon 1 --config site.toml
                                                    approve run 123 of that task, up to epsilon 1
  cleanroom site status --config site.toml          provider, measurement, budget, recent rounds
  cleanroom site token --role auditor --out auditor.token --config site.toml
                                                    a read-only token for the dashboard and API
  cleanroom site dataset add brca data.csv --split-column fold --config site.toml
  cleanroom site dataset list --config site.toml    registered datasets (never rows)
  cleanroom site dataset mark brca pid --identifying --config site.toml
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("site", help="site agent daemon, keygen, approvals, status",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Run a hospital's site agent (Flower SuperNode with TLS and "
                       "node auth, the confidential ClientApp, the local API) or manage it.")
    p.add_argument("--config", type=Path, help="site.toml (for the daemon)")
    p.set_defaults(func=cmd_daemon)
    ssub = p.add_subparsers(dest="site_command", metavar="COMMAND")
    k = ssub.add_parser("keygen", help="create this site's SuperNode auth key (private key "
                        "stays here, mode 0600)")
    k.add_argument("--out", type=Path, required=True, metavar="DIR")
    k.set_defaults(func=cmd_keygen)
    a = ssub.add_parser("approve", help="approve a run of one task up to an epsilon",
                        description="Approve run RUN_ID to train task DIGEST here, spending at "
                        "most EPSILON (a site with require_approval trains only approved runs; "
                        "any site runs a task outside its policy's [[policy.tasks]] only for "
                        "a run approved with it). --revoke withdraws it.")
    a.add_argument("run_id")
    a.add_argument("--task", metavar="DIGEST", help="the task's digest (cleanroom task digest "
                   "FOLDER); required unless --revoke")
    a.add_argument("--epsilon", type=float, help="the most this run may spend at this site; "
                   "required unless --revoke")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--revoke", action="store_true", help="withdraw the approval")
    a.set_defaults(func=cmd_approve)
    s = ssub.add_parser("status", help="provider, measurement, budget left, recent rounds")
    s.add_argument("--config", type=Path, required=True)
    s.set_defaults(func=cmd_status)
    t = ssub.add_parser("token", help="create an API and dashboard token (operator or auditor)",
                        description="Create a token for the site's local API and dashboard: its "
                        "SHA-256 goes into api.tokens, the token itself into --out (mode 0600), "
                        "never to the screen. Auditors read only. The daemon reads its tokens "
                        "when it starts: restart it to accept the new one.")
    t.add_argument("--role", choices=["operator", "auditor"], required=True)
    t.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="where to write the token (must not exist)")
    t.add_argument("--config", type=Path, required=True)
    t.set_defaults(func=cmd_token)
    _add_dataset_parser(ssub)


def _add_dataset_parser(ssub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = ssub.add_parser("dataset", help="the site's data room: register, list, show, mark "
                        "datasets", description="Register the site's datasets (CSV or Parquet) "
                        "by name, SHA-256 and schema; the identifier scan marks likely direct "
                        "identifiers, which no task is ever served.")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    add = dsub.add_parser("add", help="register FILE as dataset NAME")
    add.add_argument("name")
    add.add_argument("file", type=Path)
    add.add_argument("--config", type=Path, required=True)
    split = add.add_mutually_exclusive_group()
    split.add_argument("--test-file", type=Path, help="a separate file of test rows")
    split.add_argument("--split-column", metavar="COL", help="a column holding train/test")
    add.add_argument("--replace", action="store_true", help="replace a registered dataset")
    add.set_defaults(func=cmd_dataset_add)
    ls = dsub.add_parser("list", help="registered datasets")
    ls.add_argument("--config", type=Path, required=True)
    ls.set_defaults(func=cmd_dataset_list)
    show = dsub.add_parser("show", help="one dataset: files, digests, schema, identifier flags")
    show.add_argument("name")
    show.add_argument("--config", type=Path, required=True)
    show.set_defaults(func=cmd_dataset_show)
    mark = dsub.add_parser("mark", help="overrule the identifier scan for one column")
    mark.add_argument("name")
    mark.add_argument("column")
    mark.add_argument("--config", type=Path, required=True)
    which = mark.add_mutually_exclusive_group(required=True)
    which.add_argument("--identifying", dest="identifying", action="store_true")
    which.add_argument("--not-identifying", dest="identifying", action="store_false")
    mark.set_defaults(func=cmd_dataset_mark)


def _runtime(config_path: Path):  # -> SiteRuntime
    from cleanroom.site_agent.config import load_site_config
    from cleanroom.site_agent.runtime import build_runtime

    return build_runtime(load_site_config(config_path))


def cmd_daemon(args: argparse.Namespace) -> int:
    from cleanroom.errors import ConfigError
    from cleanroom.site_agent.daemon import serve_site

    if args.config is None:
        raise ConfigError("cleanroom site needs --config site.toml (or a COMMAND; see --help)")

    def ready(config: object) -> None:
        c = config
        print(f"site {c.site} ready: SuperNode -> {c.flower.superlink}, API "  # type: ignore[attr-defined]
              f"http://{c.api.host}:{c.api.port}", flush=True)  # type: ignore[attr-defined]

    return serve_site(args.config, on_ready=ready)


def cmd_keygen(args: argparse.Namespace) -> int:
    from cleanroom.pki import generate_node_key

    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "node_auth.key").exists():
        from cleanroom.errors import ConfigError

        raise ConfigError(f"{args.out / 'node_auth.key'} exists; refusing to overwrite a key")
    generate_node_key(args.out)
    print(f"private key: {args.out / 'node_auth.key'} (mode 0600, keep it here)")
    print(f"send to the consortium: {args.out / 'node_auth.pub'}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cleanroom.config import format_validation_error
    from cleanroom.errors import ConfigError
    from cleanroom.site_agent.approvals import ApprovalRequest

    if args.revoke:
        runtime = _runtime(args.config)
        runtime.approvals.revoke(args.run_id, by="cli")
        print(f"approval of run {args.run_id} withdrawn at site {runtime.site}")
        return 0
    if args.task is None or args.epsilon is None:
        raise ConfigError("approve needs --task DIGEST and --epsilon E (or --revoke)")
    try:
        request = ApprovalRequest(run_id=args.run_id, task_digest=args.task,
                                  epsilon=args.epsilon)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "approval")) from None
    runtime = _runtime(args.config)
    runtime.approvals.approve(request, by="cli")
    print(f"run {args.run_id} approved at site {runtime.site}: task {args.task[:16]}..., "
          f"at most epsilon {args.epsilon:g}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from cleanroom.errors import ConfigError
    from cleanroom.fsutil import write_private
    from cleanroom.http import add_token
    from cleanroom.site_agent.config import load_site_config

    config = load_site_config(args.config)
    if config.api.tokens is None:
        raise ConfigError(f"{args.config}: [api] tokens is not set (the file of token hashes)")
    if args.out.exists():
        raise ConfigError(f"{args.out} exists; refusing to overwrite a token file")
    token = add_token(config.api.tokens, args.role)
    write_private(args.out, (token + "\n").encode())
    print(f"{args.role} token for site {config.site} written to {args.out} (mode 0600); "
          "restart the site daemon to accept it")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cleanroom.site_agent.api import status_of

    print(json.dumps(status_of(_runtime(args.config)), indent=2))
    return 0


def _print_columns(record: object) -> None:
    for c in record.columns:  # type: ignore[attr-defined]
        verdict = "IDENTIFYING" if c.identifying else "-"
        why = ", ".join(c.flags) if c.marked_by == "scan" else f"marked by {c.marked_by}"
        print(f"  {c.name:<40} {c.dtype:<8} {verdict:<12} {why if c.identifying or c.flags else ''}"
              .rstrip())


def cmd_dataset_add(args: argparse.Namespace) -> int:
    room = _runtime(args.config).datasets
    record = room.add(args.name, args.file, test_file=args.test_file,
                      split_column=args.split_column, replace_existing=args.replace, by="cli")
    print(f"dataset {record.name} registered: {record.train_rows} train / {record.test_rows} "
          f"test rows, {len(record.columns)} columns, digest {record.digest}")
    if record.identifying:
        print(f"identifying (never served to a task): {', '.join(record.identifying)}")
    _print_columns(record)
    return 0


def cmd_dataset_list(args: argparse.Namespace) -> int:
    datasets = _runtime(args.config).datasets.datasets()
    if not datasets:
        print("no datasets registered")
        return 0
    print(f"{'name':<24} {'train':>7} {'test':>7} {'columns':>7}  {'identifying':<11}  digest")
    for name, r in sorted(datasets.items()):
        print(f"{name:<24} {r.train_rows:>7} {r.test_rows:>7} {len(r.columns):>7}  "
              f"{len(r.identifying):<11}  {r.digest[:16]}")
    return 0


def cmd_dataset_show(args: argparse.Namespace) -> int:
    record = _runtime(args.config).datasets.get(args.name)
    print(json.dumps(record.to_json(), indent=2))
    return 0


def cmd_dataset_mark(args: argparse.Namespace) -> int:
    record = _runtime(args.config).datasets.mark(args.name, args.column,
                                                 identifying=args.identifying, by="cli")
    state = "identifying" if args.identifying else "not identifying"
    print(f"dataset {record.name}: column {args.column!r} marked {state}")
    return 0
