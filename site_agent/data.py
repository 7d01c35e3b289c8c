"""A site's training data: FLamby's Fed-Heart-Disease centres, or synthetic non-IID partitions.

Fed-Heart-Disease is built exactly as FLamby builds it (owkin/FLamby,
``flamby/datasets/fed_heart_disease/dataset.py``), but one centre at a time so a site never
needs another site's rows:

* read ``processed.<centre>.data`` (comma separated, no header, ``?`` = missing);
* drop columns 10, 11, 12 (slope, ca, thal) and every row that still has a missing value;
* train/test membership comes from the vendored ``flamby_split_reproduced.csv`` (FLamby's
  seed-43 stratified 66/34 split, re-computed once), which is checked against the NaN filter;
* label = 1 if ``num`` > 0 else 0;
* features in FLamby's column order: age, sex, trestbps, chol, fbs, thalach, exang, oldpeak,
  then the one-hot columns cp=2, cp=3, cp=4, restecg=1, restecg=2 (``pd.get_dummies`` with
  ``drop_first`` over the pooled data; the category sets are fixed, so each site can encode
  alone and get the same columns);
* all 13 columns are normalised with the site's own *train* statistics,
  ``(x - mean) / (std + 1e-9)``, where ``std`` is the unbiased (``ddof=1``) standard deviation as
  FLamby's ``torch.std`` computes it. Test rows use the train statistics.

Nothing here logs or writes a dataset row; errors name files, line numbers and columns only.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleanroom.errors import ConfigError

log = logging.getLogger(__name__)

HEART_DISEASE_SITES: tuple[str, ...] = ("cleveland", "hungary", "switzerland", "va")
"""Site names in FLamby centre order (centre ids 0..3)."""

_FILE_STEM: dict[str, str] = {"cleveland": "cleveland", "hungary": "hungarian",
                              "switzerland": "switzerland", "va": "va"}
SPLIT_FILE = "flamby_split_reproduced.csv"
N_RAW_COLUMNS = 14
DROPPED_COLUMNS = (10, 11, 12)
NUMERIC_COLUMNS = (0, 1, 3, 4, 5, 7, 8, 9)  # kept as is, in this order (FLamby's order)
ONE_HOT: tuple[tuple[int, tuple[int, ...]], ...] = ((2, (2, 3, 4)), (6, (1, 2)))
"""(raw column, categories kept after drop_first): cp in 1..4, restecg in 0..2."""
_ALL_CATEGORIES: dict[int, tuple[int, ...]] = {2: (1, 2, 3, 4), 6: (0, 1, 2)}
FEATURE_NAMES: tuple[str, ...] = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang",
                                  "oldpeak", "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
LABEL_COLUMN = 13
NORM_EPS = 1e-9
EXPECTED_COUNTS: dict[str, tuple[int, int]] = {"cleveland": (199, 104), "hungary": (172, 89),
                                               "switzerland": (30, 16), "va": (85, 45)}


@dataclass(frozen=True)
class SiteData:
    """One site's normalised data: float32 features ``(n, d)`` and float32 labels in {0, 1}."""

    site: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])


def default_data_dir() -> Path:
    """The vendored copy of the UCI files: ``simulations/data/heart_disease``."""
    return Path(__file__).resolve().parent.parent / "simulations" / "data" / "heart_disease"


def _read_raw(path: Path) -> np.ndarray:
    """The raw 14-column matrix of one centre file, ``?`` as NaN (float64)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"heart-disease data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read heart-disease data file {path}: {exc}") from None
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.strip().split(",")
        if len(fields) != N_RAW_COLUMNS:
            raise ConfigError(f"{path}: line {lineno} has {len(fields)} fields, expected "
                              f"{N_RAW_COLUMNS}")
        row: list[float] = []
        for col, field in enumerate(fields):
            field = field.strip()
            if field == "?":
                row.append(math.nan)
                continue
            try:
                value = float(field)
            except ValueError:
                raise ConfigError(f"{path}: line {lineno}, column {col} is not a number or "
                                  "'?'") from None
            if not math.isfinite(value):
                raise ConfigError(f"{path}: line {lineno}, column {col} is not finite")
            row.append(value)
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return np.asarray(rows, dtype=np.float64)


def _read_split(path: Path, site: str, n_lines: int) -> list[tuple[bool, str, int]]:
    """Per raw line of ``site``: (kept, set, num) from the split file, in line order."""
    try:
        handle = path.open(newline="", encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(f"heart-disease split file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read heart-disease split file {path}: {exc}") from None
    entries: dict[int, tuple[bool, str, int]] = {}
    stem = _FILE_STEM[site]
    with handle:
        reader = csv.DictReader(handle)
        needed = {"center", "line", "kept", "set", "num"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise ConfigError(f"{path}: header must contain {sorted(needed)}")
        for lineno, rec in enumerate(reader, start=2):
            if rec["center"] not in (site, stem):
                continue
            try:
                line, kept, num = int(rec["line"]), int(rec["kept"]), int(rec["num"])
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: line {lineno} has a non-integer line/kept/num") \
                    from None
            subset = rec["set"]
            if subset not in ("train", "test", "dropped") or kept not in (0, 1):
                raise ConfigError(f"{path}: line {lineno} has an invalid set/kept value")
            if (subset == "dropped") != (kept == 0):
                raise ConfigError(f"{path}: line {lineno}: set and kept disagree")
            if line in entries:
                raise ConfigError(f"{path}: line {lineno} repeats {site} raw line {line}")
            entries[line] = (kept == 1, subset, num)
    if sorted(entries) != list(range(n_lines)):
        raise ConfigError(f"{path}: lists {len(entries)} lines for {site}, the data file has "
                          f"{n_lines}")
    return [entries[i] for i in range(n_lines)]


def _encode(raw: np.ndarray) -> np.ndarray:
    """FLamby's 13 features (before normalisation) from the kept raw rows."""
    columns = [raw[:, c] for c in NUMERIC_COLUMNS]
    for col, kept_categories in ONE_HOT:
        values = raw[:, col]
        if not np.isin(values, _ALL_CATEGORIES[col]).all():
            raise ConfigError(f"column {col} has a value outside {_ALL_CATEGORIES[col]}")
        columns.extend((values == cat).astype(np.float64) for cat in kept_categories)
    return np.stack(columns, axis=1)


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0, ddof=1) if train.shape[0] > 1 else np.zeros_like(mean)
    return (train - mean) / (std + NORM_EPS), (test - mean) / (std + NORM_EPS)


def load_heart_disease_site(site: str, data_dir: Path | None = None) -> SiteData:
    """Load one FLamby Fed-Heart-Disease centre (see the module docstring).

    Raises :class:`ConfigError` for an unknown site, a missing file, a malformed row, or a split
    file that disagrees with the data (the error names the file and line, never row contents).
    """
    if site not in HEART_DISEASE_SITES:
        raise ConfigError(f"unknown heart-disease site {site!r}; expected one of "
                          f"{', '.join(HEART_DISEASE_SITES)}")
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    data_path = folder / f"processed.{_FILE_STEM[site]}.data"
    raw = _read_raw(data_path)
    split = _read_split(folder / SPLIT_FILE, site, raw.shape[0])

    raw = np.delete(raw, DROPPED_COLUMNS, axis=1)  # now 11 columns: 0..9 and num
    raw_label_col = LABEL_COLUMN - len(DROPPED_COLUMNS)
    complete = ~np.isnan(raw).any(axis=1)
    for i, (kept, _subset, num) in enumerate(split):
        if kept != bool(complete[i]):
            raise ConfigError(f"{folder / SPLIT_FILE}: {site} raw line {i} is marked "
                              f"{'kept' if kept else 'dropped'} but the NaN filter "
                              f"{'keeps' if complete[i] else 'drops'} it")
        if kept and num != int(raw[i, raw_label_col]):
            raise ConfigError(f"{folder / SPLIT_FILE}: {site} raw line {i}: num differs from "
                              f"{data_path.name}")
    # Back to the 14-column layout for the encoder (dropped columns are never read).
    full = np.full((raw.shape[0], N_RAW_COLUMNS), np.nan)
    keep_cols = [c for c in range(N_RAW_COLUMNS) if c not in DROPPED_COLUMNS]
    full[:, keep_cols] = raw
    try:
        features = _encode(full[complete])
    except ConfigError as exc:
        raise ConfigError(f"{data_path}: {exc}") from None
    labels = (full[complete, LABEL_COLUMN] > 0).astype(np.float64)
    sets = np.array([s for (k, s, _n) in split if k])
    train, test = sets == "train", sets == "test"
    if not train.any() or not test.any():
        raise ConfigError(f"{folder / SPLIT_FILE}: {site} has an empty train or test set")
    train_x, test_x = _normalise(features[train], features[test])
    data = SiteData(site=site, train_x=train_x.astype(np.float32),
                    train_y=labels[train].astype(np.float32),
                    test_x=test_x.astype(np.float32), test_y=labels[test].astype(np.float32))
    expected = EXPECTED_COUNTS[site]
    if (data.n_train, data.n_test) != expected:
        log.warning("heart-disease site %s: %d train / %d test rows, FLamby has %d / %d", site,
                    data.n_train, data.n_test, *expected)
    log.debug("loaded heart-disease site %s: %d train, %d test, %d features", site,
              data.n_train, data.n_test, data.n_features)
    return data


# --------------------------------------------------------------------------- synthetic data

SYNTHETIC_TASK_SEED = 20240601
"""Seed of the ground-truth model shared by every synthetic site (the federation's task)."""


def synthetic_site(site: str, index: int, n_train: int, n_test: int, seed: int,
                   n_features: int = 13) -> SiteData:
    """Synthetic non-IID logistic-regression data for one site of an N-site federation.

    All sites share one ground-truth model (fixed, from :data:`SYNTHETIC_TASK_SEED`); site
    ``index`` gets its own feature shift and scale, a perturbed copy of the model and its own
    intercept (label skew), all derived from ``index`` only. ``seed`` drives the sampling of the
    rows, so callers may give each site a different seed. Features are normalised with the
    site's train statistics like the heart-disease data.
    """
    if index < 0:
        raise ConfigError(f"synthetic site {site!r}: index must be >= 0, got {index}")
    if n_train < 2 or n_test < 1:
        raise ConfigError(f"synthetic site {site!r}: need n_train >= 2 and n_test >= 1, got "
                          f"{n_train}/{n_test}")
    if n_features < 1:
        raise ConfigError(f"synthetic site {site!r}: n_features must be >= 1")
    task = np.random.default_rng(SYNTHETIC_TASK_SEED)
    w_true = task.normal(0.0, 1.0, size=n_features) * 3.0 / math.sqrt(n_features)
    shape = np.random.default_rng([SYNTHETIC_TASK_SEED, index])
    shift = shape.normal(0.0, 0.4, size=n_features)
    scale = np.exp(shape.normal(0.0, 0.25, size=n_features))
    w_site = w_true + shape.normal(0.0, 0.3, size=n_features) * np.abs(w_true).mean()
    bias = shape.normal(0.0, 0.3)
    rows = np.random.default_rng([SYNTHETIC_TASK_SEED, index, seed % (1 << 64)])
    n = n_train + n_test
    x = shift + scale * rows.normal(0.0, 1.0, size=(n, n_features))
    logits = x @ w_site + bias
    y = (rows.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    train_x, test_x = _normalise(x[:n_train], x[n_train:])
    return SiteData(site=site, train_x=train_x.astype(np.float32),
                    train_y=y[:n_train].astype(np.float32), test_x=test_x.astype(np.float32),
                    test_y=y[n_train:].astype(np.float32))
