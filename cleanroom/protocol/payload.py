"""Sealed payloads of one round: the model to the sites, each site's update and reports back.

Composes the canonical array encoding (:mod:`cleanroom.protocol.arrays`), the typed reports
(:mod:`cleanroom.protocol.reports`) and envelope v2 (:mod:`cleanroom.protocol.envelope`:
chunked AES-256-GCM, the content key HPKE-wrapped per recipient, docs/envelope.md):

* ``model`` / ``evaluate``: the global model, encoded and encrypted ONCE per round for every
  admitted site (:func:`seal_model`), each site getting the shared ciphertext and its own
  wrapped key, bound to its own context (run, round, site, model digest);
* ``update``: a site's new parameters with its :class:`TrainReport` as the envelope's
  authenticated metadata, signed by the site's per-round Ed25519 key (its attestation binds
  that key): a relay cannot seal an update of its own to the coordinator's public round key,
  and no count or epsilon travels outside the envelope;
* ``metrics``: a site's :class:`EvaluateReport`, signed the same way.

Everything raises :class:`~cleanroom.errors.ProtocolError` (or its subclass
:class:`~cleanroom.errors.EnvelopeError`) only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import ValidationError

from cleanroom.errors import ProtocolError
from cleanroom.protocol.arrays import EncodedArrays, encode_arrays_view
from cleanroom.protocol.envelope import (
    EnvelopeContext,
    KeyPair,
    Recipient,
    SealedEnvelope,
    load_signer_public_key,
    open_arrays_envelope,
    open_envelope,
    seal_arrays_envelope,
    seal_envelope,
)
from cleanroom.protocol.reports import EvaluateReport, TrainReport
from cleanroom.protocol.wire import EnvelopeHeader

SUITE_V2 = "envelope-v2: AES-256-GCM stream, X25519/HKDF-SHA256 HPKE-wrapped key, Ed25519"


@dataclass(frozen=True)
class Sealed:
    """What one message carries: the (possibly shared) sealed payload, this recipient's
    wrapped key, and a header naming the context (the header is not secret)."""

    header: EnvelopeHeader
    parts: tuple[bytes, ...]
    wrapped_key: bytes

    @property
    def sha256(self) -> str:
        """The envelope's ciphertext id (SHA-256 over its header digest and chunk tags): what
        receipts record."""
        return self.header.ciphertext_sha256

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts) + len(self.wrapped_key)

    @property
    def payload(self) -> bytes:
        """The sealed payload as one ``bytes`` (what a message carries; the sealers below
        join the stream's chunks once, so this is not a copy)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


def _joined(parts: tuple[bytes, ...]) -> tuple[bytes]:
    """The stream's header and chunks as one ``bytes``: one copy here, shared by every
    recipient's message, instead of a slower list of chunks in each message's protobuf."""
    return (b"".join(parts),)


def _header(context: EnvelopeContext, sealed: SealedEnvelope) -> EnvelopeHeader:
    return EnvelopeHeader(direction=context.direction, run_id=context.run_id,
                          round=context.round, site=context.site,
                          model_digest=context.model_digest, suite=SUITE_V2,
                          ciphertext_sha256=sealed.ciphertext_id)


def _check_header(sealed: Sealed, context: EnvelopeContext) -> None:
    header = sealed.header
    if (header.direction, header.run_id, header.round, header.site, header.model_digest) != (
            context.direction, context.run_id, context.round, context.site,
            context.model_digest):
        raise ProtocolError(f"envelope is for {header.direction}/{header.run_id}/round "
                            f"{header.round}/{header.site}, expected {context.direction}/"
                            f"{context.run_id}/round {context.round}/{context.site}")


def _signer(raw: bytes | None) -> ed25519.Ed25519PublicKey | None:
    return load_signer_public_key(raw) if raw is not None else None


# ----------------------------------------------------------------------------- model


def encode_model(arrays: Mapping[str, np.ndarray]) -> EncodedArrays:
    """The model encoded once (its digest computed once) for every seal of the round."""
    return encode_arrays_view(arrays)


def seal_model(model: Mapping[str, np.ndarray] | EncodedArrays,
               recipients: Sequence[tuple[bytes, EnvelopeContext]]) -> list[Sealed]:
    """The model encrypted once, one wrapped key per recipient ``(public key, context)``."""
    if not recipients:
        return []
    sealed = seal_arrays_envelope(model, [Recipient(key, ctx) for key, ctx in recipients])
    payload = _joined(sealed.parts)
    return [Sealed(_header(ctx, sealed), payload, wrapped)
            for (_, ctx), wrapped in zip(recipients, sealed.wrapped_keys, strict=True)]


def open_model(sealed: Sealed, recipient: KeyPair,
               context: EnvelopeContext) -> OrderedDict[str, np.ndarray]:
    """The model, checked to hash to ``context.model_digest``."""
    _check_header(sealed, context)
    return open_arrays_envelope(sealed.payload, sealed.wrapped_key, recipient, context).arrays


# ----------------------------------------------------------------------------- update


def seal_update(arrays: Mapping[str, np.ndarray], report: TrainReport, recipient: bytes,
                context: EnvelopeContext, signer: ed25519.Ed25519PrivateKey) -> Sealed:
    sealed = seal_arrays_envelope(arrays, [Recipient(recipient, context)],
                                  metadata=report.model_dump(mode="json"), signer=signer)
    return Sealed(_header(context, sealed), _joined(sealed.parts), sealed.wrapped_keys[0])


def open_update(sealed: Sealed, recipient: KeyPair, context: EnvelopeContext,
                signer: bytes | None) -> tuple[OrderedDict[str, np.ndarray], TrainReport]:
    """The update (arrays viewing one buffer) and the report from inside the envelope;
    ``signer``: the site's attested update-signing key (required when given)."""
    _check_header(sealed, context)
    opened = open_arrays_envelope(sealed.payload, sealed.wrapped_key, recipient, context,
                                  expected_signer=_signer(signer))
    report = _report(TrainReport, opened.metadata, "train report")
    return opened.arrays, report  # type: ignore[return-value]


# ----------------------------------------------------------------------------- masked update


def seal_masked_update(masked: Any, report: TrainReport, recipient: bytes,
                       context: EnvelopeContext, signer: ed25519.Ed25519PrivateKey) -> Sealed:
    """Secure aggregation: the site's masked input (a ``MaskedInput``) and its report, sealed
    and signed like an update (the mask hides the update; the envelope hides the report and
    binds the masked vector to the site's attested signing key)."""
    from cleanroom.protocol.secagg_wire import masked_input_parts

    header, vector = masked_input_parts(masked)
    sealed = seal_envelope(vector, [Recipient(recipient, context)],
                           metadata={"report": report.model_dump(mode="json"),
                                     "masked": header.decode()}, signer=signer)
    return Sealed(_header(context, sealed), _joined(sealed.parts), sealed.wrapped_keys[0])


def open_masked_update(sealed: Sealed, recipient: KeyPair, context: EnvelopeContext,
                       signer: bytes | None) -> tuple[Any, TrainReport]:
    """The ``MaskedInput`` and the report (typed errors for anything malformed)."""
    from cleanroom.protocol.secagg_wire import masked_input_from_parts

    _check_header(sealed, context)
    opened = open_envelope(sealed.payload, sealed.wrapped_key, recipient, context,
                           expected_signer=_signer(signer))
    meta = opened.metadata
    if not isinstance(meta, dict) or not isinstance(meta.get("masked"), str):
        raise ProtocolError("the masked update has no masked-input header")
    report = _report(TrainReport, meta.get("report"), "train report")
    masked = masked_input_from_parts(meta["masked"].encode(), bytes(opened.payload))
    return masked, report  # type: ignore[return-value]


# ----------------------------------------------------------------------------- metrics


def seal_metrics(report: EvaluateReport, recipient: bytes, context: EnvelopeContext,
                 signer: ed25519.Ed25519PrivateKey) -> Sealed:
    sealed = seal_envelope(b"", [Recipient(recipient, context)],
                           metadata=report.model_dump(mode="json"), signer=signer)
    return Sealed(_header(context, sealed), _joined(sealed.parts), sealed.wrapped_keys[0])


def open_metrics(sealed: Sealed, recipient: KeyPair, context: EnvelopeContext,
                 signer: bytes | None) -> EvaluateReport:
    _check_header(sealed, context)
    opened = open_envelope(sealed.payload, sealed.wrapped_key, recipient, context,
                           expected_signer=_signer(signer), max_payload=0)
    return _report(EvaluateReport, opened.metadata, "evaluation report")  # type: ignore[return-value]


def _report(model: type[TrainReport] | type[EvaluateReport], raw: object,
            what: str) -> TrainReport | EvaluateReport:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} is missing from the envelope")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "(root)"
                           for e in exc.errors())
        raise ProtocolError(f"{what} is malformed ({fields})") from None
