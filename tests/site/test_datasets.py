"""The site data room: registration, the identifier scan, minimised serving and refusals."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanroom.cli import main
from cleanroom.errors import DatasetError
from cleanroom.site_agent.datasets import DATASETS_FILE, DataRoom, frames_to_task_data, scan_column
from cleanroom.task import Field, Task

N = 40
SECRET_NAME = "Zebediah Quuxworth"  # a distinctive value that must never leave the data file


def _clinical(n: int = N, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    first = ["Anna", "Jean", "Maria", "Pierre", "Sofia", "Lukas", "Emma", "Noah"]
    last = ["Martin", "Bernard", "Dubois", "Moreau", "Laurent", "Simon", "Michel", "Garcia"]
    return pd.DataFrame({
        "patient_name": [SECRET_NAME] + [f"{first[i % 8]} {last[(i // 8 + i) % 8]}"
                                         for i in range(1, n)],
        "MRN": [f"H{100000 + i}" for i in range(n)],
        "DOB": [f"19{50 + i % 40}-0{1 + i % 9}-1{i % 10}" for i in range(n)],
        "phone": [f"+33 6 12 {10 + i:02d} {20 + i:02d} 11" for i in range(n)],
        "home address": [f"{i + 1} Rue de la Paix" for i in range(n)],
        "contact": [f"p{i}@example.org" for i in range(n)],
        "ref": [f"{i:03d}-{i % 90 + 10:02d}-{1000 + i:04d}" for i in range(n)],
        "notes": ["patient reports mild chest pain after exercise, follow up in two weeks"] * n,
        "age": rng.integers(30, 80, n),
        "sex": rng.integers(0, 2, n),
        "chol": rng.normal(220, 30, n).round(1),
        "smoker": rng.choice(["yes", "no"], n),
        "outcome": rng.integers(0, 2, n),
        "fold": ["train"] * (n * 3 // 4) + ["test"] * (n - n * 3 // 4),
    })


KEY = secrets.token_bytes(32)


@pytest.fixture
def room(tmp_path: Path) -> DataRoom:
    return DataRoom(tmp_path / "state", KEY)


@pytest.fixture
def csv(tmp_path: Path) -> Path:
    path = tmp_path / "export" / "clinical.csv"
    path.parent.mkdir()
    _clinical().to_csv(path, index=False)
    return path


def _task(*features: str | Field, target: str = "outcome", **kw: object) -> Task:
    from torch import nn

    return Task(name="t", features=tuple(f if isinstance(f, Field) else Field(f)
                                         for f in features),
                targets=(Field(target, "bool"),), model=lambda: nn.Linear(len(features), 1),
                loss=lambda o, t: (o - t) ** 2, dataset="clinical", **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the scan


def test_direct_identifiers_are_flagged_by_name_and_by_value(room: DataRoom, csv: Path) -> None:
    record = room.add("clinical", csv, split_column="fold")
    flags = {c.name: c.flags for c in record.columns}
    assert set(record.identifying) == {"patient_name", "MRN", "DOB", "phone", "home address",
                                       "contact", "ref", "notes"}
    assert "name:name" in flags["patient_name"]
    assert any(f.startswith("value:person-name") for f in flags["patient_name"])
    assert "name:record-number" in flags["MRN"] and any("unique-id" in f for f in flags["MRN"])
    assert "name:date-of-birth" in flags["DOB"] and any("date" in f for f in flags["DOB"])
    assert "name:phone" in flags["phone"] and any("phone" in f for f in flags["phone"][1:])
    assert "name:address" in flags["home address"]
    assert any(f.startswith("value:address") for f in flags["home address"])
    assert flags["contact"][0] == "value:email(100%)"  # found from the values alone
    assert any(f.startswith("value:ssn") for f in flags["ref"])
    assert "name:free-text" in flags["notes"] and "value:free-text" in flags["notes"]
    for clean in ("age", "sex", "chol", "smoker", "outcome", "fold"):
        assert flags[clean] == (), clean
    assert (record.train_rows, record.test_rows) == (30, 10)
    assert {c.name: c.dtype for c in record.columns}["age"] == "int"
    assert {c.name: c.dtype for c in record.columns}["chol"] == "float"
    assert SECRET_NAME not in repr(record.to_json())  # flags never quote a value


@pytest.mark.parametrize(("name", "values", "flag"), [
    ("x", [f"{100 + i}-{20 + i}-{3000 + i}" for i in range(20)], "value:ssn"),
    ("x", [f"(0{i % 9 + 1}) 555 {1000 + i}" for i in range(20)], "value:phone"),
    ("x", [f"{i % 28 + 1}/0{i % 9 + 1}/1987" for i in range(20)], "value:date"),
    ("x", pd.Series(range(900_000, 900_020)), "value:unique-number"),
    ("surname", ["a"] * 20, "name:name"),
    ("NHS number", [1] * 20, "name:national-id"),
    ("e-mail", [""] * 20, "name:email"),
])
def test_scan_rules(name: str, values: object, flag: str) -> None:
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    assert any(f.startswith(flag) for f in scan_column(name, series))


def test_clinical_values_are_not_flagged() -> None:
    rng = np.random.default_rng(0)
    for series in (pd.Series(rng.normal(size=50)), pd.Series(rng.integers(0, 5, 50)),
                   pd.Series(["I", "II", "III"] * 10), pd.Series(range(50))):
        assert scan_column("value", series) == ()


# --------------------------------------------------------------------------- serving


def test_a_task_gets_only_its_fields(room: DataRoom, csv: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    room.add("clinical", csv, split_column="fold")
    read: list[object] = []
    real = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda *a, **kw: read.append(kw.get("usecols"))
                        or real(*a, **kw))
    data = room.serve(_task("age", "chol", Field("smoker", "bool")))
    assert read == [["age", "chol", "smoker", "outcome", "fold"]]  # nothing else is read
    assert data.features == ("age", "chol", "smoker") and data.targets == ("outcome",)
    assert data.train_x.shape == (30, 3) and data.test_x.shape == (10, 3)
    assert data.train_x.dtype == np.float32 and data.train_y.shape == (30,)
    frame = _clinical()
    np.testing.assert_array_equal(data.train_x[:, 0], frame["age"][:30].to_numpy(np.float32))
    assert set(np.unique(data.train_x[:, 2])) <= {0.0, 1.0}  # yes/no as bool... as float
    assert data.digest == room.get("clinical").digest and data.dataset == "clinical"


def test_a_task_asking_for_an_identifying_field_is_refused(room: DataRoom, csv: Path) -> None:
    room.add("clinical", csv, split_column="fold")
    with pytest.raises(DatasetError, match=r"'DOB'.*is identifying") as info:
        room.serve(_task("age", "DOB"))
    assert info.value.code == "field-identifying"
    with pytest.raises(DatasetError, match=r"'MRN'.*identifying.*'patient_name'.*identifying"):
        room.serve(_task("MRN", "patient_name"))
    room.mark("clinical", "chol", identifying=True)  # the operator's word, both ways
    with pytest.raises(DatasetError, match=r"'chol'.*marked by operator"):
        room.serve(_task("age", "chol"))
    room.mark("clinical", "notes", identifying=False)
    assert room.get("clinical").column("notes").marked_by == "operator"  # type: ignore[union-attr]
    with pytest.raises(DatasetError, match="'notes' is not numeric") as info:
        room.serve(_task("notes"))
    assert info.value.code == "field-type"


@pytest.mark.parametrize(("task", "code", "needle"), [
    (lambda: _task("age", "weight"), "field-missing", "no column 'weight'"),
    (lambda: _task("age", target="fold"), "field-type", "'fold' is not boolean"),
    (lambda: Task(name="t", features=(Field("chol", "int"),), targets=(Field("outcome"),),
                  model=lambda: None, loss=lambda o, t: o, dataset="clinical"),
     "field-type", "'chol' is declared int"),
    (lambda: Task(name="t", features=(Field("age", "bool"),), targets=(Field("outcome"),),
                  model=lambda: None, loss=lambda o, t: o, dataset="clinical"),
     "field-type", "'age' is declared bool"),
])
def test_missing_and_mistyped_fields_are_refused(room: DataRoom, csv: Path, task: object,
                                                 code: str, needle: str) -> None:
    room.add("clinical", csv, split_column="fold")
    with pytest.raises(DatasetError, match=needle) as info:
        room.serve(task())  # type: ignore[operator]
    assert info.value.code == code


def test_missing_values_are_refused(room: DataRoom, tmp_path: Path) -> None:
    frame = _clinical()
    frame.loc[3, "chol"] = np.nan
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    room.add("clinical", tmp_path / "gaps.csv")
    assert room.get("clinical").column("chol").missing == 1  # type: ignore[union-attr]
    with pytest.raises(DatasetError, match="1 missing values") as info:
        room.serve(_task("chol"))
    assert info.value.code == "field-type"


def test_a_modified_or_vanished_file_is_refused(room: DataRoom, csv: Path) -> None:
    room.add("clinical", csv, split_column="fold")
    room.serve(_task("age"))
    original = csv.read_bytes()
    csv.write_bytes(original.replace(b",train", b",test", 1))
    with pytest.raises(DatasetError, match="changed since it was registered") as info:
        room.serve(_task("age"))
    assert info.value.code == "dataset-changed"
    csv.unlink()
    with pytest.raises(DatasetError, match="file not found") as info:
        room.serve(_task("age"))
    assert info.value.code == "dataset-changed"
    csv.write_bytes(original)
    assert room.serve(_task("age")).n_train == 30


def test_test_file_parquet_and_no_split(room: DataRoom, tmp_path: Path) -> None:
    frame = _clinical().drop(columns=["fold"])
    frame[:30].to_parquet(tmp_path / "train.parquet")
    frame[30:].to_parquet(tmp_path / "test.parquet")
    record = room.add("clinical", tmp_path / "train.parquet",
                      test_file=tmp_path / "test.parquet")
    assert [f.role for f in record.files] == ["train", "test"]
    data = room.serve(_task("age", "sex"))
    assert (data.n_train, data.n_test) == (30, 10)
    frame.to_csv(tmp_path / "all.csv", index=False)
    room.add("clinical", tmp_path / "all.csv", replace_existing=True)
    data = room.serve(_task("age", "sex"))
    assert (data.n_train, data.n_test) == (40, 0)


@pytest.mark.parametrize(("setup", "code", "needle"), [
    (lambda p: (p / "x.txt", {}), "dataset-unreadable", "CSV"),
    (lambda p: (p / "nope.csv", {}), "dataset-unreadable", "not found"),
    (lambda p: (p, {}), "dataset-unreadable", "folder"),
    (lambda p: (p / "c.csv", {"split_column": "weight"}), "column-unknown", "no split column"),
    (lambda p: (p / "c.csv", {"split_column": "sex"}), "dataset-invalid", "only 'train'"),
    (lambda p: (p / "c.csv", {"split_column": "fold", "test_file": p / "c.csv"}),
     "dataset-invalid", "not both"),
    (lambda p: (p / "c.csv", {"test_file": p / "other.csv"}), "dataset-invalid",
     "different columns"),
    (lambda p: (p / "bad.parquet", {}), "dataset-unreadable", "PARQUET"),
    (lambda p: (p / "empty.csv", {}), "dataset-unreadable", "CSV"),
])
def test_bad_registrations_are_refused(room: DataRoom, tmp_path: Path, setup: object,
                                       code: str, needle: str) -> None:
    _clinical().to_csv(tmp_path / "c.csv", index=False)
    _clinical().drop(columns=["notes"]).to_csv(tmp_path / "other.csv", index=False)
    (tmp_path / "x.txt").write_text("a,b\n1,2\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "empty.csv").write_bytes(b"")
    path, kw = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(DatasetError, match=needle) as info:
        room.add("clinical", path, **kw)
    assert info.value.code == code


def test_names_and_duplicates(room: DataRoom, csv: Path) -> None:
    with pytest.raises(DatasetError, match="dataset name"):
        room.add("Bad Name", csv)
    room.add("clinical", csv)
    with pytest.raises(DatasetError, match="already registered") as info:
        room.add("clinical", csv)
    assert info.value.code == "dataset-exists"
    with pytest.raises(DatasetError, match="no dataset 'other'") as info:
        room.serve(_task("age"), "other")
    assert info.value.code == "dataset-unknown"
    with pytest.raises(DatasetError, match="no column 'zzz'"):
        room.mark("clinical", "zzz", identifying=True)


def test_the_registry_is_sealed_and_persistent(room: DataRoom, csv: Path, tmp_path: Path) -> None:
    room.add("clinical", csv, split_column="fold")
    room.mark("clinical", "notes", identifying=False)
    raw = (tmp_path / "state" / DATASETS_FILE).read_bytes()
    assert b"clinical" not in raw and b"MRN" not in raw  # sealed: even names are ciphertext
    again = DataRoom(tmp_path / "state", KEY)
    assert again.datasets() == room.datasets()
    with pytest.raises(Exception, match="does not open"):
        DataRoom(tmp_path / "state", secrets.token_bytes(32)).datasets()


def test_simulated_registration_writes_inside_the_state_folder(room: DataRoom,
                                                               tmp_path: Path) -> None:
    from cleanroom.task import load_task

    heart = load_task("heart-disease")
    record = room.register_simulated(heart.task, 2, 4)
    folder = tmp_path / "state" / "datasets" / "heart-disease"
    assert [Path(f.path) for f in record.files] == [folder / "train.csv", folder / "test.csv"]
    for f in record.files:
        assert os.stat(f.path).st_mode & 0o777 == 0o600
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert record.identifying == ()
    served = room.serve(heart.task)
    direct = frames_to_task_data(heart.task, *heart.task.simulate(2, 4))  # type: ignore[misc]
    np.testing.assert_array_equal(served.train_x, direct.train_x)
    np.testing.assert_array_equal(served.test_y, direct.test_y)
    n_records = len(room.journal.records())
    assert room.register_simulated(heart.task, 2, 4) == record  # idempotent
    assert len(room.journal.records()) == n_records


def test_another_writer_is_seen_and_a_torn_simulated_file_rewritten(room: DataRoom,
                                                                     tmp_path: Path) -> None:
    """The registry is parsed incrementally, yet sees what another process appended; a
    simulated file lost or torn in a crash (it is not fsync'd) is written again at the next
    start, and serving the torn one before that is refused."""
    from cleanroom.task import load_task

    heart = load_task("heart-disease")
    record = room.register_simulated(heart.task, 1, 4)
    assert room.get("heart-disease") == record
    other = DataRoom(tmp_path / "state", KEY)  # another process's view of the same room
    column = record.columns[0].name
    other.mark("heart-disease", column, identifying=True, by="dpo")
    assert room.get("heart-disease").column(column).identifying  # type: ignore[union-attr]
    other.mark("heart-disease", column, identifying=False, by="dpo")
    assert not room.get("heart-disease").column(column).identifying  # type: ignore[union-attr]
    path = Path(record.files[0].path)
    path.write_bytes(path.read_bytes()[:-40])  # torn by a crash
    with pytest.raises(DatasetError, match="changed since it was registered"):
        room.serve(heart.task)
    again = DataRoom(tmp_path / "state", KEY).register_simulated(heart.task, 1, 4)
    assert again.digest == record.digest and Path(again.files[0].path).read_bytes()


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def site_toml(tmp_path: Path, sim_root_dir: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f'site = "cleveland"\nstate_dir = "state"\n'
                    f'[enclave]\nsimulated_root = "{sim_root_dir}"\n')
    return path


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_cli_and_no_row_outside_the_state_folder(tmp_path: Path, site_toml: Path, csv: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    before = _files(tmp_path)
    config = ["--config", str(site_toml)]
    assert main(["site", "dataset", "add", "clinical", str(csv), "--split-column", "fold",
                 *config]) == 0
    out = capsys.readouterr().out
    assert "30 train / 10 test rows" in out and "identifying (never served to a task):" in out
    assert "MRN" in out and "IDENTIFYING" in out
    assert main(["site", "dataset", "mark", "clinical", "notes", "--not-identifying",
                 *config]) == 0
    assert main(["site", "dataset", "list", *config]) == 0
    assert main(["site", "dataset", "show", "clinical", *config]) == 0
    out = capsys.readouterr().out
    assert "clinical" in out and '"marked_by": "cli"' in out
    assert main(["site", "dataset", "show", "nope", *config]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "dataset-unknown" in err
    assert main(["site", "dataset", "add", "clinical", str(csv), *config]) == 2
    assert "dataset-exists" in capsys.readouterr().err
    # serve a task through the runtime the daemon uses
    from cleanroom.site_agent.config import load_site_config
    from cleanroom.site_agent.runtime import build_runtime

    runtime = build_runtime(load_site_config(site_toml))
    assert runtime.datasets.serve(_task("age", "chol")).n_train == 30
    after = _files(tmp_path)
    state = tmp_path / "state"
    new = [p for p in after if p not in before and state not in p.parents]
    assert new == [], f"written outside the state folder: {new}"
    assert all(after[p] == before[p] for p in before)  # the export is never touched
    secret = SECRET_NAME.encode()
    for path, content in after.items():
        if path != csv:
            assert secret not in content and b"H100000" not in content, path
    assert SECRET_NAME not in caplog.text and "H100000" not in caplog.text
    assert SECRET_NAME not in out + err
