"""Tasks: definition checks, the folder digest, loading without clashes, architecture digests."""

from __future__ import annotations

import hashlib
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cleanroom.errors import CleanroomError, SiteRefusal, TaskError
from cleanroom.task import (
    DIGEST_HEADER,
    Field,
    LoadedTask,
    Task,
    architecture_digest,
    digest_before_import,
    load_task,
    task_digest,
)
from tests.task.helpers import write_task


def _ok(**kw: object) -> Task:
    from torch import nn

    base: dict[str, object] = dict(
        name="t", features=(Field("a"),), targets=(Field("y"),), model=lambda: nn.Linear(1, 1),
        loss=lambda o, t: (o.squeeze(-1) - t) ** 2, metrics={"mse": lambda o, t: 0.0})
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- definition


def test_a_valid_task_has_fields_and_a_frozen_metric_map() -> None:
    task = _ok(features=[Field("a"), Field("b", "int")], dataset="brca")
    assert task.features == (Field("a"), Field("b", "int"))  # list coerced to a tuple
    assert [f.name for f in task.fields] == ["a", "b", "y"]
    assert task.dataset_name == "brca" and _ok().dataset_name == "t"
    with pytest.raises(TypeError):
        task.metrics["x"] = lambda o, t: 1.0  # type: ignore[index]


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(name="Bad Name"), "task name"),
    (dict(name=""), "task name"),
    (dict(name="x" * 65), "task name"),
    (dict(features=()), "features must not be empty"),
    (dict(targets=[]), "targets must not be empty"),
    (dict(features="a"), "sequence of Field"),
    (dict(features=("a",)), "expected Field"),
    (dict(features=(Field("a"), Field("a"))), "declared twice"),
    (dict(targets=(Field("a"),)), "declared twice"),
    (dict(model=3), "model must be callable"),
    (dict(loss=None), "loss must be callable"),
    (dict(metrics={"Accuracy": lambda o, t: 0.0}), "metric name"),
    (dict(metrics={"loss": lambda o, t: 0.0}), "reserved"),
    (dict(metrics={"acc": 1.0}), "metric 'acc' must be callable"),
    (dict(metrics=[("acc", 1.0)]), "metrics must be a mapping"),
    (dict(dataset="Not OK"), "dataset must match"),
    (dict(simulate=5), "simulate must be callable"),
    (dict(description=5), "description"),
])
def test_a_bad_task_is_refused_with_the_field_named(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(TaskError, match=needle) as info:
        _ok(**kw)
    assert info.value.code == "task-invalid"
    assert isinstance(info.value, ValueError) and isinstance(info.value, SiteRefusal)


@pytest.mark.parametrize(("args", "needle"), [(("",), "non-empty"), (("a", "str"), "dtype"),
                                              (("a\nb",), "control"), ((3,), "non-empty")])
def test_a_bad_field_is_refused(args: tuple[object, ...], needle: str) -> None:
    with pytest.raises(TaskError, match=needle):
        Field(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("knob", ["noise_multiplier", "max_grad_norm", "sample_rate", "steps",
                                  "lr", "optimizer", "batch_size"])
def test_a_task_cannot_carry_dp_or_optimisation_settings(knob: str) -> None:
    with pytest.raises(TypeError, match=knob):
        _ok(**{knob: 0})


# --------------------------------------------------------------------------- digest


def _independent_digest(folder: Path) -> str:
    """The documented format, recomputed without the module's code."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and "__pycache__" not in p.parts and ".git" not in p.parts
                   and p.suffix not in (".pyc", ".pyo") and p.name != ".DS_Store")
    rels = sorted((p.relative_to(folder).as_posix(), p) for p in files)
    text = DIGEST_HEADER + "\n" + "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel}\n" for rel, p in rels)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_task(tmp_path / "task", extra={"models.py": "X = 1\n",
                                                "sub/helper.py": "Y = 2\n",
                                                "data/ä b.csv": "a,b\n1,2\n"})


def test_digest_is_the_documented_listing_and_stable_across_places(folder: Path,
                                                                   tmp_path: Path) -> None:
    digest = task_digest(folder)
    assert digest == _independent_digest(folder)
    assert digest_before_import is task_digest
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, moved)
    os.utime(moved / "task.py", (0, 0))
    (moved / "models.py").chmod(0o600)
    assert task_digest(moved) == digest  # place, times and modes do not count


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs sha256sum")
def test_digest_matches_the_shell_recipe_in_the_docs(folder: Path) -> None:
    recipe = (f"cd '{folder}' && {{ printf '%s\\n' '{DIGEST_HEADER}'; "
              "find . -type d \\( -name __pycache__ -o -name .git -o -name .hg -o -name .svn "
              "-o -name .bzr \\) -prune -o -type f ! -name '*.pyc' ! -name '*.pyo' "
              "! -name .DS_Store ! -name .git -printf '%P\\0' | LC_ALL=C sort -z "
              "| xargs -0 sha256sum; } | sha256sum")
    out = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == task_digest(folder)


def test_digest_changes_on_any_byte_and_on_renames(folder: Path) -> None:
    digest = task_digest(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        original = path.read_bytes()
        for i in range(len(original)):
            changed = bytearray(original)
            changed[i] ^= 0x01
            path.write_bytes(bytes(changed))
            assert task_digest(folder) != digest, f"{path.name} byte {i}"
        path.write_bytes(original + b"\n")
        assert task_digest(folder) != digest
        path.write_bytes(original)
    assert task_digest(folder) == digest
    (folder / "models.py").rename(folder / "models2.py")
    assert task_digest(folder) != digest
    (folder / "models2.py").rename(folder / "models.py")
    (folder / "empty.txt").write_bytes(b"")
    assert task_digest(folder) != digest


def test_excluded_files_do_not_change_the_digest(folder: Path) -> None:
    digest = task_digest(folder)
    for rel in ("__pycache__/task.cpython-311.pyc", "sub/__pycache__/x.pyc", "stale.pyc",
                "old.pyo", ".DS_Store", "sub/.DS_Store", ".git/HEAD", ".hg/store",
                ".svn/entries"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"anything")
    (folder / "emptydir").mkdir()
    assert task_digest(folder) == digest


@pytest.mark.parametrize("kind", ["file", "dir", "dangling", "root-entry"])
def test_a_symlink_anywhere_is_refused(folder: Path, tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text("SECRET = 1\n")
    if kind == "file":
        (folder / "sub" / "link.py").symlink_to(outside)
    elif kind == "dir":
        (folder / "linkdir").symlink_to(tmp_path)
    elif kind == "dangling":
        (folder / "gone.py").symlink_to(tmp_path / "missing")
    else:
        (folder / "task2.py").symlink_to(folder / "task.py")
    with pytest.raises(TaskError, match="symbolic link") as info:
        task_digest(folder)
    assert info.value.code == "task-symlink"
    with pytest.raises(TaskError, match="symbolic link"):
        load_task(folder)


def test_a_fifo_and_bad_names_are_refused(folder: Path) -> None:
    os.mkfifo(folder / "pipe")
    with pytest.raises(TaskError, match="not a regular file"):
        task_digest(folder)
    (folder / "pipe").unlink()
    (folder / "a\nb.py").write_text("")
    with pytest.raises(TaskError, match="line break"):
        task_digest(folder)


def test_a_missing_folder_or_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist") as info:
        task_digest(tmp_path / "nope")
    assert info.value.code == "task-not-found"
    (tmp_path / "f").write_text("x")
    with pytest.raises(TaskError, match="not a folder"):
        task_digest(tmp_path / "f")


def test_size_limits(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cleanroom.task as mod

    monkeypatch.setattr(mod, "MAX_TASK_FILES", 2)
    with pytest.raises(TaskError, match="files") as info:
        task_digest(folder)
    assert info.value.code == "task-too-large"
    monkeypatch.setattr(mod, "MAX_TASK_FILES", 100)
    monkeypatch.setattr(mod, "MAX_TASK_BYTES", 100)
    with pytest.raises(TaskError, match="bytes"):
        task_digest(folder)


# --------------------------------------------------------------------------- loading


def test_load_a_folder(folder: Path) -> None:
    loaded = load_task(folder)
    assert isinstance(loaded, LoadedTask)
    assert loaded.digest == task_digest(folder) and loaded.folder == folder.resolve()
    assert loaded.name == "tiny" and (loaded.n_features, loaded.n_targets) == (2, 1)
    assert loaded.module == "cleanroom_task_" + loaded.digest[:16]
    assert loaded.architecture_digest == architecture_digest(loaded.task.model())
    assert load_task(str(folder)).task is loaded.task  # same bytes: loaded once


SIBLING = '''
import models
from .helpers import scale
from cleanroom.task import Field, Task

task = Task(name="{name}", features=(Field("a"),), targets=(Field("y"),),
            model=lambda: models.build(scale()), loss=lambda o, t: (o.squeeze(-1) - t) ** 2)
'''


def _sibling_task(folder: Path, name: str, width: int) -> Path:
    return write_task(folder, SIBLING.format(name=name), extra={
        "models.py": f"from torch import nn\n\ndef build(s):\n    return nn.Linear(1, {width})\n",
        "helpers.py": "def scale():\n    return 1\n"})


def test_two_tasks_with_their_own_models_py_do_not_clash(tmp_path: Path) -> None:
    sentinel = type(sys)("models")
    sys.modules["models"] = sentinel  # e.g. the user's own models.py, imported earlier
    try:
        one = load_task(_sibling_task(tmp_path / "one", "one", 1))
        two = load_task(_sibling_task(tmp_path / "two", "two", 3))
        assert sys.modules["models"] is sentinel  # put back untouched
    finally:
        del sys.modules["models"]
    assert one.task.model().out_features == 1
    assert two.task.model().out_features == 3
    assert "models" not in sys.modules and "helpers" not in sys.modules
    assert one.architecture_digest != two.architecture_digest
    assert f"{one.module}.models" in sys.modules and f"{two.module}.models" in sys.modules


def test_a_stale_pyc_is_never_run_in_place_of_the_source(tmp_path: Path) -> None:
    """Python would run __pycache__/task.*.pyc whose header matches task.py's mtime and size;
    the digest excludes it, so the loader must compile the digested source instead."""
    folder = tmp_path / "t"
    evil = "from tests.task.helpers import TINY_TASK as T\nexec(T.format(name='evil'))\n"
    good = "from tests.task.helpers import TINY_TASK as T\nexec(T.format(name='good'))\n"
    assert len(evil) == len(good)
    write_task(folder, evil)
    cache = importlib_cache(folder / "task.py")
    py_compile.compile(str(folder / "task.py"), cfile=str(cache),
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    st = (folder / "task.py").stat()
    (folder / "task.py").write_text(good)
    os.utime(folder / "task.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_task(folder).name == "good"


def importlib_cache(source: Path) -> Path:
    import importlib.util

    return Path(importlib.util.cache_from_source(str(source)))


@pytest.mark.parametrize(("files", "code", "needle"), [
    ({"other.py": "x = 1\n"}, "task-not-found", "has no task.py"),
    ({"task.py": "x = 1\n"}, "task-invalid", "defines no module-level"),
    ({"task.py": "task = 42\n"}, "task-invalid", "is a int"),
    ({"task.py": "raise RuntimeError('boom')\n"}, "task-import", "RuntimeError: boom"),
    ({"task.py": "def broken(:\n"}, "task-import", "SyntaxError"),
    ({"task.py": "from .missing import x\n"}, "task-import", "ModuleNotFoundError"),
    ({"task.py": "from cleanroom.task import Task, Field\n"
                 "task = Task(name='t', features=(Field('a'),), targets=(Field('y'),),\n"
                 "            model=lambda: 'not a module', loss=lambda o, t: o)\n"},
     "task-model", "expected a torch.nn.Module"),
    ({"task.py": "from cleanroom.task import Task, Field\n"
                 "def boom():\n    raise ValueError('no')\n"
                 "task = Task(name='t', features=(Field('a'),), targets=(Field('y'),),\n"
                 "            model=boom, loss=lambda o, t: o)\n"},
     "task-model", "model\\(\\) raised ValueError"),
    ({"task.py": "from cleanroom.task import Task, Field\n"
                 "task = Task(name='T!', features=(Field('a'),), targets=(Field('y'),),\n"
                 "            model=lambda: 1, loss=lambda o, t: o)\n"},
     "task-invalid", "task name"),
])
def test_bad_task_folders_get_typed_errors(tmp_path: Path, files: dict[str, str], code: str,
                                           needle: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for rel, text in files.items():
        (folder / rel).write_text(text)
    with pytest.raises(TaskError, match=needle) as info:
        load_task(folder)
    assert info.value.code == code


@pytest.mark.parametrize("spec", ["no-such-task", "", "Not A Name"])
def test_unknown_task_names_are_refused(spec: str) -> None:
    with pytest.raises(TaskError, match="task") as info:
        load_task(spec)
    assert info.value.code == "task-unknown"
    assert isinstance(info.value, CleanroomError)


def test_the_module_imports_without_torch() -> None:
    code = ("import sys; import cleanroom.task; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- architecture


def test_architecture_digest_is_structure_not_weights() -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    torch.manual_seed(1)
    b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    assert architecture_digest(a) == architecture_digest(b)
    for other in (nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)),
                  nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
                  nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1)),
                  nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()):
        assert architecture_digest(other) != architecture_digest(a)
    frozen = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    frozen[0].weight.requires_grad_(False)
    assert architecture_digest(frozen) != architecture_digest(a)
    assert len(architecture_digest(a)) == 64


def test_the_builtin_task_is_installed_by_name() -> None:
    from cleanroom.task import installed_tasks

    assert installed_tasks()["heart-disease"] == "cleanroom.models.heart_disease"
    loaded = load_task("heart-disease")
    assert loaded.digest == task_digest(loaded.folder)
    assert loaded.task.name == "heart-disease" and loaded.task.simulate is not None
    assert loaded.module.startswith("cleanroom_task_")
