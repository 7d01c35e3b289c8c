"""Coordinator memory vs the sites': peak memory of a confidential simulation, apart.

Each case runs ``cleanroom simulate`` (confidential, DP, FedAdam) in a fresh Python process
with ``sites_process``: every site runs in ONE separate process (the same protobuf bytes
cross a pipe), so the benchmark process holds the coordinator alone (strategy, gate, round
state, envelopes, aggregation, audit, report) plus the transport. Reported per case:

* model size (float32 parameters x 4 bytes);
* coordinator peak RSS above its RSS just before the run (imports excluded), and that as a
  multiple of the model size; the issue's goal after streaming aggregation is
  <= 3 x model + 200 MB;
* with ``--heap``, the coordinator's Python/numpy heap peak (``tracemalloc``: numpy buffers
  and bytes are traced, torch's allocator is not; its own bookkeeping adds to the RSS, so the
  RSS figures of a ``--heap`` run are higher);
* the attested aggregator enclave (a process of its own, where the updates are opened and
  folded into a running sum): its peak RSS above its RSS once started; the goal is checked on
  the coordinator's growth plus the aggregator's;
* the sites' process peak RSS (all sites, imports included);
* for reference, **the inner Flower strategy's own server step**: a fresh process with no
  cleanroom code runs the same strategy's ``configure_train`` / ``aggregate_train`` on a
  model of the same size, with the one averaged reply per round that the coordinator hands
  it, and reports its peak RSS growth. That is what the strategy itself needs (FedAdam keeps
  the current model, ``m_t`` and ``v_t`` and computes its step in float64: about eight model
  copies at its peak), which no coordinator below it can remove; the last column is the
  coordinator side without it.

Training is cheap on purpose (sampling rate 0.05: about 10 rows per site and step): the
coordinator's memory does not depend on it. 100 sites x 10M parameters (~4 GB of updates per
round, several copies today) runs only when named: ``--cases 100x10m``.

Run: ``python -m benchmarks memory [--cases 20x1m,100x1m,20x10m] [--rounds 2] [--heap]
[--strategy fedavg]`` (default: the task's own strategy, FedAdam).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = {"20x1m": ("synthetic-1m", 20), "100x1m": ("synthetic-1m", 100),
         "20x10m": ("synthetic-10m", 20), "100x10m": ("synthetic-10m", 100)}
DEFAULT_CASES = "20x1m,100x1m,20x10m"
GOAL_FIXED = 200 * 2**20  # issue 14: coordinator peak <= 3 x model + 200 MB
MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flower_step(task: str, rounds: int, strategy: str | None) -> dict[str, Any]:
    """Peak RSS growth of the inner Flower strategy's server loop alone (this process):
    the global record, ``configure_train``, one averaged reply per round, ``aggregate_train``
    and the result cast back to the model's float32: what the coordinator hands its inner
    strategy and keeps of it, with records built as the coordinator builds them (one copy)
    and nothing else of the coordinator in the loop."""
    import numpy as np
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from cleanroom.coordinator.strategies import build_strategy
    from cleanroom.protocol.flower import array_view, numpy_to_arrays, synthetic_reply
    from cleanroom.simulations.engine import load_simulation_task
    from cleanroom.task import build_task_model

    loaded = load_simulation_task(task)
    name = strategy or str(loaded.task.plan.get("strategy", "fedadam"))
    shapes = [tuple(p.shape) for p in build_task_model(loaded.task).parameters()]

    class OneNode:  # what configure_train needs of a Grid
        run = None

        def get_node_ids(self) -> list[int]:
            return [1]

        def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                           group_id: str, ttl: float | None = None) -> Message:
            return Message(content, dst_node_id, message_type, group_id=group_id)

    from cleanroom.malloc import release_large_buffers

    release_large_buffers()  # the same allocator setting as the coordinator's process
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # a run context
    inner = build_strategy(name, min_nodes=1)
    baseline = _rss()
    arrays = numpy_to_arrays((f"p{i}", np.zeros(shape, np.float32))
                             for i, shape in enumerate(shapes))
    for server_round in range(1, rounds + 1):
        list(inner.configure_train(server_round, arrays, ConfigRecord(), OneNode()))
        mean = numpy_to_arrays((k, array_view(v) + np.float32(0.01))
                               for k, v in arrays.items())
        reply = synthetic_reply(RecordDict({"arrays": mean, "metrics": MetricRecord(
            {"num-examples": 100})}), "train")
        del mean
        new, _ = inner.aggregate_train(server_round, [reply])
        del reply
        if new is not None:  # back to the model's float32, as the coordinator does
            arrays = numpy_to_arrays((k, array_view(v).astype(np.float32))
                                     for k, v in new.items())
            del new
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"strategy": name, "grown": peak - baseline}


def one(task: str, sites: int, rounds: int, out: Path, heap: bool = False,
        strategy: str | None = None) -> dict[str, Any]:
    """One case, in this process (the benchmark starts a fresh one per case). ``heap``:
    trace the Python/numpy heap too (tracemalloc's own bookkeeping then adds to the RSS)."""
    import tracemalloc

    from cleanroom.simulations.defaults import training_defaults
    from cleanroom.simulations.engine import (
        SimulationConfig,
        load_simulation_task,
        run_simulation,
    )
    from cleanroom.task import build_task_model

    loaded = load_simulation_task(task)
    params = sum(p.numel() for p in build_task_model(loaded.task).parameters())
    values: dict[str, Any] = dict(training_defaults(dp=True, plan=loaded.task.plan))
    values.update(task=task, sites=sites, rounds=rounds, sample_rate=0.05, tracking=False,
                  progress=False, out=out, sites_process=True)
    if strategy:
        values["strategy"] = strategy
    config = SimulationConfig(**values)
    baseline = _rss()
    if heap:
        tracemalloc.start(1)
    start = time.perf_counter()
    result = run_simulation(config)
    seconds = time.perf_counter() - start
    heap_peak = tracemalloc.get_traced_memory()[1] if heap else 0
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    attested = [len(r["attested"]) for r in result.report["rounds"]]
    return {"task": task, "strategy": config.strategy, "sites": sites, "params": params,
            "model_bytes": params * 4,
            "baseline": baseline, "peak": peak, "heap_peak": heap_peak,
            "sites_peak": result.sites_peak_rss or 0, "seconds": seconds,
            "aggregator": list(result.aggregator_rss) if result.aggregator_rss else None,
            "attested": attested}


def _row(name: str, r: dict[str, Any], step: dict[str, Any] | None) -> str:
    model = r["model_bytes"]
    grown = r["peak"] - r["baseline"]
    agg = r.get("aggregator")
    agg_grown = agg[1] - agg[0] if agg else 0
    total = grown + agg_grown
    goal = 3 * model + GOAL_FIXED
    heap = (f"{r['heap_peak'] / MB:.0f} MB ({r['heap_peak'] / model:.1f}x)"
            if r["heap_peak"] else "not traced (--heap)")
    agg_text = (f"{agg_grown / MB:.0f} MB ({agg_grown / model:.1f}x; peak {agg[1] / MB:.0f} MB)"
                if agg else "none")
    if step is not None:
        own = step["grown"]
        rest = total - own
        step_text = (f"{own / MB:.0f} MB ({own / model:.1f}x) | {rest / MB:.0f} MB "
                     f"({rest / model:.1f}x) {'met' if rest <= goal else 'NOT met'}")
    else:
        step_text = "failed | -"
    return (f"| {name} | {r['strategy']} | {model / MB:.0f} MB | {grown / MB:.0f} MB "
            f"({grown / model:.1f}x) | {heap} | {agg_text} | "
            f"{total / MB:.0f} MB ({total / model:.1f}x) | "
            f"{goal / MB:.0f} MB {'met' if total <= goal else 'NOT met'} | {step_text} | "
            f"{r['sites_peak'] / MB:.0f} MB | {r['seconds']:.0f} s |")


def _child(args: list[str]) -> dict[str, Any] | str:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", *args],
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heap", action="store_true",
                        help="also trace the Python/numpy heap (tracemalloc: its bookkeeping "
                        "then adds to the coordinator's RSS)")
    parser.add_argument("--strategy", default=None,
                        help="the Flower strategy (default: the task's own, FedAdam)")
    parser.add_argument("--one", nargs=3, metavar=("TASK", "SITES", "OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--step", metavar="TASK", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        task, sites, out = args.one
        print(json.dumps(one(task, int(sites), args.rounds, Path(out), heap=args.heap,
                             strategy=args.strategy)))
        return 0
    if args.step:
        print(json.dumps(flower_step(args.step, args.rounds, args.strategy)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    print(f"confidential simulation, {args.rounds} rounds, sites in a separate process; "
          "coordinator = this process (its RSS before the run subtracted)")
    print("| case | strategy | model | coordinator peak RSS growth | coordinator heap peak "
          "(tracemalloc) | aggregator enclave growth | coordinator side (both) | "
          "goal 3 x model + 200 MB | the Flower strategy's own server step (reference) | "
          "coordinator side without it vs the goal | sites' process peak RSS | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    common = ["--rounds", str(args.rounds)] + (
        ["--strategy", args.strategy] if args.strategy else [])
    for name in [c for c in args.cases.split(",") if c]:
        task, sites = CASES[name]
        result = _child([*common, *(["--heap"] if args.heap else []), "--one", task,
                         str(sites), str(tmp / name)])
        if isinstance(result, str):
            print(f"| {name} | {result} |")
            continue
        step = _child([*common, "--step", task])
        print(_row(name, result, step if isinstance(step, dict) else None), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
