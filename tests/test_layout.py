"""The package layout the architecture promises: one import root, sides that do not reach into
each other, a shared package that imports neither side (static check of every import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("coordinator", "site_agent", "models", "simulations")
# The umbrella entry points of the import root may name the sides (lazily): the public API
# facade, ``python -m cleanroom`` and the command dispatcher.
UMBRELLA = {"cleanroom/__init__.py", "cleanroom/__main__.py", "cleanroom/cli.py"}
# Which side may import which (besides the shared package).
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "models": set(),
    "site_agent": {"models"},
    "coordinator": {"models"},
    "simulations": {"coordinator", "site_agent", "models"},  # runs both sides on one machine
}
# Known cross-side imports, each with its reason (keep this list short).
EXCEPTIONS = {
    # provisioning writes both sides' files: each site's simulated chip and the measurement
    # of the site build that the coordinator's policy allows
    ("coordinator/provision.py", "cleanroom.site_agent.runtime"),  # each simulated site's data
    ("coordinator/provision.py", "cleanroom.site_agent.config"),
    # the built-in heart-disease task's simulate() is a simulated site's data source: it
    # reads the vendored files with the site's FLamby loader (never called in a deployment)
    ("models/heart_disease/task.py", "cleanroom.site_agent.data"),
    ("models/synthetic/task.py", "cleanroom.site_agent.data"),
    ("models/synthetic_1m/task.py", "cleanroom.site_agent.data"),
    ("models/synthetic_10m/task.py", "cleanroom.site_agent.data"),
    # the built-in tasks are Flower Apps whose components are the coordinator's ServerApp and
    # the site agent's ClientApp (each loaded only on its own side)
    *((f"models/{task}/server_app.py", "cleanroom.coordinator")
      for task in ("heart_disease", "synthetic", "synthetic_1m", "synthetic_10m")),
    *((f"models/{task}/client_app.py", "cleanroom.site_agent")
      for task in ("heart_disease", "synthetic", "synthetic_1m", "synthetic_10m")),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _side(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in SIDES:
        return f"bare:{parts[0]}"  # a bare top-level import: forbidden everywhere
    if parts[0] != "cleanroom":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SIDES else "shared"


def _files() -> list[tuple[str, Path]]:
    out = [("shared", p) for p in (ROOT / "cleanroom").rglob("*.py")]
    for side in SIDES:
        out += [(side, p) for p in (ROOT / side).rglob("*.py")]
    return out


@pytest.mark.parametrize("side,path", _files(), ids=lambda v: str(v).rsplit("/main/", 1)[-1]
                         if isinstance(v, Path) else v)
def test_imports_respect_the_layout(side: str, path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    if rel in UMBRELLA:
        return
    for module in _imports(path):
        target = _side(module)
        if target is None or target in ("shared", side):
            continue
        assert not target.startswith("bare:"), \
            f"{rel} imports {module!r}: import it as cleanroom.{module}"
        assert target in ALLOWED[side] or (rel, module) in EXCEPTIONS, \
            f"{rel} ({side}) imports {module} ({target})"


def test_every_package_folder_is_a_regular_package() -> None:
    """Each folder of Python code has an __init__.py (setup.py installs what it finds)."""
    for top in ("cleanroom", *SIDES):
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts or "data" in folder.relative_to(ROOT).parts:
                continue
            if any(folder.glob("*.py")):
                assert (folder / "__init__.py").exists(), f"{folder} has no __init__.py"


def test_a_users_folder_with_our_module_names_shadows_nothing(tmp_path: Path) -> None:
    """A consortium's app folder may hold models.py, coordinator.py, site_agent.py or
    simulations.py: ours are cleanroom.*, so the CLI and the public modules still load."""
    import subprocess
    import sys

    for name in SIDES:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}')\n")
    version = subprocess.run([sys.executable, "-m", "cleanroom", "--version"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("cleanroom-fl ")
    ours = subprocess.run(
        [sys.executable, "-c", "import cleanroom.coordinator.strategy, cleanroom.site_agent.app,"
         " cleanroom.simulations.engine, cleanroom.models"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run([sys.executable, "-c", "import models"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert "the user's own models" in theirs.stderr  # and theirs is still theirs
