"""Update validation before aggregation, alone."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from cleanroom.coordinator import validation
from cleanroom.coordinator.validation import (
    add_scaled,
    all_finite,
    scaled,
    update_norm,
    validate_update,
)
from cleanroom.errors import UpdateRejected

REF = OrderedDict(w=np.zeros((2, 3), np.float32), b=np.zeros(1, np.float32))


def test_an_update_within_the_bound_passes_with_its_norm():
    update = OrderedDict(w=np.full((2, 3), 0.5, np.float32), b=np.zeros(1, np.float32))
    assert validate_update(update, REF, max_norm=2.0) == pytest.approx(np.sqrt(6 * 0.25))


@pytest.mark.parametrize("update,needle", [
    (OrderedDict(w=np.zeros((2, 3), np.float32)), "names differ"),
    (OrderedDict(b=np.zeros(1, np.float32), w=np.zeros((2, 3), np.float32)), "names differ"),
    (OrderedDict(w=np.zeros((3, 2), np.float32), b=np.zeros(1, np.float32)), "shape"),
    (OrderedDict(w=np.zeros((2, 3), np.float64), b=np.zeros(1, np.float32)), "dtype"),
    (OrderedDict(w=np.full((2, 3), np.nan, np.float32), b=np.zeros(1, np.float32)), "NaN"),
    (OrderedDict(w=np.full((2, 3), 10, np.float32), b=np.zeros(1, np.float32)), "exceeds"),
])
def test_bad_updates_are_refused_naming_the_problem(update, needle):
    with pytest.raises(UpdateRejected, match=needle):
        validate_update(update, REF, max_norm=2.0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 elements: every array below spans several, with a ragged last one."""
    monkeypatch.setattr(validation, "CHUNK", 7)


def test_chunked_arithmetic_equals_whole_array_numpy(small_chunks):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 9)).astype(np.float32)
    b = rng.normal(size=(5, 9)).astype(np.float32)
    expect = np.sqrt(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    assert update_norm({"w": a}, {"w": b}) == pytest.approx(expect, rel=1e-12)
    total = np.zeros((5, 9), np.float64)
    add_scaled(total, a, 3.0)
    add_scaled(total, b, -0.5)
    np.testing.assert_allclose(total, a.astype(np.float64) * 3 - b.astype(np.float64) * 0.5)
    out = scaled(total, 0.25, np.dtype(np.float32))
    assert out.dtype == np.float32 and out.shape == (5, 9)
    np.testing.assert_allclose(out, (total * 0.25).astype(np.float32))


@pytest.mark.parametrize("index", [0, 6, 7, 44])  # first, end of a chunk, next one, last
def test_a_nan_in_any_chunk_is_found(small_chunks, index):
    value = np.zeros((5, 9), np.float32)
    assert all_finite(value)
    value.reshape(-1)[index] = np.nan
    assert not all_finite(value)
    with pytest.raises(UpdateRejected, match="NaN or infinite"):
        validate_update({"w": value}, {"w": np.zeros((5, 9), np.float32)}, max_norm=10.0)
