"""Wire messages of secure aggregation, one request and one reply per stage (pydantic v2).

Every message names the protocol, the stage, the run and the round; site replies name the
site. Binary fields are bytes in Python and base64 in JSON; every list and byte string has a
bound, and :func:`decode` refuses a message longer than its type allows before parsing it. The
one large payload, the masked vector, travels beside its JSON header as raw bytes
(:func:`masked_input_parts` / :func:`masked_input_from_parts`).

Stages (the aggregator relays everything; sites never talk directly):

=============  =========================================  =========================================
stage          aggregator -> site                         site -> aggregator
=============  =========================================  =========================================
share-keys     ShareKeysRequest (parameters, roster of    ShareKeysResponse (shares sealed to each
               attested secagg keys)                      neighbour, share commitments)
masked-input   MaskedInputRequest (the shares sealed to   MaskedInput (peers masked with, masked
               this site by its neighbours)               vector)
consistency    ConsistencyRequest (the survivor set)      ConsistencyResponse (a tag per neighbour
                                                          over the survivor set)
unmask         UnmaskRequest (tags from neighbours,       UnmaskResponse (the shares asked for)
               whose shares to reveal)
=============  =========================================  =========================================
"""

from __future__ import annotations

import json
import math
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from cleanroom.errors import SecAggMessageError
from cleanroom.protocol.secagg_primitives import (
    AEAD_OVERHEAD,
    DIGEST_SIZE,
    KEY_SIZE,
    SHARE_SIZE,
    TAG_SIZE,
)
from cleanroom.protocol.wire import SiteName

SECAGG_PROTOCOL = 1
MAX_SITES = 1000
MAX_VECTOR_LENGTH = 50_000_000  # parameters of one update (400 MB masked at 64 bits)
SEALED_SHARES_SIZE = AEAD_OVERHEAD + 2 * SHARE_SIZE  # self-mask share || mask-key share
MAX_LEVELS = 2**30
MAX_WEIGHT = 2**32
MAX_CLIP = 1e6

RunId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Round = Annotated[int, Field(ge=1, le=2**63 - 1)]
Key = Annotated[bytes, Field(min_length=KEY_SIZE, max_length=KEY_SIZE)]
Digest = Annotated[bytes, Field(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
Tag = Annotated[bytes, Field(min_length=TAG_SIZE, max_length=TAG_SIZE)]
Share = Annotated[bytes, Field(min_length=SHARE_SIZE, max_length=SHARE_SIZE)]
Sealed = Annotated[bytes, Field(min_length=SEALED_SHARES_SIZE, max_length=SEALED_SHARES_SIZE)]
SiteList = Annotated[list[SiteName], Field(max_length=MAX_SITES)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="base64", val_json_bytes="base64")
    MAX_BYTES: ClassVar[int] = 64 * 1024

    protocol: Literal[1] = SECAGG_PROTOCOL
    run_id: RunId
    round: Round


# ----------------------------------------------------------------------------- parameters


class SecAggParams(BaseModel):
    """What every participant must agree on for one round. ``neighbours`` (k) counts a site's
    neighbourhood including itself (k == number of sites: every pair); ``threshold`` (t) is how
    many holders of a site's shares must answer to rebuild its secrets. A weighted update
    contributes ``weight * q(update)`` with q(u) = round(clip(u, -clip, clip) * levels / clip),
    and ``weight`` in one extra slot, all modulo 2^mod_bits."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    run_id: RunId
    round: Round
    vector_length: int = Field(ge=1, le=MAX_VECTOR_LENGTH)
    clip: float = Field(gt=0, le=MAX_CLIP, allow_inf_nan=False)
    levels: int = Field(ge=1, le=MAX_LEVELS)
    max_weight: int = Field(ge=1, le=MAX_WEIGHT)
    mod_bits: Literal[32, 64]
    neighbours: int = Field(ge=2, le=MAX_SITES)
    threshold: int = Field(ge=2, le=MAX_SITES)


class RosterEntry(BaseModel):
    """One attested participant: the two secagg public keys its evidence binds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="base64", val_json_bytes="base64")

    site: SiteName
    channel_key: Key
    mask_key: Key


# ----------------------------------------------------------------------------- share-keys


class ShareKeysRequest(_Msg):
    """Aggregator -> every attested site: the parameters and the roster of attested keys."""

    MAX_BYTES: ClassVar[int] = 512 + MAX_SITES * 256
    stage: Literal["share-keys"] = "share-keys"
    params: SecAggParams
    roster: list[RosterEntry] = Field(min_length=2, max_length=MAX_SITES)


class SealedShares(BaseModel):
    """A site's two shares for one peer, AES-GCM sealed under their pairwise channel key;
    ``peer`` is the receiver in a ShareKeysResponse and the sender in a MaskedInputRequest."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="base64", val_json_bytes="base64")

    peer: SiteName
    ciphertext: Sealed


class ShareCommitment(BaseModel):
    """SHA-256 commitments to the two shares one holder got, so the aggregator can tell a
    corrupted revealed share from a good one."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="base64", val_json_bytes="base64")

    holder: SiteName
    self_mask_share: Digest
    mask_key_share: Digest


class ShareKeysResponse(_Msg):
    """Site -> aggregator: shares for each neighbour, the commitments, the self-mask seed's
    commitment."""

    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * (2 * 128 + 4 * SEALED_SHARES_SIZE)
    stage: Literal["share-keys"] = "share-keys"
    site: SiteName
    sealed: list[SealedShares] = Field(max_length=MAX_SITES)
    commitments: list[ShareCommitment] = Field(min_length=1, max_length=MAX_SITES)
    self_mask_commitment: Digest


# ----------------------------------------------------------------------------- masked-input


class MaskedInputRequest(_Msg):
    """Aggregator -> one site: the shares its neighbours sealed to it."""

    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * (128 + 2 * SEALED_SHARES_SIZE)
    stage: Literal["masked-input"] = "masked-input"
    site: SiteName
    sealed: list[SealedShares] = Field(max_length=MAX_SITES)


class MaskedInput(_Msg):
    """Site -> aggregator: the neighbours it masked with and its masked vector (vector_length
    + 1 little-endian integers modulo 2^mod_bits; the last one is the masked weight)."""

    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * 80  # the JSON header; the vector is beside
    stage: Literal["masked-input"] = "masked-input"
    site: SiteName
    mask_peers: SiteList
    vector: bytes = Field(max_length=(MAX_VECTOR_LENGTH + 1) * 8)


# ----------------------------------------------------------------------------- consistency


class ConsistencyRequest(_Msg):
    """Aggregator -> each site whose masked input it kept: the survivor set (whose inputs are
    in the sum). Every site tags it for its neighbours, so all agree on one set."""

    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * 80
    stage: Literal["consistency"] = "consistency"
    site: SiteName
    survivors: list[SiteName] = Field(min_length=1, max_length=MAX_SITES)


class PeerTag(BaseModel):
    """HMAC over the survivor set under a pairwise key; ``peer`` is the receiver in a
    ConsistencyResponse and the sender in an UnmaskRequest."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="base64", val_json_bytes="base64")

    peer: SiteName
    tag: Tag


class ConsistencyResponse(_Msg):
    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * 160
    stage: Literal["consistency"] = "consistency"
    site: SiteName
    tags: list[PeerTag] = Field(max_length=MAX_SITES)


# ----------------------------------------------------------------------------- unmask


class UnmaskRequest(_Msg):
    """Aggregator -> each site that confirmed the survivor set: its neighbours' tags, whose
    self-mask shares (survivors) and whose mask-key shares (dropped sites) to reveal."""

    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * 320
    stage: Literal["unmask"] = "unmask"
    site: SiteName
    tags: list[PeerTag] = Field(max_length=MAX_SITES)
    reveal_self_mask: SiteList
    reveal_mask_key: SiteList


class RevealedShare(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="base64", val_json_bytes="base64")

    owner: SiteName
    share: Share


class UnmaskResponse(_Msg):
    MAX_BYTES: ClassVar[int] = 1024 + MAX_SITES * 2 * 200
    stage: Literal["unmask"] = "unmask"
    site: SiteName
    self_mask_shares: list[RevealedShare] = Field(max_length=MAX_SITES)
    mask_key_shares: list[RevealedShare] = Field(max_length=MAX_SITES)


Message = (ShareKeysRequest | ShareKeysResponse | MaskedInputRequest | MaskedInput
           | ConsistencyRequest | ConsistencyResponse | UnmaskRequest | UnmaskResponse)
M = TypeVar("M", bound=_Msg)


def _fields(exc: ValidationError) -> str:
    return ", ".join(".".join(str(p) for p in e["loc"]) or "(top level)"
                     for e in exc.errors()[:10])


def encode(message: _Msg) -> bytes:
    """The JSON bytes of a message (MaskedInput: prefer :func:`masked_input_parts`)."""
    return message.model_dump_json().encode()


def decode(kind: type[M], data: bytes | str) -> M:
    """Parse ``data`` as a ``kind`` message; SecAggMessageError naming every bad field, or the
    size, instead of a pydantic traceback."""
    size = len(data)
    limit = kind.MAX_BYTES if kind is not MaskedInput else kind.MAX_BYTES + math.ceil(
        (MAX_VECTOR_LENGTH + 1) * 8 * 4 / 3) + 16
    if size > limit:
        raise SecAggMessageError(f"{kind.__name__} of {size} bytes exceeds {limit}",
                                 code="oversized")
    try:
        return kind.model_validate_json(data)
    except ValidationError as exc:
        raise SecAggMessageError(f"{kind.__name__} is malformed ({_fields(exc)})") from None


def masked_input_parts(message: MaskedInput) -> tuple[bytes, bytes]:
    """(JSON header, raw vector): the vector travels beside the header, not base64 in it."""
    return message.model_dump_json(exclude={"vector"}).encode(), message.vector


def masked_input_from_parts(header: bytes | str, vector: bytes) -> MaskedInput:
    if len(header) > MaskedInput.MAX_BYTES:
        raise SecAggMessageError(f"MaskedInput header of {len(header)} bytes exceeds "
                                 f"{MaskedInput.MAX_BYTES}", code="oversized")
    if not isinstance(vector, bytes):
        raise SecAggMessageError("MaskedInput vector must be bytes")
    try:
        fields = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise SecAggMessageError("MaskedInput header is not JSON") from None
    if not isinstance(fields, dict) or "vector" in fields:
        raise SecAggMessageError("MaskedInput header must be an object without a vector")
    try:
        return MaskedInput.model_validate({**fields, "vector": vector})
    except ValidationError as exc:
        raise SecAggMessageError(f"MaskedInput is malformed ({_fields(exc)})") from None
