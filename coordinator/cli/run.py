"""``cleanroom run``: submit a federated run to the coordinator and follow it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cleanroom.coordinator.strategies import STRATEGIES


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="submit a federated run to a running coordinator",
                       description="Submit a run through Flower's run submission to the "
                       "coordinator named by --config (its daemon must be running), show "
                       "progress, and write report.json (same format as 'cleanroom simulate'), "
                       "report.png, the model card and the audit log into --out.")
    p.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    p.add_argument("--rounds", type=int, help="federated rounds (default: the config's)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES),
                   help="Flower strategy to wrap (default: the config's)")
    p.add_argument("--no-dp", action="store_true",
                   help="ask sites to train without DP (sites may refuse)")
    p.add_argument("--epsilon", type=float,
                   help="epsilon per site for the run (sites cap it with their own budget)")
    p.add_argument("--seed", type=int, help="initial model seed")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="sites mask their updates (SecAgg with dropouts; needs the "
                   "coordinator's [aggregator] and a strategy that aggregates by a mean)")
    p.add_argument("--local-steps", type=int, help="DP-SGD steps per round")
    p.add_argument("--lr", type=float, help="local learning rate")
    p.add_argument("--out", type=Path, default=Path("runs/deployed"),
                   help="where report.json, audit.jsonl... are copied (default runs/deployed)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--pause-after", type=int, metavar="N",
                   help="stop after round N (a checkpoint is kept); continue with --resume")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue a paused or interrupted run from its last checkpoint, with "
                   "its own settings and run id (training options are ignored)")
    p.set_defaults(func=cmd_run)


def options_from(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in (("rounds", args.rounds), ("strategy", args.strategy),
                       ("epsilon", args.epsilon), ("seed", args.seed),
                       ("local_steps", args.local_steps), ("lr", args.lr)):
        if value is not None:
            options[key] = value
    if args.no_dp:
        options["dp"] = False
    if args.secure_aggregation:
        options["secure_aggregation"] = True
    if args.pause_after:
        options["pause_after"] = args.pause_after
    if args.resume:
        options["resume_run"] = str(args.resume)
    return options


def submit_and_follow(config: Path, options: dict[str, Any], out: Path, timeout: float,
                      progress: bool) -> int:
    from tqdm import tqdm

    from cleanroom.coordinator.daemon import control_for
    from cleanroom.coordinator.submit import follow

    control = control_for(config)
    rounds = int(options.get("rounds", control.config.training.rounds))
    run_id = control.submit(options)
    print(f"submitted run {run_id}", flush=True)
    bar = tqdm(total=rounds, desc=f"run {run_id}", unit="round", disable=not progress,
               file=sys.stderr)

    def on_round(entry: dict[str, Any]) -> None:
        acc = entry.get("accuracy_mean")
        bar.set_postfix(acc=f"{acc:.3f}" if acc is not None else "-",
                        attested=len(entry["attested"]), quarantined=len(entry["quarantined"]))
        for site, reason in entry["quarantined"].items():
            bar.write(f"round {entry['round']}: {site} quarantined: {reason}")
        bar.update(1)

    try:
        result = follow(control, run_id, out, timeout=timeout, on_round=on_round)
    finally:
        bar.close()
    if result.status != "finished:completed" or result.report is None:
        print(f"run {run_id} ended {result.status}: {result.details.strip()[-1500:]}",
              file=sys.stderr)
        return 1
    final = result.report["final"]
    last = result.report["rounds"][-1]["round"] if result.report["rounds"] else 0
    planned = int((result.report.get("config") or {}).get("rounds") or last)
    if last < planned:
        print(f"run {run_id} paused after round {last} of {planned}: continue with "
              f"'cleanroom run --config {config} --resume {run_id}'")
    else:
        print(f"run {run_id} completed: client-average accuracy {final['accuracy_mean']}")
    empty = [r["round"] for r in result.report["rounds"] if not r.get("aggregated")]
    if empty:
        print(f"warning: {len(empty)} of {len(result.report['rounds'])} round(s) aggregated "
              f"no update (rounds {', '.join(map(str, empty[:10]))}): the model did not move "
              "in them; see each round's quarantined reasons in the report", file=sys.stderr)
    print(f"report: {out / 'report.json'}  audit: {out / 'audit.jsonl'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return submit_and_follow(args.config, options_from(args), args.out, args.timeout,
                             not args.no_progress)
