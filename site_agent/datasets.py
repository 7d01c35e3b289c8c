"""The site's data room: registered datasets, identifier scan, and minimised serving to tasks.

(Registration and the identifier scan are added below; this part is what the trainer eats.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cleanroom.errors import DatasetError
from cleanroom.task import Field, Task

if TYPE_CHECKING:
    import pandas


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
