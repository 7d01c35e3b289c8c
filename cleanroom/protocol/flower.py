"""Thin Flower adapter: typed protocol objects in and out of Flower ``RecordDict``s.

The only module of the shared package that knows Flower's record types; it maps, it decides
nothing. Layout of every message the protocol sends:

* attestation query (``query.cleanroom_attest``): ConfigRecord ``cleanroom.challenge`` with
  ``challenge`` (JSON). Reply: ConfigRecord ``cleanroom.attest`` with ``response`` (JSON),
  ``evidence`` and ``endorsement`` (bytes).
* train / evaluate instructions: ConfigRecord ``cleanroom.envelope`` (``header`` JSON,
  ``payload`` and ``wrapped_key`` bytes) holding the sealed global model, plus the inner
  strategy's own ConfigRecord(s) (e.g. FedProx's ``proximal-mu``); no ArrayRecord at all. An
  evaluate instruction may also carry ``cleanroom.challenge`` (next round's challenge,
  answered in the reply: one message round trip less per round). With an attested
  aggregator, both carry ``cleanroom.aggregator`` (its ``evidence`` and ``endorsement``,
  binding the site's own nonce and the round key the site seals to).
* secure aggregation (``query.cleanroom_secagg``, and a train instruction's masked-input
  request): ConfigRecord ``cleanroom.secagg`` with ``stage`` and ``message`` (bytes: a
  :mod:`cleanroom.protocol.secagg_wire` message); the reply carries the same record or
  ``cleanroom.refusal``.
* train reply: exactly one record, ``cleanroom.envelope`` (the sealed update and its report),
  or ``cleanroom.refusal`` (``refusal`` JSON: the site's typed refusal, e.g. an aggregator
  that did not attest). Evaluate reply: ``cleanroom.envelope`` (the sealed evaluation report)
  or ``cleanroom.refusal``, and optionally ``cleanroom.attest``. :func:`read_reply` refuses
  anything else: a reply that carries extra records is a malformed reply of that one site,
  never a reason to stop the run.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from pydantic import BaseModel, ValidationError

from cleanroom.errors import ProtocolError
from cleanroom.protocol import stream
from cleanroom.protocol.payload import Sealed
from cleanroom.protocol.reports import NUM_EXAMPLES, EvaluateReport, TrainReport
from cleanroom.protocol.wire import (
    AttestAnswer,
    AttestChallenge,
    AttestResponse,
    EnvelopeHeader,
    Refusal,
)

ATTEST_ACTION = "cleanroom_attest"
ATTEST_MESSAGE_TYPE = f"query.{ATTEST_ACTION}"
SECAGG_ACTION = "cleanroom_secagg"
SECAGG_MESSAGE_TYPE = f"query.{SECAGG_ACTION}"
SECAGG_RECORD = "cleanroom.secagg"
SECAGG_STAGES = ("share-keys", "masked-input", "consistency", "unmask")
MAX_SECAGG_MESSAGE = 64 * 1024 * 1024
CHALLENGE_RECORD = "cleanroom.challenge"
ATTEST_RECORD = "cleanroom.attest"
ENVELOPE_RECORD = "cleanroom.envelope"
AGGREGATOR_RECORD = "cleanroom.aggregator"
REFUSAL_RECORD = "cleanroom.refusal"
ARRAYS_RECORD = "arrays"  # the ArrayRecord key Flower's strategies use by default
_FLOWER_EXC = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", re.S)
METRICS_RECORD = "metrics"
# Flower's own keys the protocol reads or writes (its strategies' config and metric records)
SERVER_ROUND = "server-round"  # the round number in a strategy's per-round ConfigRecord
PROXIMAL_MU = "proximal-mu"  # FedProx's proximal term weight, in the same record
TRAIN_LOSS = "train-loss"  # a plain reply's raw training loss (only ever without DP)
DP_STEPS = "dp-steps"  # a plain reply's optimiser steps (the baseline's report)
# bytes of one sealed payload: the stream's header, 1 GiB of payload, its metadata and padding,
# and a tag per chunk at the smallest chunk size (the stream checks the exact size)
MAX_ENVELOPE_BYTES = (stream.HEADER_SIZE + stream.MAX_PAYLOAD + stream.MAX_METADATA
                      + stream.ALIGN + stream.MAX_CHUNKS * stream.TAG_SIZE)
MAX_WRAPPED_KEY = 512
MAX_EVIDENCE = 64 * 1024
MAX_ENDORSEMENT = 64 * 1024
MAX_JSON = 256 * 1024
DEFAULT_TTL = 3600.0


def _parse(model: type[BaseModel], text: object, what: str) -> BaseModel:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} is missing or not a string")
    if len(text) > MAX_JSON:
        raise ProtocolError(f"{what} is larger than {MAX_JSON} bytes")
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "(root)"
                           for e in exc.errors())
        raise ProtocolError(f"{what} is malformed ({fields})") from None


def _config(content: RecordDict, name: str) -> ConfigRecord:
    record = records_of(content, ConfigRecord).get(name)
    if record is None:
        raise ProtocolError(f"message has no {name} record")
    return record


_R = TypeVar("_R", ArrayRecord, ConfigRecord, MetricRecord)


def records_of(content: RecordDict, kind: type[_R]) -> dict[str, _R]:
    """``content``'s records of type ``kind``, as a plain dict. Not Flower's
    ``RecordDict.config_records`` (and ``array_records``, ``metric_records``): the view it
    builds references itself, a reference cycle that keeps the message's every record, a
    model-sized payload included, until a full pass of the cyclic garbage collector."""
    return {key: value for key, value in content.items() if isinstance(value, kind)}


def arrays_to_numpy(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Writable copies of a record's arrays (Flower's ``Array.numpy``)."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of a Flower ``Array``'s ``.npy`` bytes: no copy (``numpy()``
    copies the whole array, a model-sized buffer each time the coordinator looks at a
    record). A Fortran-order array is copied (``numpy()``); a header that disagrees with
    the Array's own dtype and shape, or an object array, is refused."""
    if array.stype != "numpy.ndarray":
        raise ProtocolError(f"array of serialisation type {array.stype!r}, expect numpy")
    try:
        head = io.BytesIO(array.data)  # shares the bytes until written to
        version = np.lib.format.read_magic(head)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(head)
        if dtype.hasobject or str(dtype) != array.dtype or tuple(shape) != tuple(array.shape):
            raise ValueError(f"header {dtype}{tuple(shape)} (fortran {fortran}) for an "
                             f"array of {array.dtype}{tuple(array.shape)}")
        if fortran:
            return array.numpy()
        view = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape),
                             offset=head.tell())
    except ValueError as exc:
        raise ProtocolError(f"malformed array: {exc}") from None
    return view.reshape(shape)


def arrays_view(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """:func:`array_view` of every array of ``record`` (read-only, no copies)."""
    return OrderedDict((k, array_view(v)) for k, v in record.items())


def to_array(value: np.ndarray) -> Array:
    """A Flower ``Array`` holding exactly the bytes ``np.save`` would write, built with one
    copy (``Array(ndarray)`` goes through a growing ``BytesIO``: up to three)."""
    value = np.asarray(value)
    value = value if value.flags.c_contiguous else np.ascontiguousarray(value).reshape(
        value.shape)  # (ascontiguousarray alone makes a 0-d array 1-d)
    if value.dtype.hasobject:
        raise ProtocolError("object arrays are not model parameters")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(value))
    data = b"".join((head.getvalue(), memoryview(value).cast("B") if value.size else b""))
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray",
                 data=data)


def numpy_to_arrays(arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                    ) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays`` (:func:`to_array` each); given (name, array) pairs,
    each array is made and turned into bytes one at a time (e.g. a cast per parameter)."""
    pairs = arrays.items() if isinstance(arrays, Mapping) else arrays
    return ArrayRecord(OrderedDict((k, to_array(v)) for k, v in pairs))


def single_arrays(content: RecordDict) -> OrderedDict[str, np.ndarray]:
    """The parameters of a message that must carry exactly one ArrayRecord."""
    records = list(records_of(content, ArrayRecord).values())
    if len(records) != 1:
        raise ProtocolError(f"expected exactly one ArrayRecord, found {len(records)}")
    return arrays_to_numpy(records[0])


# ----------------------------------------------------------------------------- attestation


def challenge_content(challenge: AttestChallenge) -> RecordDict:
    return RecordDict({CHALLENGE_RECORD: challenge_record(challenge)})


def challenge_record(challenge: AttestChallenge) -> ConfigRecord:
    return ConfigRecord({"challenge": challenge.model_dump_json()})


def read_challenge(content: RecordDict) -> AttestChallenge:
    record = _config(content, CHALLENGE_RECORD)
    return _parse(AttestChallenge, record.get("challenge"), "challenge")  # type: ignore[return-value]


def has_challenge(content: RecordDict) -> bool:
    return CHALLENGE_RECORD in records_of(content, ConfigRecord)


def attest_record(response: AttestResponse, evidence: bytes = b"",
                  endorsement: bytes = b"") -> ConfigRecord:
    return ConfigRecord({"response": response.model_dump_json(), "evidence": evidence,
                         "endorsement": endorsement})


def attest_content(response: AttestResponse, evidence: bytes = b"",
                   endorsement: bytes = b"") -> RecordDict:
    return RecordDict({ATTEST_RECORD: attest_record(response, evidence, endorsement)})


def has_attest(content: RecordDict) -> bool:
    return ATTEST_RECORD in records_of(content, ConfigRecord)


def read_attest(content: RecordDict) -> tuple[AttestResponse, bytes, bytes]:
    record = _config(content, ATTEST_RECORD)
    evidence, endorsement = record.get("evidence", b""), record.get("endorsement", b"")
    if not isinstance(evidence, bytes) or not isinstance(endorsement, bytes):
        raise ProtocolError("evidence and endorsement must be bytes")
    if len(evidence) > MAX_EVIDENCE or len(endorsement) > MAX_ENDORSEMENT:
        raise ProtocolError(f"evidence ({len(evidence)} B) or endorsement "
                            f"({len(endorsement)} B) exceeds the size limit")
    response = _parse(AttestResponse, record.get("response"), "attestation response")
    return response, evidence, endorsement  # type: ignore[return-value]


def attest_answer(reply: Message) -> AttestAnswer:
    """A node's answer to its challenge, or why there is none (an error, a bad reply)."""
    if reply.has_error():
        return f"site error: {error_reason(reply)}"
    try:
        return read_attest(reply.content)
    except ProtocolError as exc:
        return f"protocol: {exc}"


def send_challenges(grid: Any, challenges: Mapping[int, AttestChallenge], *, group_id: str,
                    timeout: float) -> list[tuple[int, AttestAnswer]]:
    """One attestation round trip on a Flower Grid: each node's challenge as an attestation
    query, the answers (:func:`attest_answer`) in the order the Grid returns them."""
    messages = [Message(challenge_content(challenge), node_id, ATTEST_MESSAGE_TYPE,
                        group_id=group_id) for node_id, challenge in challenges.items()]
    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
    return [(reply.metadata.src_node_id, attest_answer(reply)) for reply in replies]


# ----------------------------------------------------------------------------- envelopes


def envelope_record(sealed: Sealed) -> ConfigRecord:
    """The sealed payload travels as one ``bytes`` value: Flower's protobuf encodes one large
    value in about half the time, and with less memory, than the same bytes as a list of
    chunks (``python -m benchmarks crypto``: the wire encoding rows). A payload sealed for
    several recipients is joined once (:mod:`.payload`) and shared by their messages."""
    return ConfigRecord({"header": sealed.header.model_dump_json(),
                         "payload": sealed.payload, "wrapped_key": sealed.wrapped_key})


def read_envelope(content: RecordDict) -> Sealed:
    record = _config(content, ENVELOPE_RECORD)
    payload, wrapped = record.get("payload"), record.get("wrapped_key")
    if not isinstance(payload, bytes) or not payload or len(payload) > MAX_ENVELOPE_BYTES:
        raise ProtocolError(f"envelope payload must be 1..{MAX_ENVELOPE_BYTES} bytes")
    if not isinstance(wrapped, bytes) or len(wrapped) > MAX_WRAPPED_KEY:
        raise ProtocolError("envelope has no wrapped key, or one too large")
    header = _parse(EnvelopeHeader, record.get("header"), "envelope header")
    return Sealed(header, (payload,), wrapped)


def instruction_content(sealed: Sealed, strategy_content: RecordDict,
                        challenge: AttestChallenge | None = None,
                        aggregator: tuple[bytes, bytes] | None = None,
                        secagg: bytes | None = None) -> RecordDict:
    """A train/evaluate instruction: the sealed model replaces the strategy's ArrayRecord(s);
    the strategy's ConfigRecords (its per-round config) travel as they are. ``aggregator``:
    the aggregator enclave's (evidence, endorsement) for this site."""
    out = RecordDict()
    for key, value in strategy_content.items():
        if not isinstance(value, ArrayRecord) and not key.startswith("cleanroom."):
            out[key] = value
    out[ENVELOPE_RECORD] = envelope_record(sealed)
    if challenge is not None:
        out[CHALLENGE_RECORD] = challenge_record(challenge)
    if aggregator is not None:
        out[AGGREGATOR_RECORD] = ConfigRecord({"evidence": aggregator[0],
                                               "endorsement": aggregator[1]})
    if secagg is not None:
        out[SECAGG_RECORD] = secagg_record("masked-input", secagg)
    return out


def read_aggregator(content: RecordDict) -> tuple[bytes, bytes] | None:
    """The aggregator enclave's (evidence, endorsement) of an instruction; None if absent."""
    record = records_of(content, ConfigRecord).get(AGGREGATOR_RECORD)
    if record is None:
        return None
    evidence, endorsement = record.get("evidence", b""), record.get("endorsement", b"")
    if not isinstance(evidence, bytes) or not isinstance(endorsement, bytes) or not evidence:
        raise ProtocolError("the aggregator record needs evidence and endorsement bytes")
    if len(evidence) > MAX_EVIDENCE or len(endorsement) > MAX_ENDORSEMENT:
        raise ProtocolError(f"aggregator evidence ({len(evidence)} B) or endorsement "
                            f"({len(endorsement)} B) exceeds the size limit")
    return evidence, endorsement


def secagg_record(stage: str, message: bytes) -> ConfigRecord:
    return ConfigRecord({"stage": stage, "message": message})


def secagg_content(stage: str, message: bytes) -> RecordDict:
    return RecordDict({SECAGG_RECORD: secagg_record(stage, message)})


def read_secagg(content: RecordDict) -> tuple[str, bytes] | None:
    """The secure-aggregation (stage, message) a message carries; None if none."""
    record = records_of(content, ConfigRecord).get(SECAGG_RECORD)
    if record is None:
        return None
    stage, message = record.get("stage"), record.get("message")
    if stage not in SECAGG_STAGES or not isinstance(message, bytes):
        raise ProtocolError(f"secure-aggregation record needs a stage ({', '.join(SECAGG_STAGES)})"
                            " and message bytes")
    if len(message) > MAX_SECAGG_MESSAGE:
        raise ProtocolError(f"secure-aggregation message of {len(message)} bytes exceeds "
                            f"{MAX_SECAGG_MESSAGE}")
    return stage, message  # type: ignore[return-value]


def refusal_content(refusal: Refusal) -> RecordDict:
    """A site's typed refusal of a train or evaluate instruction."""
    return RecordDict({REFUSAL_RECORD: ConfigRecord({"refusal": refusal.model_dump_json()})})


def error_reason(reply: Message) -> str:
    """A site's error as 'ErrorType: message' (Flower's deployment runtime wraps it as
    "<class 'pkg.ErrorType'>:<'message'>")."""
    reason = str(reply.error.reason)
    match = _FLOWER_EXC.match(reason.strip())
    return f"{match.group(1)}: {match.group(2)}" if match else reason


def read_refusal(content: RecordDict) -> Refusal | None:
    """The typed refusal a reply carries (None if it carries none)."""
    record = records_of(content, ConfigRecord).get(REFUSAL_RECORD)
    if record is None:
        return None
    return _parse(Refusal, record.get("refusal"), "refusal")  # type: ignore[return-value]


def strategy_config(content: RecordDict) -> ConfigRecord:
    """The wrapped strategy's per-round ConfigRecord of an instruction (empty if none)."""
    for key, record in records_of(content, ConfigRecord).items():
        if not key.startswith("cleanroom."):
            return record
    return ConfigRecord()


def read_reply(content: RecordDict, *, allowed: Iterable[str]) -> None:
    """Refuse a reply holding any record besides ``allowed`` (array, metric or config)."""
    allowed = set(allowed)
    extra = sorted(k for k in content if k not in allowed)
    if extra:
        raise ProtocolError(f"reply carries unexpected record(s) {extra}; only "
                            f"{sorted(allowed)} are accepted")


def reply_content(sealed: Sealed, attest: ConfigRecord | None = None) -> RecordDict:
    out = RecordDict({ENVELOPE_RECORD: envelope_record(sealed)})
    if attest is not None:
        out[ATTEST_RECORD] = attest
    return out


# ----------------------------------------------------------------------------- inner strategy


def train_metrics(report: TrainReport) -> MetricRecord:
    """What the wrapped strategy sees of a site's train report: the sample count it weights
    by (from the authenticated report), and the loss when there is one."""
    values: dict[str, int | float] = {NUM_EXAMPLES: report.num_examples}
    if report.train_loss is not None:
        values[TRAIN_LOSS] = report.train_loss
    return MetricRecord(values)  # type: ignore[arg-type]


def evaluate_metrics(report: EvaluateReport) -> MetricRecord:
    """Defined metrics only (a MetricRecord holds numbers), with the count Flower weights by."""
    return MetricRecord({NUM_EXAMPLES: report.num_examples,  # type: ignore[arg-type]
                         **{k: v for k, v in report.metrics.items() if v is not None}})


def drop_content(message: Message, *, keep: Iterable[object] = ()) -> None:
    """Empty ``message``'s records once they have been handed on (``keep``: records that
    must survive, e.g. what a strategy returned as its result). A record that Flower's
    ``RecordDict.config_records`` or ``array_records`` has viewed (Flower's strategies do)
    is held by a reference cycle until a full pass of the cyclic garbage collector, which is
    rare: emptied here, its model-sized payload is freed at once."""
    if not message.has_content():
        return
    content = message.content
    kept = [record for record in keep if record is not None]
    for key in list(content.keys()):
        record = content[key]
        del content[key]
        if not any(record is other for other in kept):
            record.clear()


def synthetic_reply(content: RecordDict, message_type: str, src_node_id: int = 0) -> Message:
    """A reply no node sent: what an aggregator releases, handed to a Flower strategy's
    ``aggregate_*`` as if one node had answered (no run context needed)."""
    metadata = Metadata(run_id=0, message_id="", src_node_id=src_node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type=message_type)
    return Message(content=content, metadata=metadata)


def plain_train_reply(arrays: OrderedDict[str, np.ndarray] | ArrayRecord,
                      report: TrainReport) -> RecordDict:
    """A train reply as a plain Flower ClientApp sends it (``arrays``: numpy, or a record
    already built)."""
    record = arrays if isinstance(arrays, ArrayRecord) else numpy_to_arrays(arrays)
    return RecordDict({ARRAYS_RECORD: record, METRICS_RECORD: train_metrics(report)})


def plain_evaluate_reply(report: EvaluateReport) -> RecordDict:
    return RecordDict({METRICS_RECORD: evaluate_metrics(report)})
