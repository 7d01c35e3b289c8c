"""Flower records without model-sized copies: ``to_array`` writes exactly what ``np.save``
(Flower's ``Array(ndarray)``) writes, with one copy; ``array_view`` reads an ``Array`` as a
read-only view of its bytes and refuses a header that disagrees with the Array."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from cleanroom.errors import ProtocolError
from cleanroom.protocol.flower import array_view, arrays_view, numpy_to_arrays, to_array

CASES = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(3.5), np.zeros((0, 3), np.int64),
         np.ones(5, bool), np.arange(6, dtype=">f8"), np.arange(20.0)[::2],
         np.random.default_rng(0).random((40, 30)).astype(np.float16)]


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_to_array_writes_what_flower_writes_and_views_read_it_back(value):
    ours, flowers = to_array(value), Array(value)
    assert ours.data == flowers.data
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    for array in (ours, flowers):
        view = array_view(array)
        assert view.dtype == value.dtype and view.shape == value.shape
        np.testing.assert_array_equal(view, value)
        assert not view.flags.writeable
    if value.size:
        assert np.shares_memory(array_view(ours), np.frombuffer(ours.data, np.uint8))


def test_a_fortran_order_array_is_read_as_a_copy():
    value = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(array_view(Array(value)), value)


def test_records_round_trip_without_copies():
    model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    record = numpy_to_arrays(model)
    views = arrays_view(record)
    assert list(views) == ["w", "b"]
    for name, view in views.items():
        np.testing.assert_array_equal(view, model[name])
        assert np.shares_memory(view, np.frombuffer(record[name].data, np.uint8))


def _forged(value: np.ndarray, **changes) -> Array:
    good = to_array(value)
    fields = {"dtype": good.dtype, "shape": good.shape, "stype": good.stype, "data": good.data}
    fields.update(changes)
    return Array(**fields)


@pytest.mark.parametrize("changes, needle", [
    ({"dtype": "float64"}, "malformed array"),  # the header says float32
    ({"shape": (4, 3)}, "malformed array"),  # the header says (3, 4)
    ({"data": b"not a numpy file"}, "malformed array"),
    ({"stype": "torch.tensor"}, "serialisation type"),
])
def test_an_array_whose_header_disagrees_is_refused(changes, needle):
    with pytest.raises(ProtocolError, match=needle):
        array_view(_forged(np.zeros((3, 4), np.float32), **changes))


def test_truncated_data_is_refused():
    good = to_array(np.zeros((3, 4), np.float32))
    with pytest.raises(ProtocolError, match="malformed array"):
        array_view(Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                         data=good.data[:-4]))


def test_an_object_array_is_never_written():
    with pytest.raises(ProtocolError, match="object arrays"):
        to_array(np.array([{"a": 1}], dtype=object))
    assert isinstance(numpy_to_arrays({"x": np.zeros(2)}), ArrayRecord)
