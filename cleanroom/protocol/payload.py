"""Sealed payloads of one round: the model to a site, its update and reports back.

Composes the canonical array encoding (:mod:`cleanroom.protocol.arrays`), the typed reports
(:mod:`cleanroom.protocol.reports`) and the envelope (:mod:`cleanroom.protocol.envelope`) into
the four things that cross the wire encrypted:

* ``model`` / ``evaluate``: the global model, coordinator -> one site;
* ``update``: the site's new parameters *and* its :class:`TrainReport`, sealed together, so the
  coordinator never believes a count or an epsilon that travelled beside the ciphertext;
* ``metrics``: the site's :class:`EvaluateReport`.

Everything raises :class:`~cleanroom.errors.ProtocolError` or
:class:`~cleanroom.errors.EnvelopeError` only.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

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
from cleanroom.protocol.reports import EvaluateReport, TrainReport
from cleanroom.protocol.wire import EnvelopeHeader

UPDATE_MAGIC = b"CRFLUPD1"
MAX_REPORT = 64 * 1024


@dataclass(frozen=True)
class Sealed:
    """A ciphertext and the header that names its context (the header is not secret)."""

    header: EnvelopeHeader
    ciphertext: bytes

    @property
    def sha256(self) -> str:
        return self.header.ciphertext_sha256


def _seal(plaintext: bytes, recipient: bytes, context: EnvelopeContext) -> Sealed:
    ciphertext = seal(plaintext, recipient, context)
    header = EnvelopeHeader(direction=context.direction, run_id=context.run_id,
                            round=context.round, site=context.site,
                            model_digest=context.model_digest, suite=SUITE_NAME,
                            ciphertext_sha256=ciphertext_digest(ciphertext))
    return Sealed(header, ciphertext)


def _open(sealed: Sealed, recipient: KeyPair, context: EnvelopeContext) -> bytes:
    header = sealed.header
    if ciphertext_digest(sealed.ciphertext) != header.ciphertext_sha256:
        raise ProtocolError("envelope ciphertext does not match its header digest")
    if (header.direction, header.run_id, header.round, header.site, header.model_digest) != (
            context.direction, context.run_id, context.round, context.site,
            context.model_digest):
        raise ProtocolError(f"envelope is for {header.direction}/{header.run_id}/round "
                            f"{header.round}/{header.site}, expected {context.direction}/"
                            f"{context.run_id}/round {context.round}/{context.site}")
    return open_sealed(sealed.ciphertext, recipient, context)


# ----------------------------------------------------------------------------- model


def seal_model(arrays: Mapping[str, np.ndarray], recipient: bytes,
               context: EnvelopeContext) -> Sealed:
    return _seal(encode_arrays(arrays), recipient, context)


def open_model(sealed: Sealed, recipient: KeyPair,
               context: EnvelopeContext) -> OrderedDict[str, np.ndarray]:
    return decode_arrays(_open(sealed, recipient, context))


# ----------------------------------------------------------------------------- update


def seal_update(arrays: Mapping[str, np.ndarray], report: TrainReport, recipient: bytes,
                context: EnvelopeContext) -> Sealed:
    head = report.model_dump_json().encode()
    return _seal(UPDATE_MAGIC + struct.pack("<I", len(head)) + head + encode_arrays(arrays),
                 recipient, context)


def open_update(sealed: Sealed, recipient: KeyPair, context: EnvelopeContext,
                ) -> tuple[OrderedDict[str, np.ndarray], TrainReport]:
    plain = _open(sealed, recipient, context)
    start = len(UPDATE_MAGIC) + 4
    if len(plain) < start or not plain.startswith(UPDATE_MAGIC):
        raise ProtocolError("update payload: bad magic")
    (size,) = struct.unpack_from("<I", plain, len(UPDATE_MAGIC))
    if size > MAX_REPORT or start + size > len(plain):
        raise ProtocolError("update payload: report length out of range")
    report = _report(TrainReport, plain[start:start + size], "train report")
    return decode_arrays(plain[start + size:]), report  # type: ignore[return-value]


# ----------------------------------------------------------------------------- metrics


def seal_metrics(report: EvaluateReport, recipient: bytes, context: EnvelopeContext) -> Sealed:
    return _seal(report.model_dump_json().encode(), recipient, context)


def open_metrics(sealed: Sealed, recipient: KeyPair, context: EnvelopeContext,
                 ) -> EvaluateReport:
    plain = _open(sealed, recipient, context)
    if len(plain) > MAX_REPORT:
        raise ProtocolError("evaluation report is too large")
    return _report(EvaluateReport, plain, "evaluation report")  # type: ignore[return-value]


def _report(model: type[TrainReport] | type[EvaluateReport], raw: bytes,
            what: str) -> TrainReport | EvaluateReport:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "(root)"
                           for e in exc.errors())
        raise ProtocolError(f"{what} is malformed ({fields})") from None
