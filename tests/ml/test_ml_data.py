"""Fed-Heart-Disease loader: FLamby's counts, features, normalisation and error handling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cleanroom.errors import ConfigError
from cleanroom.site_agent.data import (
    HEART_DISEASE_SITES,
    default_data_dir,
    load_heart_disease_site,
    synthetic_site,
)

EXPECTED = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16),
            "va": (85, 45)}


@pytest.mark.parametrize("site", HEART_DISEASE_SITES)
def test_counts_features_and_normalisation(site: str) -> None:
    d = load_heart_disease_site(site)
    assert (d.n_train, d.n_test) == EXPECTED[site]
    assert d.n_features == 13
    assert d.train_x.shape == (d.n_train, 13) and d.test_x.shape == (d.n_test, 13)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.float32
    for arr in (d.train_x, d.train_y, d.test_x, d.test_y):
        assert not np.isnan(arr).any()
    assert set(np.unique(np.concatenate([d.train_y, d.test_y]))) <= {0.0, 1.0}
    np.testing.assert_allclose(d.train_x.mean(axis=0), 0.0, atol=1e-5)
    std = d.train_x.std(axis=0, ddof=1)
    # every column has unit (unbiased) std, except columns constant at this site (-> 0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6))


def test_totals_and_label_balance() -> None:
    data = [load_heart_disease_site(s) for s in HEART_DISEASE_SITES]
    assert sum(d.n_train for d in data) == 486 and sum(d.n_test for d in data) == 254
    swiss = data[2]
    assert swiss.train_y.sum() == 30 and swiss.test_y.sum() == 15


def test_default_dir_is_vendored() -> None:
    folder = default_data_dir()
    assert (folder / "processed.cleveland.data").is_file()
    assert (folder / "flamby_split_reproduced.csv").is_file()


def test_unknown_site() -> None:
    with pytest.raises(ConfigError, match="unknown heart-disease site"):
        load_heart_disease_site("hungarian")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found.*processed\.va\.data"):
        load_heart_disease_site("va", tmp_path)


def _copy(tmp_path: Path) -> Path:
    for f in default_data_dir().iterdir():
        if f.suffix in (".data", ".csv"):
            shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_malformed_row(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    path = folder / "processed.switzerland.data"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace(",", ";", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 5") as info:
        load_heart_disease_site("switzerland", folder)
    assert lines[4] not in str(info.value)  # never echo a row


def test_split_must_match_nan_filter(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    path = folder / "processed.va.data"
    lines = path.read_text().splitlines()
    fields = lines[0].split(",")
    idx = next(i for i, f in enumerate(fields) if f != "?" and i not in (10, 11, 12, 13))
    fields[idx] = "?"
    lines[0] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="NaN filter"):
        load_heart_disease_site("va", folder)


def test_synthetic_site_is_deterministic_and_non_iid() -> None:
    a = synthetic_site("s5", 5, 120, 40, seed=7)
    b = synthetic_site("s5", 5, 120, 40, seed=7)
    c = synthetic_site("s6", 6, 120, 40, seed=7)
    assert a.train_x.shape == (120, 13) and a.test_y.shape == (40,)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert a.train_y.mean() != c.train_y.mean() or not np.array_equal(a.train_x, c.train_x)
    np.testing.assert_allclose(a.train_x.mean(axis=0), 0.0, atol=1e-5)
    with pytest.raises(ConfigError):
        synthetic_site("bad", 0, 1, 1, seed=0)
