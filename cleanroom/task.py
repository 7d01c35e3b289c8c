"""Tasks: the unit of approved code a consortium brings (model, loss, metrics, data fields).

A task is a folder holding ``task.py`` that defines a module-level ``task = Task(...)``. Sites
approve task *digests* (:func:`task_digest`, a SHA-256 over every file of the folder) and the
coordinator pins them. This module is shared by both sides and imports neither, nor torch at
import time (torch is imported lazily, when a model is built).

Loading (:func:`load_task`) reads the whole folder into memory ONCE, computes the digest over
exactly those bytes and imports the task's modules from that in-memory snapshot: what runs is
what was digested (no window between digest and import, and no stale ``__pycache__/*.pyc``
can run in place of a reviewed source). The folder is imported as a package with a unique name,
``cleanroom_task_<digest[:16]>``, so a task's ``models.py`` never clashes with anything:

* relative imports (``from .models import Net``) always work and are the recommended form;
* a top-level sibling import (``import models``, as in a Flower app) is served from the
  snapshot while ``task.py`` executes, then the alias is removed again from ``sys.modules``
  (anything of the same name that was there before is restored). Such an import inside a
  function body, run later, does not see the task's module: write relative imports.

``__file__`` of a task module is its real path, so a task may read files beside it (e.g. its
simulation data); those reads are not part of the import snapshot.

A task folder that is also a Flower App (a ``pyproject.toml`` with ``[tool.flwr.app]``) is
digested as the FAB Flower builds from it (the files it ships, ``pyproject.toml`` as Flower
rewrites it; not its ``.info/CONTENT`` manifest): so the digest of the folder, of the FAB that
``flwr run`` submits and of the app folder a SuperNode installs are the same, and a site can
check a FAB's digest (:func:`fab_snapshot`) before anything of it is installed or imported.

The digest format (version 1) is documented in ``docs/tasks.md``: a header line
``cleanroom-fl/task-digest/v1``, then one ``<sha256 hex>  <relative posix path>`` line per
regular file, sorted by the UTF-8 bytes of the path (exactly ``sha256sum``'s output format),
and the digest is the SHA-256 of that text. ``__pycache__/``, ``*.pyc``, ``*.pyo``,
``.DS_Store`` and VCS folders (``.git``, ``.hg``, ``.svn``, ``.bzr``) are left out; a symbolic
link or a special file anywhere in the folder is refused.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import stat
import sys
import threading
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cleanroom.errors import TaskError

if TYPE_CHECKING:
    import numpy as np
    import pandas
    import torch

__all__ = ["DIGEST_HEADER", "ENTRY_POINT_GROUP", "TASK_FILE", "Field", "LoadedTask", "Task",
           "architecture_digest", "digest_before_import", "fab_digest", "installed_tasks",
           "load_task", "task_digest"]

FieldType = Literal["float", "int", "bool"]
FIELD_TYPES: tuple[str, ...] = ("float", "int", "bool")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SITE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
METRIC_PATTERN = re.compile(r"[a-z0-9_]{1,64}")
RESERVED_METRICS = frozenset({"loss"})
MAX_FIELD_NAME = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

TASK_FILE = "task.py"
TASK_VARIABLE = "task"
ENTRY_POINT_GROUP = "cleanroom.tasks"
MODULE_PREFIX = "cleanroom_task_"
DIGEST_HEADER = "cleanroom-fl/task-digest/v1"
EXCLUDED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".bzr"})
EXCLUDED_FILES = frozenset({".DS_Store", ".git"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
MAX_TASK_FILES = 10_000
MAX_TASK_BYTES = 256 * 1024 * 1024
ARCHITECTURE_SCHEMA = "cleanroom-fl/model-architecture/v2"


# --------------------------------------------------------------------------- the types


@dataclass(frozen=True)
class Field:
    """One column the task needs from the site's dataset.

    ``name`` is the column name in the site's dataset; ``dtype`` says how the site must be able
    to provide it (every field reaches the model as float32; ``int`` and ``bool`` columns must
    hold integral / 0-1 values).
    """

    name: str
    dtype: FieldType = "float"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskError("task-invalid", f"field name must be a non-empty string, got "
                            f"{self.name!r}")
        if len(self.name) > MAX_FIELD_NAME or _CONTROL.search(self.name):
            raise TaskError("task-invalid", f"field name {self.name[:40]!r}: at most "
                            f"{MAX_FIELD_NAME} characters, no control characters")
        if self.dtype not in FIELD_TYPES:
            raise TaskError("task-invalid", f"field {self.name!r}: dtype must be one of "
                            f"{', '.join(FIELD_TYPES)}, got {self.dtype!r}")


def _fields(kind: str, value: object) -> tuple[Field, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TaskError("task-invalid", f"task {kind} must be a sequence of Field, got "
                        f"{type(value).__name__}")
    items = tuple(value)  # type: ignore[call-overload]
    if not items:
        raise TaskError("task-invalid", f"task {kind} must not be empty")
    for item in items:
        if not isinstance(item, Field):
            raise TaskError("task-invalid", f"task {kind}: expected Field, got "
                            f"{type(item).__name__} ({item!r:.40})")
    return items


@dataclass(frozen=True)
class Task:
    """What a consortium brings: a model, a per-example loss, metrics and the data it needs.

    * ``model()`` returns a fresh float32 ``torch.nn.Module``; inputs are the ``features`` as a
      float32 tensor ``(n, len(features))``.
    * ``loss(outputs, targets)`` returns the PER-EXAMPLE losses, shape ``(n,)``; each example's
      loss may depend only on that example's output and target (the site's trainer checks it
      and computes per-example gradients one example at a time under DP). ``targets`` is a
      float32 tensor ``(n, len(targets))``, squeezed to ``(n,)`` when there is one target.
    * ``metrics[name](outputs, targets)`` gets numpy arrays over a whole evaluation split and
      returns a float. ``loss`` is reserved: the mean per-example loss is always reported.
    * ``dataset``: the name sites register the data under (default: the task's ``name``).
    * ``simulate(partition_id, num_partitions) -> (train, test)`` pandas frames: used ONLY by
      simulated sites to register their dataset; never in a deployment.
    * ``sites``: the names of the simulated sites ``simulate`` serves, when the task's data has
      natural sites (hospitals, regions); empty: any number of sites, named ``site00``...
    * ``plan``: the consortium's recommended plan for the COORDINATOR (``strategy``, ``rounds``,
      ``local_steps``, ``lr``, ``max_grad_norm``, ``strategy_options``...; a nested ``dp`` /
      ``no_dp`` mapping applies on top for DP / non-DP runs). Sites never read it: each site
      decides its own noise from its own budget, and checks the plan it is sent.

    There are deliberately no fields for noise, clipping, sampling rate, steps, optimiser,
    batch size or learning rate: the site's trusted trainer owns DP and the coordinator's plan
    owns the optimisation.
    """

    name: str
    features: tuple[Field, ...]
    targets: tuple[Field, ...]
    model: Callable[[], torch.nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] = field(
        default_factory=dict)
    dataset: str = ""
    description: str = ""
    simulate: Callable[[int, int], tuple[pandas.DataFrame, pandas.DataFrame]] | None = None
    sites: tuple[str, ...] = ()
    plan: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise TaskError("task-invalid", f"task name must match {NAME_PATTERN.pattern}, got "
                            f"{self.name!r:.80}")
        features = _fields("features", self.features)
        targets = _fields("targets", self.targets)
        seen: set[str] = set()
        for f in (*features, *targets):
            if f.name in seen:
                raise TaskError("task-invalid", f"task {self.name}: field {f.name!r} is "
                                "declared twice")
            seen.add(f.name)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "targets", targets)
        for attr in ("model", "loss"):
            if not callable(getattr(self, attr)):
                raise TaskError("task-invalid", f"task {self.name}: {attr} must be callable")
        if not isinstance(self.metrics, Mapping):
            raise TaskError("task-invalid", f"task {self.name}: metrics must be a mapping of "
                            "name -> function")
        metrics = dict(self.metrics)
        for metric, fn in metrics.items():
            if not isinstance(metric, str) or not METRIC_PATTERN.fullmatch(metric):
                raise TaskError("task-invalid", f"task {self.name}: metric name {metric!r:.40} "
                                f"must match {METRIC_PATTERN.pattern}")
            if metric in RESERVED_METRICS:
                raise TaskError("task-invalid", f"task {self.name}: metric name {metric!r} is "
                                "reserved (the mean loss is always reported)")
            if not callable(fn):
                raise TaskError("task-invalid", f"task {self.name}: metric {metric!r} must be "
                                "callable")
        object.__setattr__(self, "metrics", types.MappingProxyType(metrics))
        if not isinstance(self.dataset, str) or (
                self.dataset and not NAME_PATTERN.fullmatch(self.dataset)):
            raise TaskError("task-invalid", f"task {self.name}: dataset must match "
                            f"{NAME_PATTERN.pattern}, got {self.dataset!r:.80}")
        if not isinstance(self.description, str):
            raise TaskError("task-invalid", f"task {self.name}: description must be a string")
        if self.simulate is not None and not callable(self.simulate):
            raise TaskError("task-invalid", f"task {self.name}: simulate must be callable or "
                            "None")
        sites = tuple(self.sites)
        if any(not isinstance(x, str) or not SITE_PATTERN.fullmatch(x) for x in sites) or \
                len(set(sites)) != len(sites):
            raise TaskError("task-invalid", f"task {self.name}: sites must be unique names "
                            f"matching {SITE_PATTERN.pattern}")
        object.__setattr__(self, "sites", sites)
        if not isinstance(self.plan, Mapping) or any(not isinstance(k, str) for k in self.plan):
            raise TaskError("task-invalid", f"task {self.name}: plan must be a mapping of "
                            "setting name -> value")
        object.__setattr__(self, "plan", types.MappingProxyType(dict(self.plan)))

    @property
    def dataset_name(self) -> str:
        """The dataset a site serves this task from: ``dataset``, or the task's name."""
        return self.dataset or self.name

    @property
    def fields(self) -> tuple[Field, ...]:
        """Every column the task reads: features, then targets."""
        return (*self.features, *self.targets)


@dataclass(frozen=True)
class LoadedTask:
    """A task imported from its folder, with the digest of exactly the bytes that were run."""

    task: Task
    digest: str
    folder: Path
    architecture_digest: str
    module: str
    n_params: int = 0  # parameters of the task's model (counted when it was built, at load)

    @property
    def n_features(self) -> int:
        return len(self.task.features)

    @property
    def n_targets(self) -> int:
        return len(self.task.targets)

    @property
    def name(self) -> str:
        return self.task.name


# --------------------------------------------------------------------------- digest


@dataclass(frozen=True)
class _Snapshot:
    folder: Path
    files: Mapping[str, bytes]  # relative POSIX path -> content
    digest: str

    def is_dir(self, rel: str) -> bool:
        prefix = rel.rstrip("/") + "/"
        return any(path.startswith(prefix) for path in self.files)


def _excluded(name: str, is_dir: bool) -> bool:
    if is_dir:
        return name in EXCLUDED_DIRS
    return name in EXCLUDED_FILES or name.endswith(EXCLUDED_SUFFIXES)


def _read_regular(path: str, rel: str) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise TaskError("task-symlink", f"{rel} is a symbolic link; task folders may hold "
                            "regular files only") from None
        raise TaskError("task-unreadable", f"cannot read {rel}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise TaskError("task-invalid", f"{rel} is not a regular file")
        return fh.read()


def _walk(folder: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0

    def visit(directory: str, rel_parts: tuple[str, ...]) -> None:
        nonlocal total
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise TaskError("task-unreadable", f"cannot list {directory}: {exc.strerror}") \
                from None
        for entry in entries:
            name = entry.name
            rel = "/".join((*rel_parts, name))
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise TaskError("task-invalid", f"file name {rel!r} is not valid UTF-8") \
                    from None
            if "\n" in name or "\r" in name:
                raise TaskError("task-invalid", f"file name {rel!r} holds a line break")
            if entry.is_symlink():
                raise TaskError("task-symlink", f"{rel} is a symbolic link; task folders may "
                                "hold regular files only")
            if entry.is_dir(follow_symlinks=False):
                if not _excluded(name, is_dir=True):
                    visit(entry.path, (*rel_parts, name))
                continue
            if not entry.is_file(follow_symlinks=False):
                raise TaskError("task-invalid", f"{rel} is not a regular file (fifo, socket or "
                                "device)")
            if _excluded(name, is_dir=False):
                continue
            if len(files) >= MAX_TASK_FILES:
                raise TaskError("task-too-large", f"more than {MAX_TASK_FILES} files")
            data = _read_regular(entry.path, rel)
            total += len(data)
            if total > MAX_TASK_BYTES:
                raise TaskError("task-too-large", f"more than {MAX_TASK_BYTES} bytes of files")
            files[rel] = data

    visit(str(folder), ())
    return files


def _listing(files: Mapping[str, bytes]) -> bytes:
    lines = [DIGEST_HEADER]
    for rel in sorted(files, key=lambda p: p.encode("utf-8")):
        lines.append(f"{hashlib.sha256(files[rel]).hexdigest()}  {rel}")
    return ("\n".join(lines) + "\n").encode("utf-8")


FAB_MANIFEST = ".info/CONTENT"
MAX_FAB_BYTES = 64 * 1024 * 1024


def flower_app_table(folder: Path) -> dict[str, Any] | None:
    """The ``[tool.flwr.app]`` table of ``folder``'s ``pyproject.toml``; None when there is no
    such file or table, or the file does not parse."""
    import tomllib

    path = Path(folder) / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    table = doc.get("tool", {}).get("flwr", {}).get("app")
    return table if isinstance(table, dict) else None


def is_flower_app(folder: Path) -> bool:
    """Whether ``folder`` holds a Flower App (``pyproject.toml`` with ``[tool.flwr.app]``)."""
    return flower_app_table(folder) is not None


def build_fab(folder: Path) -> bytes:
    """The FAB ``flwr run`` builds from ``folder`` (Flower's own builder: same bytes)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(Path(folder))
    except (ValueError, OSError) as exc:
        raise TaskError("task-invalid", f"{folder} is not a valid Flower App: {exc}") from None


def fab_files(fab: bytes) -> dict[str, bytes]:
    """The files of a FAB (zip), checked against its own ``.info/CONTENT`` manifest and the
    size limits; the manifest itself is not a task file. Raises :class:`TaskError`."""
    import io
    import zipfile

    if len(fab) > MAX_FAB_BYTES:
        raise TaskError("task-too-large", f"FAB of {len(fab)} bytes exceeds {MAX_FAB_BYTES}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
        if len(infos) > MAX_TASK_FILES:
            raise TaskError("task-too-large", f"FAB holds more than {MAX_TASK_FILES} files")
        total = sum(i.file_size for i in infos)
        if total > MAX_TASK_BYTES:
            raise TaskError("task-too-large", f"FAB unpacks to more than {MAX_TASK_BYTES} B")
        files: dict[str, bytes] = {}
        for info in infos:
            name = info.filename
            if info.is_dir():
                continue
            if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                raise TaskError("task-invalid", f"FAB member {name!r} escapes the app folder")
            if name in files:
                raise TaskError("task-invalid", f"FAB member {name!r} appears twice")
            files[name] = archive.read(info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise TaskError("task-invalid", f"not a FAB (zip): {exc}") from None
    manifest = files.pop(FAB_MANIFEST, None)
    if manifest is None:
        raise TaskError("task-invalid", f"FAB has no {FAB_MANIFEST} manifest")
    listed: dict[str, str] = {}
    for line in manifest.decode("utf-8", "replace").splitlines():
        path, _, rest = line.partition(",")
        listed[path] = rest.partition(",")[0]
    actual = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
    if listed != actual:
        raise TaskError("task-invalid", "FAB files do not match its manifest (files added, "
                        "removed or changed after it was built)")
    return files


def _files_of(folder: Path) -> dict[str, bytes]:
    """The task's files: a Flower App's FAB files, else every regular file of the folder."""
    if is_flower_app(folder):
        _walk(folder)  # refuse symlinks and special files first, as for any task folder
        return fab_files(build_fab(folder))
    return _walk(folder)


def _folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.exists():
        raise TaskError("task-not-found", f"task folder {path} does not exist")
    if not path.is_dir():
        raise TaskError("task-not-found", f"{path} is not a folder")
    return path.resolve()


def _snapshot(folder: str | Path) -> _Snapshot:
    path = _folder(folder)
    files = _files_of(path)
    return _Snapshot(folder=path, files=files,
                     digest=hashlib.sha256(_listing(files)).hexdigest())


def fab_digest(fab: bytes) -> str:
    """The task digest of a FAB's bytes, before anything of it is unpacked or imported."""
    return hashlib.sha256(_listing(fab_files(fab))).hexdigest()


def task_digest(folder: str | Path) -> str:
    """Hex SHA-256 of the canonical listing of every regular file under ``folder``.

    Stable across machines (paths are relative and POSIX, sorted by their UTF-8 bytes; only
    file contents count, not modes or times). Raises :class:`TaskError` for a missing folder,
    a symbolic link (``task-symlink``) or special file inside it, an undecodable file name,
    or a folder over the size limits. Reads files only; imports nothing.
    """
    return _snapshot(folder).digest


digest_before_import = task_digest
"""The same function: a site computes the digest BEFORE importing anything from the folder."""


# --------------------------------------------------------------------------- import


class _SnapshotLoader(importlib.abc.Loader):
    def __init__(self, snapshot: _Snapshot, rel: str | None) -> None:
        self.snapshot = snapshot
        self.rel = rel  # None: a folder without __init__.py (an empty package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if self.rel is None:
            return
        source = self.snapshot.files[self.rel]
        filename = str(self.snapshot.folder / self.rel)
        code = compile(source, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> str | None:
        if self.rel is None:
            return None
        return self.snapshot.files[self.rel].decode("utf-8", errors="replace")


class _SnapshotFinder(importlib.abc.MetaPathFinder):
    """Serves ``<package>.<sub>`` (and, while loading, bare sibling names) from a snapshot."""

    def __init__(self, package: str, snapshot: _Snapshot) -> None:
        self.package = package
        self.snapshot = snapshot
        self.siblings: dict[str, types.ModuleType | None] = {}  # bare names served, and
        self.serve_siblings = False                              # what they shadowed

    def _locate(self, parts: list[str]) -> tuple[str | None, bool] | None:
        """(file to execute or None, is_package) for a path inside the snapshot."""
        base = "/".join(parts)
        if f"{base}/__init__.py" in self.snapshot.files:
            return f"{base}/__init__.py", True
        if f"{base}.py" in self.snapshot.files:
            return f"{base}.py", False
        if self.snapshot.is_dir(base):
            return None, True
        return None

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(self.package + "."):
            parts = fullname[len(self.package) + 1:].split(".")
        elif self.serve_siblings and "." not in fullname:
            parts = [fullname]
        elif self.serve_siblings and fullname.split(".")[0] in self.siblings:
            parts = fullname.split(".")
        else:
            return None
        found = self._locate(parts)
        if found is None:
            return None
        rel, is_package = found
        spec = importlib.machinery.ModuleSpec(fullname, _SnapshotLoader(self.snapshot, rel),
                                              origin=str(self.snapshot.folder / rel)
                                              if rel else None, is_package=is_package)
        if rel is not None:
            spec.has_location = True
        if is_package:
            spec.submodule_search_locations = [str(self.snapshot.folder / "/".join(parts))]
        if "." not in fullname and not fullname.startswith(self.package):
            self.siblings.setdefault(fullname, None)
        return spec


_LOCK = threading.RLock()
_LOADED: dict[str, Task] = {}


def _task_module(snapshot: _Snapshot) -> str:
    """Which module of the folder defines ``task``: ``[tool.cleanroom] task =
    "pkg.task"`` in a Flower App's pyproject.toml, else ``task.py`` at the top, else the one
    ``<package>/task.py`` (a Flower App's usual layout)."""
    import tomllib

    pyproject = snapshot.files.get("pyproject.toml")
    if pyproject is not None:
        try:
            named = tomllib.loads(pyproject.decode()).get("tool", {}).get("cleanroom", {})
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise TaskError("task-invalid", f"{snapshot.folder}/pyproject.toml: {exc}") from None
        module = named.get("task") if isinstance(named, dict) else None
        if module is not None:
            if not isinstance(module, str) or not all(p.isidentifier()
                                                      for p in module.split(".")):
                raise TaskError("task-invalid", "[tool.cleanroom] task must be a module path "
                                f"like 'pkg.task', got {module!r:.80}")
            return module
    if TASK_FILE in snapshot.files:
        return TASK_FILE.removesuffix(".py")
    nested = sorted(rel for rel in snapshot.files
                    if rel.endswith("/" + TASK_FILE) and rel.count("/") == 1)
    if len(nested) == 1:
        return nested[0].removesuffix(".py").replace("/", ".")
    raise TaskError("task-not-found", f"{snapshot.folder} has no {TASK_FILE} (at the top or in "
                    "its one package; or name it: [tool.cleanroom] task = 'pkg.task')")


def _import_task(snapshot: _Snapshot) -> tuple[Task, str]:
    package = MODULE_PREFIX + snapshot.digest[:16]
    if package in _LOADED:
        return _LOADED[package], package
    task_module = _task_module(snapshot)
    where = snapshot.folder / (task_module.replace(".", "/") + ".py")
    finder = _SnapshotFinder(package, snapshot)
    sys.meta_path.insert(0, finder)
    shadowed: dict[str, types.ModuleType] = {}
    # Bare names the folder provides (models.py, utils/...) are taken out of sys.modules while
    # task.py runs, so its `import models` gets its own, and put back afterwards.
    for rel in snapshot.files:
        top = rel.split("/")[0].removesuffix(".py")
        if top.isidentifier() and top in sys.modules:
            shadowed[top] = sys.modules.pop(top)
    try:
        try:
            root = importlib.util.module_from_spec(_root_spec(package, snapshot))
            sys.modules[package] = root
            root.__spec__.loader.exec_module(root)  # type: ignore[union-attr]
            finder.serve_siblings = True
            module = importlib.import_module(f"{package}.{task_module}")
        except TaskError:
            raise
        except Exception as exc:
            for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
                del sys.modules[name]
            raise TaskError("task-import", f"{where} failed to import: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        finder.serve_siblings = False
        for name in list(sys.modules):
            top = name.split(".")[0]
            if top in finder.siblings:
                module_obj = sys.modules.pop(name)
                sys.modules.setdefault(f"{package}.{name}", module_obj)
        sys.modules.update(shadowed)
        sys.meta_path.remove(finder)
        # Keep serving `<package>.<sub>` for lazy relative imports made later.
        sys.meta_path.append(_SnapshotFinder(package, snapshot))
    task = getattr(module, TASK_VARIABLE, None)
    if task is None:
        raise TaskError("task-invalid", f"{where} defines no module-level "
                        f"'{TASK_VARIABLE} = Task(...)'")
    if not isinstance(task, Task):
        raise TaskError("task-invalid", f"{where}: '{TASK_VARIABLE}' is a "
                        f"{type(task).__name__}, expected cleanroom.task.Task")
    _LOADED[package] = task
    return task, package


def _root_spec(package: str, snapshot: _Snapshot) -> importlib.machinery.ModuleSpec:
    rel = "__init__.py" if "__init__.py" in snapshot.files else None
    spec = importlib.machinery.ModuleSpec(package, _SnapshotLoader(snapshot, rel),
                                          origin=str(snapshot.folder / rel) if rel else None,
                                          is_package=True)
    spec.submodule_search_locations = [str(snapshot.folder)]
    spec.has_location = rel is not None
    return spec


def is_task_folder(folder: Path) -> bool:
    """A folder holding a task: ``task.py`` at the top, or a Flower App."""
    folder = Path(folder)
    return (folder / TASK_FILE).is_file() or is_flower_app(folder)


def app_root(folder: Path, levels: int = 3) -> Path:
    """The Flower App folder holding ``folder`` (the nearest parent with a pyproject.toml
    declaring ``[tool.flwr.app]``, up to ``levels`` up), else ``folder`` itself: a task that
    lives in an app's package is the app."""
    folder = Path(folder).resolve()
    for candidate in [folder, *folder.parents][:levels + 1]:
        if is_flower_app(candidate):
            return candidate
    return folder


def folder_of(task: Task) -> Path:
    """The task folder of a Task object: the Flower App (or folder) of the module that defines
    its model. TaskError if it cannot be told."""
    module = sys.modules.get(getattr(task.model, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    if not path:
        raise TaskError("task-not-found", f"cannot tell which folder task {task.name} comes "
                        "from: give its folder instead of the Task object")
    return app_root(Path(path).parent)


def installed_tasks() -> dict[str, str]:
    """Installed task names -> module of their folder (entry point group ``cleanroom.tasks``)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed_folder(name: str) -> Path:
    """The folder of installed task ``name`` (TaskError ``task-unknown``)."""
    installed = installed_tasks()
    if name not in installed:
        known = ", ".join(sorted(installed)) or "none"
        raise TaskError("task-unknown", f"unknown task {name!r}: not a folder and not an "
                        f"installed task (installed: {known})")
    module = installed[name]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise TaskError("task-unknown", f"installed task {name!r}: module {module} cannot be "
                        f"found: {exc}") from None
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("task-unknown", f"installed task {name!r}: {module} is not a package "
                        "folder")
    return Path(next(iter(spec.submodule_search_locations)))


def task_folder(spec: str | Path) -> Path:
    """The folder of task ``spec``: a :class:`~pathlib.Path`, or a string naming an existing
    folder, is that folder; any other string an installed task's name (TaskError
    ``task-unknown`` otherwise)."""
    if isinstance(spec, Path) or (isinstance(spec, str) and spec and Path(spec).is_dir()):
        return Path(spec)
    if isinstance(spec, str) and spec:
        return installed_folder(spec)
    raise TaskError("task-unknown", f"a task is a folder or an installed task name, got "
                    f"{spec!r:.80}")


def load_task(spec: str | Path, *, expect_digest: str | None = None) -> LoadedTask:
    """Load a task from a folder, or an installed task by name (e.g. ``heart-disease``).

    A :class:`~pathlib.Path`, or a string naming an existing folder, is a folder; any other
    string is looked up in the ``cleanroom.tasks`` entry points. The folder is read once, its
    digest computed over those bytes, and ``task.py`` imported from them (see the module
    docstring). The model is built once to derive its architecture digest.

    Raises :class:`TaskError`: ``task-unknown`` (no such installed task), ``task-not-found``
    (no folder, no task.py), ``task-import`` (task.py raised), ``task-invalid`` (no ``task``,
    or not a :class:`Task`), ``task-model`` (the factory fails or returns no module),
    ``task-symlink`` and the other digest errors; with ``expect_digest``, ``task-not-approved``
    when the folder's digest differs, raised BEFORE anything of the folder is imported.
    """
    folder = task_folder(spec)
    with _LOCK:
        snapshot = _snapshot(folder)
        if expect_digest is not None and snapshot.digest != expect_digest:
            raise TaskError("task-not-approved", f"task folder {folder} has digest "
                            f"{snapshot.digest[:16]}..., expected {expect_digest[:16]}...: "
                            "nothing of it was loaded")
        task, module = _import_task(snapshot)
    model = build_task_model(task)
    return LoadedTask(task=task, digest=snapshot.digest, folder=snapshot.folder,
                      architecture_digest=architecture_digest(model), module=module,
                      n_params=sum(p.numel() for p in model.parameters()))


def build_task_model(task: Task) -> torch.nn.Module:
    """A fresh model from the task's factory; :class:`TaskError` ``task-model`` if the factory
    raises or returns something that is not a ``torch.nn.Module``."""
    from torch import nn

    try:
        model = task.model()
    except Exception as exc:
        raise TaskError("task-model", f"task {task.name}: model() raised "
                        f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TaskError("task-model", f"task {task.name}: model() returned a "
                        f"{type(model).__name__}, expected a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- architecture


def _describe(model: torch.nn.Module) -> dict[str, object]:
    modules = [{"path": path, "class": type(m).__qualname__, "config": m.extra_repr()}
               for path, m in model.named_modules()]
    params = [{"name": name, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
               "requires_grad": bool(p.requires_grad)}
              for name, p in model.named_parameters()]
    buffers = [{"name": name, "shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch.")}
               for name, b in model.named_buffers()]
    return {"schema": ARCHITECTURE_SCHEMA, "modules": modules, "parameters": params,
            "buffers": buffers}


def architecture_digest(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a canonical JSON description of ``model``'s architecture.

    Covers the module tree (paths, class names, ``extra_repr``), every parameter's name, shape,
    dtype and ``requires_grad``, and every buffer's name, shape and dtype; not the weights, so
    it does not depend on the seed, the process or the machine.
    """
    canonical = json.dumps(_describe(model), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
