"""Update validation before aggregation, alone."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from cleanroom.coordinator.validation import validate_update
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
