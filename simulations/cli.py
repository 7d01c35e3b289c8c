"""``cleanroom simulate``: the local multi-site simulation (the main job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cleanroom.config import format_validation_error
from cleanroom.errors import ConfigError

EPILOG = """\
scenarios:
  honest             all sites honest (default)
  tampered-site      one site runs modified code -> MEASUREMENT not on the allow-list
  replayed-evidence  one site re-sends last round's evidence -> REPORT_DATA binding fails
  forged-evidence    one site edits its signed report -> signature fails
  debug-enclave      one site's enclave has the debug policy bit -> refused
  over-budget        one site has a tiny privacy budget -> refuses, quarantined
  unattested-coordinator
                     the coordinator's aggregator runs modified code -> every site refuses
                     to release its update (report.json rounds: site_refusals)
  dropout-after-masking
                     secure aggregation; one site goes offline after sharing its masks ->
                     the round completes with the others (rounds: aggregated,
                     secure_aggregation.dropped)
  poisoned-update    one attested site sends its update scaled 100x -> quarantined every
                     round, the reason names the norm and the bound; the others train on

trust both ways: every round each site sends its own nonce with its attestation and releases
its update only to the coordinator's aggregator enclave whose evidence binds that nonce and
the round key (report.json rounds: aggregated, site_refusals). --no-aggregator runs the
earlier protocol (the coordinator's own process opens the updates).

outputs (in --out): report.json, report.png, final_model.npz, mlflow.db (MLflow tracking),
state/ (sealed site ledgers, simulated enclaves). Browse runs with:
  mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db

examples:
  cleanroom simulate
  cleanroom simulate --scenario tampered-site --rounds 3
  cleanroom simulate --no-dp --strategy fedavg --out runs/nodp
  cleanroom simulate --epsilon 2 --seed 3 --tracking-uri http://mlflow.example:5000
  cleanroom simulate --central-epsilon 4 --strategy fedavg
  cleanroom simulate --scenario unattested-coordinator --rounds 2
  cleanroom simulate --secure-aggregation --strategy fedavg
  cleanroom simulate --scenario dropout-after-masking
"""


INNER_BAR_SITES = 20  # from this many sites, a second bar shows progress within a round
LIST_SITES = 12  # up to this many sites, the summary lists each one


def _per_site(values: dict[str, float]) -> str:
    """Each site's value, or (many sites) the range with the sites at its ends."""
    if len(values) <= LIST_SITES:
        return ", ".join(f"{s} {v:.3f}" for s, v in values.items())
    low = min(values, key=values.__getitem__)
    high = max(values, key=values.__getitem__)
    return (f"{len(values)} sites: min {values[low]:.3f} at {low}, max {values[high]:.3f} at "
            f"{high}; all of them in report.json")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from cleanroom.coordinator.strategies import STRATEGIES

    p = sub.add_parser(
        "simulate", help="run the local multi-site simulation (4 hospitals, attested, DP)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Federated training of a task (default: the four UCI heart-disease "
        "hospitals) on one machine:\nevery round each site is attested by its simulated TEE, "
        "the model and updates are HPKE-encrypted,\nsites train the approved task with Opacus "
        "DP-SGD under their own budget, and everything is\ntracked in MLflow.")
    p.add_argument("--task", default="heart-disease", help="an installed task (heart-disease, "
                   "synthetic) or a task folder, e.g. examples/fed_tcga_brca (default "
                   "heart-disease)")
    p.add_argument("--sites", type=int, default=None, help="number of simulated sites (default: "
                   "the task's own, e.g. 4 hospitals; synthetic: 4)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the "
                   "task's plan, else 5)")
    p.add_argument("--strategy", default=None, choices=sorted(STRATEGIES),
                   help="Flower strategy to wrap (default: the task's plan, else fedadam)")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--epsilon", type=float, default=1.0,
                   help="privacy budget per site for the run (default 1.0)")
    p.add_argument("--delta", type=float, default=1e-5, help="DP delta (default 1e-5)")
    p.add_argument("--scenario", default="honest",
                   choices=["honest", "tampered-site", "replayed-evidence", "forged-evidence",
                            "debug-enclave", "over-budget", "unattested-coordinator",
                            "dropout-after-masking", "poisoned-update"],
                   help="honest (default), one hostile site or a hostile coordinator, see "
                   "below")
    p.add_argument("--hostile-site", help="which site misbehaves (default: the last one, va)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"),
                   help="output folder (default runs/latest)")
    p.add_argument("--seed", type=int, default=0, help="initial model and data seed (default 0)")
    p.add_argument("--local-steps", type=int, default=None, help="DP-SGD steps per round")
    p.add_argument("--sample-rate", type=float, default=None, help="Poisson sampling rate")
    p.add_argument("--lr", type=float, default=None, help="local learning rate")
    p.add_argument("--no-aggregator", action="store_true",
                   help="no attested aggregator enclave: the coordinator's process opens "
                   "every update (the protocol before mutual attestation)")
    p.add_argument("--central-epsilon", type=float, default=None, metavar="EPS",
                   help="add central (user-level) DP inside the aggregator: Gaussian noise on "
                   "the mean of clipped updates, calibrated to EPS over the run")
    p.add_argument("--central-clip", type=float, default=1.0, metavar="C",
                   help="central DP: L2 clip of each site's update delta (default 1.0)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="sites mask their updates (SecAgg with dropouts): the aggregator "
                   "learns only their sum; needs a strategy that aggregates by a mean")
    p.add_argument("--backend", choices=["inprocess", "ray"], default="inprocess",
                   help="inprocess (fast, default) or ray (Flower's simulation runtime)")
    p.add_argument("--workers", type=int, default=None, help="inprocess: sites served in "
                   "parallel by threads (default 8; training runs one site at a time)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for "
                   "small models, else torch's own)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in --out)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--state", type=Path, help="keep site state (sealed ledgers) in this "
                   "folder across simulations")
    p.add_argument("--site-budget", type=float, help="each site's lifetime epsilon")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the interrupted run in DIR (its --out) from its last round "
                   "checkpoint, with its own settings (other options are ignored)")
    p.set_defaults(func=cmd_simulate)


def config_from_args(args: argparse.Namespace) -> Any:
    from cleanroom.simulations.defaults import training_defaults
    from cleanroom.simulations.engine import SimulationConfig, load_simulation_task

    if args.resume is not None:
        return SimulationConfig(resume=args.resume, progress=not args.no_progress,
                                tracking_uri=args.tracking_uri)
    task = load_simulation_task(args.task)
    values: dict[str, Any] = dict(training_defaults(dp=not args.no_dp, plan=task.task.plan))
    overrides = {"rounds": args.rounds, "local_steps": args.local_steps,
                 "sample_rate": args.sample_rate, "lr": args.lr, "strategy": args.strategy}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update(task=args.task, sites=args.sites,
                  dp=not args.no_dp, epsilon=args.epsilon, delta=args.delta,
                  scenario=args.scenario, hostile_site=args.hostile_site, out=args.out,
                  seed=args.seed, backend=args.backend, tracking=not args.no_tracking,
                  tracking_uri=args.tracking_uri, state_dir=args.state,
                  site_budget=args.site_budget, progress=not args.no_progress,
                  aggregator=not args.no_aggregator, central_epsilon=args.central_epsilon,
                  central_clip=args.central_clip, workers=args.workers, threads=args.threads,
                  secure_aggregation=args.secure_aggregation)
    try:
        return SimulationConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "simulate options")) from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cleanroom.simulations.engine import run_simulation

    config = config_from_args(args)
    done, checkpoint = 0, None
    if config.resume is not None:
        from cleanroom.simulations.engine import resumed_config

        config, checkpoint = resumed_config(config)
        done = checkpoint.round
        print(f"resuming run {checkpoint.run_id} after round {done} of {config.rounds}",
              file=sys.stderr)
    bar = tqdm(total=config.rounds, initial=done, desc=f"{config.scenario} {config.strategy}",
               unit="round", disable=not config.progress, file=sys.stderr)
    many = (config.sites or 0) >= INNER_BAR_SITES and config.backend == "inprocess"
    inner = tqdm(total=0, desc="sites", unit="site", leave=False, position=1,
                 disable=not (config.progress and many), file=sys.stderr)

    def on_reply(reply: Any, count: int, total: int) -> None:
        if count == 1:
            phase = str(reply.metadata.message_type).split(".")[-1].removeprefix("cleanroom_")
            inner.reset(total=total)
            inner.set_description(f"round {bar.n + 1}: {phase}")
        inner.update(1)

    def on_round(entry: dict[str, Any]) -> None:
        means = entry.get("means") or {}
        metric = next((m for m in means if m != "loss"), "loss")
        value = means.get(metric)
        bar.set_postfix({metric: f"{value:.3f}" if value is not None else "-",
                         "attested": len(entry["attested"]),
                         "quarantined": len(entry["quarantined"])})
        for site, reason in entry["quarantined"].items():
            bar.write(f"round {entry['round']}: {site} quarantined: {reason}")
        for site, reason in (entry.get("site_refusals") or {}).items():
            bar.write(f"round {entry['round']}: {site} refused to release its update: "
                      f"{reason}")
        bar.update(1)

    started = time.time()
    try:
        result = run_simulation(config, on_round=on_round, checkpoint=checkpoint,
                                on_reply=on_reply if many else None)
    except (KeyboardInterrupt, Exception):
        inner.close()
        bar.close()
        marker = Path(config.out) / "checkpoint" / "checkpoint.json"
        if config.backend == "inprocess" and marker.exists() and \
                marker.stat().st_mtime >= started:  # written by this run
            print(f"interrupted; continue from the last completed round with: cleanroom "
                  f"simulate --resume {config.out}", file=sys.stderr)
        raise
    finally:
        inner.close()
        bar.close()
    report = result.report
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    final = report["final"]
    print(f"done in {result.seconds:.1f}s: task {report['task']['name']}, "
          f"{len(report['rounds'])} rounds, scenario {config.scenario}, strategy "
          f"{config.strategy}, DP {'on' if config.dp else 'off'}")
    for metric in report["task"]["metrics"]:
        if final.get(metric) is not None:
            values = {s: v[metric] for s, v in final["per_site"].items()
                      if v.get(metric) is not None}
            print(f"final client-average {metric} {final[metric]:.3f} ({_per_site(values)})")
    eps = {s: e for s, e in final["epsilon"].items() if e is not None}
    if eps:
        print(f"epsilon spent: {_per_site(eps)} (delta {config.delta:g})")
    if final.get("central_epsilon") is not None:
        print(f"central epsilon (aggregator, user-level): {final['central_epsilon']:.3f}")
    refusing = sorted({s for r in report["rounds"] for s in r.get("site_refusals") or {}})
    if refusing:
        print(f"sites that refused to release updates: {', '.join(refusing)} (see "
              "report.json rounds[].site_refusals)")
    elif config.confidential and config.aggregator:
        print("aggregator: attested by every site before each update")
    print(f"report: {result.report_path}  plot: {result.plot_path}")
    if report["mlflow"]["run_id"]:
        print(f"mlflow: {report['mlflow']['tracking_uri']} run {report['mlflow']['run_id']}")
    return 0
