"""Thin Flower adapter: wire schemas and envelopes in and out of Flower ``RecordDict``s.

The only module of the shared package that knows Flower's record types. Layout:

* attestation query (``query.cleanroom_attest``): ConfigRecord ``cleanroom.challenge`` with
  ``challenge`` (JSON); the reply: ConfigRecord ``cleanroom.attest`` with ``response`` (JSON),
  ``evidence`` and ``endorsement`` (bytes).
* train/evaluate instructions and train replies: no ArrayRecord at all; ConfigRecord
  ``cleanroom.envelope`` with ``header`` (JSON), ``ciphertext`` (bytes) and ``array_key`` (the
  record name the wrapped strategy or app used for its arrays). Other records (the strategy's
  config, the site's metrics) pass unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ValidationError

from cleanroom.errors import ProtocolError
from cleanroom.protocol.arrays import decode_arrays, encode_arrays
from cleanroom.protocol.envelope import (
    SUITE_NAME,
    EnvelopeContext,
    KeyPair,
    ciphertext_digest,
    open_sealed,
    seal,
)
from cleanroom.protocol.wire import AttestChallenge, AttestResponse, EnvelopeHeader

ATTEST_ACTION = "cleanroom_attest"
ATTEST_MESSAGE_TYPE = f"query.{ATTEST_ACTION}"
CHALLENGE_RECORD = "cleanroom.challenge"
ATTEST_RECORD = "cleanroom.attest"
ENVELOPE_RECORD = "cleanroom.envelope"
MAX_EVIDENCE = 64 * 1024
MAX_ENDORSEMENT = 64 * 1024


def _parse(model: type[BaseModel], text: object, what: str) -> BaseModel:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} is missing or not a string")
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        raise ProtocolError(f"{what} is malformed ({fields})") from None


def _config(content: RecordDict, name: str) -> ConfigRecord:
    record = content.config_records.get(name)
    if record is None:
        raise ProtocolError(f"message has no {name} record")
    return record


def arrays_to_numpy(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def numpy_to_arrays(arrays: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


# ----------------------------------------------------------------------------- attestation


def challenge_content(challenge: AttestChallenge) -> RecordDict:
    return RecordDict({CHALLENGE_RECORD: ConfigRecord({"challenge": challenge.model_dump_json()})})


def read_challenge(content: RecordDict) -> AttestChallenge:
    record = _config(content, CHALLENGE_RECORD)
    return _parse(AttestChallenge, record.get("challenge"), "challenge")  # type: ignore[return-value]


def attest_content(response: AttestResponse, evidence: bytes = b"",
                   endorsement: bytes = b"") -> RecordDict:
    return RecordDict({ATTEST_RECORD: ConfigRecord({
        "response": response.model_dump_json(), "evidence": evidence,
        "endorsement": endorsement})})


def read_attest(content: RecordDict) -> tuple[AttestResponse, bytes, bytes]:
    record = _config(content, ATTEST_RECORD)
    response = _parse(AttestResponse, record.get("response"), "attestation response")
    evidence, endorsement = record.get("evidence", b""), record.get("endorsement", b"")
    if not isinstance(evidence, bytes) or not isinstance(endorsement, bytes):
        raise ProtocolError("evidence and endorsement must be bytes")
    if len(evidence) > MAX_EVIDENCE or len(endorsement) > MAX_ENDORSEMENT:
        raise ProtocolError(f"evidence ({len(evidence)} B) or endorsement "
                            f"({len(endorsement)} B) exceeds the size limit")
    return response, evidence, endorsement  # type: ignore[return-value]


# ----------------------------------------------------------------------------- envelopes


def seal_arrays(content: RecordDict, recipient_public_key: bytes, context: EnvelopeContext,
                ) -> tuple[RecordDict, EnvelopeHeader]:
    """Replace the (single) ArrayRecord of ``content`` by its ciphertext; keep other records."""
    array_items = list(content.array_records.items())
    if len(array_items) != 1:
        raise ProtocolError(f"expected exactly one ArrayRecord, found {len(array_items)}")
    array_key, record = array_items[0]
    ciphertext = seal(encode_arrays(arrays_to_numpy(record)), recipient_public_key, context)
    header = EnvelopeHeader(direction=context.direction, run_id=context.run_id,
                            round=context.round, site=context.site,
                            model_digest=context.model_digest, suite=SUITE_NAME,
                            ciphertext_sha256=ciphertext_digest(ciphertext))
    out = RecordDict()
    for key, value in content.items():
        if key != array_key:
            out[key] = value
    out[ENVELOPE_RECORD] = ConfigRecord({"header": header.model_dump_json(),
                                         "ciphertext": ciphertext, "array_key": array_key})
    return out, header


def envelope_header(content: RecordDict) -> EnvelopeHeader:
    record = _config(content, ENVELOPE_RECORD)
    return _parse(EnvelopeHeader, record.get("header"), "envelope header")  # type: ignore[return-value]


def open_arrays(content: RecordDict, recipient: KeyPair, context: EnvelopeContext,
                ) -> tuple[RecordDict, OrderedDict[str, np.ndarray]]:
    """Inverse of :func:`seal_arrays`: a RecordDict with the ArrayRecord back in place."""
    record = _config(content, ENVELOPE_RECORD)
    header = envelope_header(content)
    ciphertext, array_key = record.get("ciphertext"), record.get("array_key")
    if not isinstance(ciphertext, bytes) or not isinstance(array_key, str) or not array_key:
        raise ProtocolError("envelope has no ciphertext or array_key")
    if ciphertext_digest(ciphertext) != header.ciphertext_sha256:
        raise ProtocolError("envelope ciphertext does not match its header digest")
    if (header.direction, header.run_id, header.round, header.site, header.model_digest) != (
            context.direction, context.run_id, context.round, context.site,
            context.model_digest):
        raise ProtocolError(f"envelope is for {header.direction}/{header.run_id}/round "
                            f"{header.round}/{header.site}, expected {context.direction}/"
                            f"{context.run_id}/round {context.round}/{context.site}")
    arrays = decode_arrays(open_sealed(ciphertext, recipient, context))
    out = RecordDict()
    for key, value in content.items():
        if key != ENVELOPE_RECORD:
            out[key] = value
    out[array_key] = numpy_to_arrays(arrays)
    return out, arrays
