"""The site's data room: registered datasets, identifier scan, and minimised serving to tasks.

A hospital registers each dataset once (``cleanroom site dataset add NAME FILE``): a CSV or
Parquet file, optionally a separate test file or a column that splits train and test rows. The
room records, in the site's sealed store (a :class:`SealedJournal`), the name, the absolute
path and SHA-256 of each file, row counts, the inferred schema (column names and types) and
the identifier scan's flags. It never stores, logs or prints a row.

The **identifier scan** flags columns that look like direct identifiers, from their names
(name, MRN/patient id, date of birth, address, phone, e-mail, SSN-like numbers, free-text
notes) and from their values (e-mail, phone, SSN, date, street-address and person-name shapes,
unique record numbers, long free text). A flagged column is ``identifying``; the operator may
overrule the scan either way (``dataset mark NAME COL --identifying/--not-identifying``).

**Serving a task** (:meth:`DataRoom.serve`) re-reads each file, refuses it if its SHA-256
changed since registration (``dataset-changed``), refuses a task that asks for a column the
site marked identifying (``field-identifying``), that the dataset lacks (``field-missing``) or
that does not convert to the declared type (``field-type``), and reads ONLY the declared
columns (plus the site's own split column) into :class:`TaskData`. Its ``digest`` is the
dataset digest for the round receipt: the SHA-256 of ``cleanroom-fl/dataset-digest/v1`` and
one ``<role> <sha256>`` line per file.

Simulated sites register the frames of ``task.simulate(partition, partitions)`` as CSV files
written inside the site's state folder (mode 0600): :meth:`DataRoom.register_simulated`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cleanroom.errors import DatasetError, TaskError
from cleanroom.task import NAME_PATTERN, Field, Task

if TYPE_CHECKING:
    import pandas

    from cleanroom.site_agent.sealed import SealedJournal

log = logging.getLogger(__name__)

DATASETS_FILE = "datasets.jsonl"
SIMULATED_DIR = "datasets"
DATASET_DIGEST_HEADER = "cleanroom-fl/dataset-digest/v1"
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_DATASET_BYTES = 1 << 30
SCAN_SAMPLE = 5000
"""Values per column the value scan looks at (the first ones)."""


@dataclass(frozen=True)
class TaskData:
    """Exactly the fields one task declared, as float32 arrays (nothing else is read).

    ``train_x``/``test_x`` are ``(n, len(task.features))``; ``train_y``/``test_y`` are ``(n,)``
    for one target, ``(n, k)`` otherwise. ``digest`` is the registered dataset's digest (for
    the round receipt); ``dataset`` its name.
    """

    dataset: str
    digest: str
    features: tuple[str, ...]
    targets: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        d, k = len(self.features), len(self.targets)
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                raise DatasetError("dataset-invalid", f"{split} arrays must be numpy arrays")
            if x.dtype != np.float32 or y.dtype != np.float32:
                raise DatasetError("dataset-invalid", f"{split} arrays must be float32")
            want_y = (x.shape[0],) if k == 1 else (x.shape[0], k)
            if x.ndim != 2 or x.shape[1] != d or y.shape != want_y:
                raise DatasetError("dataset-invalid", f"{split}: x must be (n, {d}) and y "
                                   f"{'(n,)' if k == 1 else f'(n, {k})'}, got {x.shape} and "
                                   f"{y.shape}")

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def n_features(self) -> int:
        return len(self.features)


def column_values(frame: pandas.DataFrame, field: Field, where: str) -> np.ndarray:
    """One column as float64, checked against the field's dtype (``field-type`` otherwise).

    Missing values are refused: a task gets complete columns or nothing."""
    import pandas as pd

    series = frame[field.name]
    if series.isna().any():
        raise DatasetError("field-type", f"{where}: column {field.name!r} has "
                           f"{int(series.isna().sum())} missing values")
    if field.dtype == "bool" and (series.dtype == object or pd.api.types.is_string_dtype(series)):
        lowered = series.astype(str).str.strip().str.lower()
        mapping = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0, "1": 1.0, "0": 0.0}
        if not lowered.isin(list(mapping)).all():
            raise DatasetError("field-type", f"{where}: column {field.name!r} is not boolean")
        return lowered.map(mapping).to_numpy(dtype=np.float64)
    if pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64)
    else:
        numeric = pd.to_numeric(series, errors="coerce")
        if numeric.isna().any():
            raise DatasetError("field-type", f"{where}: column {field.name!r} is not numeric "
                               f"({int(numeric.isna().sum())} values are not numbers)")
        values = numeric.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise DatasetError("field-type", f"{where}: column {field.name!r} holds infinite "
                           "values")
    if field.dtype == "int" and not np.array_equal(values, np.round(values)):
        raise DatasetError("field-type", f"{where}: column {field.name!r} is declared int but "
                           "holds non-integral values")
    if field.dtype == "bool" and not np.isin(values, (0.0, 1.0)).all():
        raise DatasetError("field-type", f"{where}: column {field.name!r} is declared bool but "
                           "holds values other than 0/1")
    return values


def _matrix(frame: pandas.DataFrame, fields: tuple[Field, ...], where: str) -> np.ndarray:
    if not fields:
        return np.zeros((len(frame), 0), dtype=np.float32)
    columns = [column_values(frame, f, where) for f in fields]
    return np.stack(columns, axis=1).astype(np.float32)


def frames_to_task_data(task: Task, train: pandas.DataFrame, test: pandas.DataFrame, *,
                        dataset: str = "", digest: str = "") -> TaskData:
    """Only ``task``'s fields of two frames, as :class:`TaskData` (typed refusals:
    ``field-missing``, ``field-type``). The data room uses this after its own checks."""
    for where, frame in (("train", train), ("test", test)):
        missing = [f.name for f in task.fields if f.name not in frame.columns]
        if missing:
            raise DatasetError("field-missing", f"dataset {dataset or task.dataset_name} "
                               f"({where}) has no column {missing[0]!r} (missing: "
                               f"{', '.join(map(repr, missing))})")
    xs, ys = [], []
    for where, frame in (("train", train), ("test", test)):
        xs.append(_matrix(frame, task.features, where))
        y = _matrix(frame, task.targets, where)
        ys.append(y[:, 0].copy() if len(task.targets) == 1 else y)
    return TaskData(dataset=dataset or task.dataset_name, digest=digest,
                    features=tuple(f.name for f in task.features),
                    targets=tuple(f.name for f in task.targets),
                    train_x=xs[0], train_y=ys[0], test_x=xs[1], test_y=ys[1])


# --------------------------------------------------------------------------- identifier scan

_NAME_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern)) for label, pattern in (
        ("name", r"(^|_)(first|last|given|family|full|sur|fore|maiden|patient)?_?names?($|_)"
                 r"|(^|_)(surname|forename|initials)($|_)"),
        ("record-number", r"(^|_)(mrn|pid|medical_record|record_(no|number|id)|patient_(id|no|"
                          r"number)|subject_id|case_id|hospital_(id|number)|chart_(id|no|number)"
                          r"|encounter_id|barcode|account_(id|no|number))($|_)|^id$"),
        ("date-of-birth", r"(^|_)(dob|birth|birthdate|birthday|date_of_birth|born)($|_)"),
        ("address", r"(^|_)(address|addr|street|city|town|zip|zipcode|postcode|postal_code|"
                    r"postal)($|_)"),
        ("phone", r"(^|_)(phone|telephone|tel|mobile|cell|fax)($|_)"),
        ("email", r"(^|_)(email|e_mail|mail)($|_)"),
        ("national-id", r"(^|_)(ssn|social_security|nhs|nhs_number|nir|insurance_(no|number)|"
                        r"passport|national_id|licen[cs]e_(no|number))($|_)"),
        ("free-text", r"(^|_)(note|notes|comment|comments|remarks?|narrative|free_text|text)($|_)"),
    ))

_VALUE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern, re.IGNORECASE)) for label, pattern in (
        ("email", r"[^@\s]+@[^@\s]+\.[a-z]{2,}"),
        ("ssn", r"\d{3}-\d{2}-\d{4}"),
        ("phone", r"(?=(\D*\d){7})(\+\d{1,3}[\s.-]?)?(\(\d{1,4}\)[\s.-]?)?"
                  r"\d{1,4}([\s.-]\d{1,4}){1,5}"),
        ("date", r"\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2})?)?|\d{1,2}[/.-]\d{1,2}[/.-]"
                 r"\d{2,4}"),
        ("address", r"\d+[a-z]?\s+(\w+\s+){0,4}(street|st|avenue|ave|road|rd|lane|ln|boulevard|"
                    r"blvd|drive|dr|way|court|ct|place|pl|square|sq|rue|strasse|straße)\b.*"),
    ))
_PERSON_NAME = re.compile(r"[A-Z][a-z'\u2019-]+,?(\s+[A-Z][a-z'\u2019.-]*){1,3}")
_VALUE_SHARE = 0.5
"""A value rule flags a column when at least this share of its (non-missing) values match."""


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def scan_column(name: str, series: pandas.Series) -> tuple[str, ...]:
    """Why ``series`` (column ``name``) looks like a direct identifier; empty if it does not.

    Flags are ``name:<kind>`` (from the column name) and ``value:<kind>`` (from the values,
    with the share that matched); no value is ever part of a flag."""
    import pandas as pd

    flags = [f"name:{label}" for label, rule in _NAME_RULES
             if rule.search(_normalise_name(name))]
    values = series.dropna()
    n = len(values)
    if n == 0:
        return tuple(flags)
    values = values.iloc[:SCAN_SAMPLE]
    n = len(values)
    unique_share = values.nunique() / n
    if pd.api.types.is_datetime64_any_dtype(values):
        flags.append("value:date")
    elif pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values):
        if n >= 20 and unique_share == 1.0 and int(values.min()) >= 10_000:
            flags.append("value:unique-number")
    elif values.dtype == object or pd.api.types.is_string_dtype(values):
        text = values.astype(str).str.strip()
        for label, rule in _VALUE_RULES:
            share = float(text.map(lambda v, r=rule: r.fullmatch(v) is not None).mean())
            if share >= _VALUE_SHARE:
                flags.append(f"value:{label}({share:.0%})")
        names = float(text.map(lambda v: _PERSON_NAME.fullmatch(v) is not None).mean())
        if names >= _VALUE_SHARE and unique_share >= 0.5:
            flags.append(f"value:person-name({names:.0%})")
        has_digit = float(text.str.contains(r"\d", regex=True).mean())
        if n >= 10 and unique_share >= 0.9 and has_digit >= 0.9 and \
                float(text.str.len().mean()) >= 4:
            flags.append(f"value:unique-id({unique_share:.0%} unique)")
        words = text.str.split().str.len()
        if float(text.str.len().mean()) >= 30 and float(words.mean()) >= 5:
            flags.append("value:free-text")
    return tuple(flags)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a registered dataset: its inferred type and the identifier verdict."""

    name: str
    dtype: str                    # int | float | bool | datetime | string
    missing: int                  # missing values (train and test)
    flags: tuple[str, ...]        # the scan's reasons (empty: nothing found)
    identifying: bool             # what the site enforces
    marked_by: str = "scan"       # scan | the operator who overruled it


@dataclass(frozen=True)
class FileInfo:
    role: str                     # data | train | test
    path: str                     # absolute
    sha256: str
    size: int
    rows: int


@dataclass(frozen=True)
class DatasetRecord:
    """What the site keeps about one registered dataset (never rows)."""

    name: str
    files: tuple[FileInfo, ...]
    columns: tuple[ColumnInfo, ...]
    split_column: str | None
    digest: str
    train_rows: int
    test_rows: int
    registered_at: float
    by: str

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def identifying(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.identifying)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetRecord:
        return cls(**{**data,
                      "files": tuple(FileInfo(**f) for f in data["files"]),
                      "columns": tuple(ColumnInfo(**{**c, "flags": tuple(c["flags"])})
                                       for c in data["columns"])})


def dataset_digest(files: Iterable[FileInfo]) -> str:
    text = DATASET_DIGEST_HEADER + "\n" + "".join(f"{f.role} {f.sha256}\n" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise DatasetError("dataset-unreadable", f"{path}: a dataset is a CSV (.csv) or Parquet "
                       "(.parquet, .pq) file")


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_DATASET_BYTES:
            raise DatasetError("dataset-unreadable", f"{path}: {size} bytes, more than "
                               f"{MAX_DATASET_BYTES}")
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError("dataset-unreadable", f"{path}: file not found") from None
    except IsADirectoryError:
        raise DatasetError("dataset-unreadable", f"{path} is a folder, not a file") from None
    except OSError as exc:
        raise DatasetError("dataset-unreadable", f"{path}: {exc.strerror}") from None


def _parse(path: Path, raw: bytes, columns: list[str] | None = None) -> pandas.DataFrame:
    """The frame of ``raw`` (``columns`` only, if given). Errors never quote a row."""
    import pandas as pd

    kind = _format(path)
    try:
        if kind == "csv":
            frame = pd.read_csv(io.BytesIO(raw), usecols=columns)
        else:
            frame = pd.read_parquet(io.BytesIO(raw), columns=columns)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as exc:
        kind_of = type(exc).__name__
        raise DatasetError("dataset-unreadable", f"{path}: not a readable {kind.upper()} file "
                           f"({kind_of})") from None
    except ImportError as exc:
        raise DatasetError("dataset-unreadable", f"{path}: {exc}") from None
    if frame.columns.duplicated().any():
        raise DatasetError("dataset-invalid", f"{path}: duplicate column names")
    return frame


def _dtype(series: pandas.Series) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    return "string"


def _split_mask(frame: pandas.DataFrame, column: str, where: str) -> np.ndarray:
    values = frame[column].astype(str).str.strip().str.lower()
    if not values.isin(["train", "test"]).all():
        raise DatasetError("dataset-invalid", f"{where}: split column {column!r} must hold "
                           "only 'train' or 'test'")
    return (values == "train").to_numpy()


# --------------------------------------------------------------------------- the room


class DataRoom:
    """A site's registered datasets, kept in its sealed store."""

    def __init__(self, state_dir: Path, key: bytes) -> None:
        from cleanroom.site_agent.sealed import SealedJournal

        self.state_dir = Path(state_dir)
        self.journal: SealedJournal = SealedJournal(self.state_dir / DATASETS_FILE, key,
                                                    label="datasets")
        self._state: dict[str, DatasetRecord] = {}
        self._parsed = 0
        self._last: dict[str, Any] | None = None

    # ---------------------------------------------------------------- state

    def datasets(self) -> dict[str, DatasetRecord]:
        """Every registered dataset by name (operator marks applied).

        Parsed incrementally: only records appended since the last call (by this or another
        process) are decoded; a journal that shrank or was replaced is read again."""
        with self.journal.locked():
            records = self.journal.records()
            if self._parsed and (len(records) < self._parsed
                                 or records[self._parsed - 1] != self._last):
                self._state, self._parsed = {}, 0
            self._state = self._apply(dict(self._state), records[self._parsed:])
            self._parsed = len(records)
            self._last = records[-1] if records else None
            return dict(self._state)

    @staticmethod
    def _apply(out: dict[str, DatasetRecord],
               records: list[dict[str, Any]]) -> dict[str, DatasetRecord]:
        for rec in records:
            kind = rec.get("kind")
            if kind == "register":
                record = DatasetRecord.from_json(rec["dataset"])
                out[record.name] = record
            elif kind == "mark" and rec.get("name") in out:
                record = out[rec["name"]]
                columns = tuple(replace(c, identifying=bool(rec["identifying"]),
                                        marked_by=str(rec.get("by", "operator")))
                                if c.name == rec["column"] else c for c in record.columns)
                out[record.name] = replace(record, columns=columns)
            elif kind == "remove":
                out.pop(rec.get("name", ""), None)
        return out

    def get(self, name: str) -> DatasetRecord:
        record = self.datasets().get(name)
        if record is None:
            known = ", ".join(sorted(self.datasets())) or "none"
            raise DatasetError("dataset-unknown", f"no dataset {name!r} is registered at this "
                               f"site (registered: {known})")
        return record

    # ---------------------------------------------------------------- registration

    def add(self, name: str, file: Path, *, test_file: Path | None = None,
            split_column: str | None = None, replace_existing: bool = False,
            by: str = "operator", durable: bool = True) -> DatasetRecord:
        """Register ``file`` (and ``test_file``, or rows split by ``split_column``) as ``name``.

        Stores paths, SHA-256s, row counts, the schema and the scan's flags; refuses a bad
        name, an unreadable or malformed file, a test file whose columns differ, a bad split
        column, and an existing name unless ``replace_existing``. ``durable=False`` (simulated
        sites only, whose data is registered again at every start) skips the fsync."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise DatasetError("dataset-invalid", f"dataset name must match "
                               f"{NAME_PATTERN.pattern}, got {name!r:.80}")
        if test_file is not None and split_column is not None:
            raise DatasetError("dataset-invalid", "give a test file or a split column, not both")
        with self.journal.locked():
            if name in self.datasets() and not replace_existing:
                raise DatasetError("dataset-exists", f"dataset {name!r} is already registered "
                                   "(replace it explicitly)")
            record = self._describe(name, Path(file), test_file and Path(test_file),
                                    split_column, by)
            self.journal.append({"kind": "register", "dataset": record.to_json(),
                                 "at": record.registered_at}, durable=durable)
        log.info("dataset %s registered: %d train / %d test rows, %d columns, %d identifying, "
                 "digest %s", name, record.train_rows, record.test_rows, len(record.columns),
                 len(record.identifying), record.digest[:16])
        return record

    def _describe(self, name: str, file: Path, test_file: Path | None,
                  split_column: str | None, by: str) -> DatasetRecord:
        import pandas as pd

        paths = [("data" if test_file is None else "train", file.resolve())]
        if test_file is not None:
            paths.append(("test", test_file.resolve()))
        files, frames = [], []
        for role, path in paths:
            raw = _read_bytes(path)
            frame = _parse(path, raw)
            if len(frame) == 0:
                raise DatasetError("dataset-invalid", f"{path}: no rows")
            files.append(FileInfo(role=role, path=str(path),
                                  sha256=hashlib.sha256(raw).hexdigest(), size=len(raw),
                                  rows=len(frame)))
            frames.append(frame)
        if len(frames) == 2 and set(frames[0].columns) != set(frames[1].columns):
            only = sorted(set(frames[0].columns) ^ set(frames[1].columns), key=str)
            raise DatasetError("dataset-invalid", f"train and test files have different "
                               f"columns ({', '.join(map(repr, only))})")
        if split_column is not None:
            if split_column not in frames[0].columns:
                raise DatasetError("column-unknown", f"{paths[0][1]}: no split column "
                                   f"{split_column!r}")
            train_mask = _split_mask(frames[0], split_column, str(paths[0][1]))
            train_rows, test_rows = int(train_mask.sum()), int((~train_mask).sum())
        elif len(frames) == 2:
            train_rows, test_rows = len(frames[0]), len(frames[1])
        else:
            train_rows, test_rows = len(frames[0]), 0
        whole = pd.concat(frames, ignore_index=True) if len(frames) == 2 else frames[0]
        columns = []
        for column in frames[0].columns:
            col = str(column)
            flags = scan_column(col, whole[column]) if col != split_column else ()
            columns.append(ColumnInfo(name=col, dtype=_dtype(whole[column]),
                                      missing=int(whole[column].isna().sum()),
                                      flags=flags, identifying=bool(flags)))
        return DatasetRecord(name=name, files=tuple(files), columns=tuple(columns),
                             split_column=split_column, digest=dataset_digest(files),
                             train_rows=train_rows, test_rows=test_rows,
                             registered_at=time.time(), by=by)

    def mark(self, name: str, column: str, *, identifying: bool,
             by: str = "operator") -> DatasetRecord:
        """Overrule the scan for one column; returns the updated record."""
        with self.journal.locked():
            record = self.get(name)
            if record.column(column) is None:
                raise DatasetError("column-unknown", f"dataset {name!r} has no column "
                                   f"{column!r}")
            self.journal.append({"kind": "mark", "name": name, "column": column,
                                 "identifying": bool(identifying), "by": by, "at": time.time()})
        log.info("dataset %s: column %r marked %s by %s", name, column,
                 "identifying" if identifying else "not identifying", by)
        return self.get(name)

    def remove(self, name: str, by: str = "operator") -> None:
        with self.journal.locked():
            self.get(name)
            self.journal.append({"kind": "remove", "name": name, "by": by, "at": time.time()})

    # ---------------------------------------------------------------- serving

    def serve(self, task: Task, name: str | None = None) -> TaskData:
        """Only ``task``'s fields of dataset ``name`` (default: ``task.dataset_name``).

        Refusals (:class:`DatasetError`, every problem listed, the first one's code):
        ``dataset-unknown``, ``dataset-changed``, ``field-missing``, ``field-identifying``,
        ``field-type``."""
        record = self.get(name or task.dataset_name)
        problems: list[tuple[str, str]] = []
        for f in task.fields:
            info = record.column(f.name)
            if info is None:
                problems.append(("field-missing", f"dataset {record.name!r} has no column "
                                                  f"{f.name!r}"))
            elif info.identifying:
                why = ", ".join(info.flags) if info.marked_by == "scan" else \
                    f"marked by {info.marked_by}"
                problems.append(("field-identifying", f"column {f.name!r} of dataset "
                                 f"{record.name!r} is identifying ({why}); the site does not "
                                 "serve it"))
        if problems:
            raise DatasetError(problems[0][0], f"task {task.name}: "
                               + "; ".join(detail for _, detail in problems))
        wanted = [f.name for f in task.fields]
        read = wanted + ([record.split_column] if record.split_column and
                         record.split_column not in wanted else [])
        frames = []
        for info in record.files:
            path = Path(info.path)
            try:
                raw = _read_bytes(path)
            except DatasetError as exc:
                raise DatasetError("dataset-changed", f"dataset {record.name!r}: {exc.detail}; "
                                   "register it again") from None
            if hashlib.sha256(raw).hexdigest() != info.sha256:
                raise DatasetError("dataset-changed", f"dataset {record.name!r}: {path} changed "
                                   "since it was registered (SHA-256 differs); register it "
                                   "again")
            frames.append(_parse(path, raw, read))
        if record.split_column:
            mask = _split_mask(frames[0], record.split_column, record.files[0].path)
            train, test = frames[0][mask], frames[0][~mask]
        elif len(frames) == 2:
            train, test = frames
        else:
            train, test = frames[0], frames[0].iloc[:0]
        data = frames_to_task_data(task, train.reset_index(drop=True),
                                   test.reset_index(drop=True), dataset=record.name,
                                   digest=record.digest)
        log.info("dataset %s served to task %s: %d fields, %d train / %d test rows", record.name,
                 task.name, len(wanted), data.n_train, data.n_test)
        return data

    # ---------------------------------------------------------------- simulation

    def register_simulated(self, task: Task, partition_id: int,
                           num_partitions: int) -> DatasetRecord:
        """Register ``task.simulate(partition_id, num_partitions)`` as ``task.dataset_name``.

        The frames are written as CSV inside the state folder (``datasets/<name>/``, mode 0600)
        and registered like an operator's files. Idempotent: the same frames again reuse the
        registration; different frames replace it.

        Nothing of it is fsync'd (a simulated site's data is a cache of ``task.simulate``):
        after a crash, the next start writes the same bytes again (a torn or lost file differs
        from them, so it is rewritten, and serving it before would have been refused:
        ``dataset-changed``) and re-registers them if the registration was lost."""
        import pandas as pd

        if task.simulate is None:
            raise TaskError("task-invalid", f"task {task.name} has no simulate() for simulated "
                            "sites")
        try:
            frames = task.simulate(partition_id, num_partitions)
        except Exception as exc:
            raise TaskError("task-error", f"task {task.name}: simulate({partition_id}, "
                            f"{num_partitions}) raised {type(exc).__name__}: {exc}") from exc
        if not (isinstance(frames, tuple) and len(frames) == 2
                and all(isinstance(f, pd.DataFrame) for f in frames)):
            raise TaskError("task-invalid", f"task {task.name}: simulate() must return two "
                            "pandas DataFrames (train, test)")
        name = task.dataset_name
        folder = self.state_dir / SIMULATED_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        paths = []
        for role, frame in zip(("train", "test"), frames, strict=True):
            path = folder / f"{role}.csv"
            raw = frame.to_csv(index=False).encode("utf-8")
            if not (path.exists() and path.read_bytes() == raw):
                _replace_file(path, raw)
            paths.append(path)
        with self.journal.locked():
            existing = self.datasets().get(name)
            digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
            if existing is not None and [f.sha256 for f in existing.files] == digests and \
                    [f.path for f in existing.files] == [str(p.resolve()) for p in paths]:
                return existing
            return self.add(name, paths[0], test_file=paths[1], replace_existing=True,
                            by="simulation", durable=False)


def _replace_file(path: Path, data: bytes) -> None:
    """Write-to-temp (mode 0600) and rename, without fsync: the file is old or new to every
    reader, but a power cut may lose it (for files the site can regenerate)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
