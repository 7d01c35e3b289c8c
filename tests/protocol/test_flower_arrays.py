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


def test_a_handed_on_reply_frees_its_payload_without_the_garbage_collector():
    """Reading a Flower RecordDict's ``config_records`` (Flower's strategies do) puts it in
    a reference cycle: without ``drop_content`` the payload lives until a full GC pass (one
    model per site per round); our own readers no longer make that cycle."""
    import gc
    import weakref

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    from cleanroom.protocol.flower import drop_content

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    data = message_to_proto(Message(RecordDict({"r": ConfigRecord({"parts": [b"x" * 100]})}),
                                    5, "train", group_id="1")).SerializeToString()

    def received() -> tuple[Message, weakref.ref]:
        proto = ProtoMessage()
        proto.ParseFromString(data)
        message = message_from_proto(proto)
        assert message.content.config_records["r"]["parts"]  # Flower's own view
        return message, weakref.ref(message.content["r"])

    gc.disable()
    try:
        message, record = received()
        del message
        assert record() is not None  # the cycle keeps it (what drop_content is for)
        message, record = received()
        drop_content(message)
        assert not message.content.keys() and (record() is None or not record().keys())
    finally:
        gc.enable()


def test_our_readers_leave_no_reference_cycle():
    """``records_of`` (every reader in protocol/flower.py) is a plain dict: the message is
    freed by reference counting alone."""
    import gc
    import weakref

    from flwr.app import ConfigRecord, RecordDict

    from cleanroom.protocol.flower import records_of

    gc.disable()
    try:
        content = RecordDict({"r": ConfigRecord({"parts": [b"x" * 100]})})
        record = weakref.ref(content["r"])
        assert list(records_of(content, ConfigRecord)) == ["r"]
        del content
        assert record() is None
        content = RecordDict({"r": ConfigRecord({"parts": [b"x" * 100]})})
        record = weakref.ref(content["r"])
        assert "r" in content.config_records  # Flower's view: the cycle
        del content
        assert record() is not None
    finally:
        gc.enable()
        gc.collect()


def test_records_a_strategy_returned_are_kept():
    from flwr.app import MetricRecord, RecordDict

    from cleanroom.protocol.flower import drop_content, synthetic_reply

    arrays = numpy_to_arrays({"w": np.ones(3, np.float32)})
    metrics = MetricRecord({"loss": 0.5})
    reply = synthetic_reply(RecordDict({"arrays": arrays, "metrics": metrics}), "train")
    drop_content(reply, keep=(None, metrics))
    assert not reply.content.keys() and not arrays.keys() and metrics["loss"] == 0.5


# ------------------------------------------------------------- the envelope on the wire
def _sealed_for(n: int):
    from collections import OrderedDict

    from cleanroom.protocol.arrays import arrays_digest
    from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
    from cleanroom.protocol.payload import seal_model

    model = OrderedDict(w=np.linspace(-1, 1, 600_000, dtype=np.float32))  # 3 chunks
    keys = [KeyPair.generate() for _ in range(n)]
    contexts = [EnvelopeContext("model", "run-1", 1, f"site-{i}", arrays_digest(model))
                for i in range(n)]
    return model, keys, contexts, seal_model(model, [(k.public_bytes, c)
                                                      for k, c in zip(keys, contexts, strict=True)])


def test_a_model_sealed_for_many_sites_is_one_shared_bytes_that_crosses_flower_and_opens():
    from flwr.app import Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    from cleanroom.protocol.flower import ENVELOPE_RECORD, envelope_record, read_envelope
    from cleanroom.protocol.payload import open_model

    model, keys, contexts, sealed = _sealed_for(3)
    records = [envelope_record(s) for s in sealed]
    assert all(type(r["payload"]) is bytes for r in records)
    assert records[0]["payload"] is records[1]["payload"] is records[2]["payload"]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    data = message_to_proto(Message(RecordDict({ENVELOPE_RECORD: records[2]}), 5, "train",
                                    group_id="1")).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(data)
    received = read_envelope(message_from_proto(proto).content)
    opened = open_model(received, keys[2], contexts[2])
    np.testing.assert_array_equal(opened["w"], model["w"])


@pytest.mark.parametrize("payload", [[b"x" * 100], b"", "text", None])
def test_an_envelope_payload_that_is_not_one_bytes_value_is_refused(payload):
    from flwr.app import ConfigRecord, RecordDict

    from cleanroom.protocol.flower import ENVELOPE_RECORD, envelope_record, read_envelope

    record = envelope_record(_sealed_for(1)[3][0])
    values = {"header": record["header"], "wrapped_key": record["wrapped_key"]}
    if payload is not None:
        values["payload"] = payload
    with pytest.raises(ProtocolError, match="envelope payload must be"):
        read_envelope(RecordDict({ENVELOPE_RECORD: ConfigRecord(values)}))


def test_an_envelope_payload_over_the_limit_is_refused_before_it_is_parsed(monkeypatch):
    from flwr.app import RecordDict

    from cleanroom.protocol import flower
    from cleanroom.protocol.flower import ENVELOPE_RECORD, envelope_record, read_envelope

    record = envelope_record(_sealed_for(1)[3][0])
    monkeypatch.setattr(flower, "MAX_ENVELOPE_BYTES", len(record["payload"]) - 1)
    with pytest.raises(ProtocolError, match="envelope payload must be"):
        read_envelope(RecordDict({ENVELOPE_RECORD: record}))
