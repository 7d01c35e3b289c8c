"""Helpers for task tests: write small task folders."""

from __future__ import annotations

import textwrap
from pathlib import Path

TINY_TASK = '''
import torch
from torch import nn

from cleanroom.task import Field, Task


def model():
    return nn.Linear(2, 1)


def loss(outputs, targets):
    return nn.functional.mse_loss(outputs.squeeze(-1), targets, reduction="none")


task = Task(name="{name}", features=(Field("a"), Field("b")), targets=(Field("y"),),
            model=model, loss=loss, metrics={{"mse": lambda o, t: float(((o - t) ** 2).mean())}})
'''


def write_task(folder: Path, source: str | None = None, name: str = "tiny",
               extra: dict[str, str] | None = None) -> Path:
    """A task folder with task.py (``source`` or a tiny linear task) and ``extra`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    text = source if source is not None else TINY_TASK.format(name=name)
    (folder / "task.py").write_text(textwrap.dedent(text))
    for rel, content in (extra or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))
    return folder
