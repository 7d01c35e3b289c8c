"""``cleanroom task``: what a consortium and a hospital need to approve a task by its digest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
examples:
  cleanroom task digest heart-disease           the built-in task's digest
  cleanroom task digest examples/fed_tcga_brca  a task folder (or Flower App) you reviewed
  cleanroom task show examples/fed_tcga_brca    name, digests, dataset, fields, metrics, files

a coordinator lists the digest in its policy (tasks = [...]); a hospital approves it in its
site.toml ([[policy.tasks]] digest = "...") or per run ('cleanroom site approve RUN --task ...').
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("task", help="a task's digest and description (what sites approve)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="A task is the unit of approved code: the folder (or Flower "
                       "App) with the model, loss, metrics and the data fields it reads. Sites "
                       "approve its digest; nothing of a task is imported before its digest "
                       "is checked.")
    tsub = p.add_subparsers(dest="task_command", required=True, metavar="COMMAND")
    d = tsub.add_parser("digest", help="print the task's digest (reads files, imports nothing)")
    d.add_argument("task", help="a task folder or an installed task's name")
    d.set_defaults(func=cmd_digest)
    s = tsub.add_parser("show", help="the task's name, digests, dataset, fields and metrics "
                        "(imports the task: use it on code you reviewed)")
    s.add_argument("task", help="a task folder or an installed task's name")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_show)


def _folder(spec: str) -> Path:
    from cleanroom.task import task_folder

    return task_folder(spec)


def cmd_digest(args: argparse.Namespace) -> int:
    from cleanroom.task import task_digest

    print(task_digest(_folder(args.task)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from cleanroom.task import load_task

    loaded = load_task(_folder(args.task))
    task = loaded.task
    info = {"name": task.name, "digest": loaded.digest,
            "architecture_digest": loaded.architecture_digest, "dataset": task.dataset_name,
            "features": [f.name for f in task.features],
            "targets": [f.name for f in task.targets], "metrics": list(task.metrics),
            "description": task.description, "folder": str(loaded.folder)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        text = ", ".join(value) if isinstance(value, list) else value
        print(f"{key:20} {text}")
    return 0
