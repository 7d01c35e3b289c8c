"""Secure-aggregation wire messages: round trips, and every malformed or oversized message
refused with SecAggMessageError (never a pydantic or JSON traceback)."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.errors import SecAggMessageError
from cleanroom.protocol import secagg_wire as w
from cleanroom.protocol.secagg import SiteSecAgg, make_params

KEY = b"\x01" * 32


def _roster(n=3):
    return [SiteSecAgg(f"s{i}", "run", 1).advertisement.roster_entry(f"s{i}") for i in range(n)]


def samples() -> list[w._Msg]:
    params = make_params("run", 1, n_sites=3, vector_length=4, clip=1.0)
    sealed = w.SealedShares(peer="s1", ciphertext=b"\x02" * w.SEALED_SHARES_SIZE)
    return [
        w.ShareKeysRequest(run_id="run", round=1, params=params, roster=_roster()),
        w.ShareKeysResponse(run_id="run", round=1, site="s0", sealed=[sealed],
                            commitments=[w.ShareCommitment(holder="s0", self_mask_share=KEY,
                                                           mask_key_share=KEY)],
                            self_mask_commitment=KEY),
        w.MaskedInputRequest(run_id="run", round=1, site="s0", sealed=[sealed]),
        w.MaskedInput(run_id="run", round=1, site="s0", mask_peers=["s1"], vector=b"\x00" * 20),
        w.ConsistencyRequest(run_id="run", round=1, site="s0", survivors=["s0", "s1"]),
        w.ConsistencyResponse(run_id="run", round=1, site="s0",
                              tags=[w.PeerTag(peer="s1", tag=KEY)]),
        w.UnmaskRequest(run_id="run", round=1, site="s0", tags=[w.PeerTag(peer="s1", tag=KEY)],
                        reveal_self_mask=["s0"], reveal_mask_key=["s2"]),
        w.UnmaskResponse(run_id="run", round=1, site="s0",
                         self_mask_shares=[w.RevealedShare(owner="s0", share=b"\x03" * 66)],
                         mask_key_shares=[]),
    ]


@pytest.mark.parametrize("message", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert w.decode(type(message), w.encode(message)) == message


def test_masked_input_travels_as_header_and_raw_vector():
    message = samples()[3]
    header, vector = w.masked_input_parts(message)
    assert b"vector" not in header and vector == message.vector
    assert w.masked_input_from_parts(header, vector) == message


def _mutate(message: w._Msg, path: list, value: object) -> str:
    doc = json.loads(w.encode(message))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(doc)


B64 = base64.b64encode


@pytest.mark.parametrize("index,path,value", [
    (0, ["roster"], []),                                          # fewer than two sites
    (0, ["roster", 0, "channel_key"], B64(b"\x01" * 31).decode()),  # short key
    (0, ["roster", 0, "site"], "../etc"),                         # not a site name
    (0, ["params", "threshold"], 1),
    (0, ["params", "mod_bits"], 48),
    (0, ["params", "clip"], "NaN"),
    (0, ["params", "round"], "1"),                                # strict: no string numbers
    (0, ["round"], True),
    (0, ["protocol"], 2),
    (0, ["stage"], "unmask"),                                     # wrong stage name
    (1, ["sealed", 0, "ciphertext"], B64(b"\x02" * 100).decode()),  # wrong sealed size
    (1, ["self_mask_commitment"], "not base64!"),
    (1, ["extra"], 1),                                            # unknown field
    (4, ["survivors"], []),
    (5, ["tags", 0, "tag"], B64(b"\x01" * 16).decode()),
    (7, ["self_mask_shares", 0, "share"], B64(b"\x03" * 65).decode()),
    (3, ["mask_peers"], "s1"),
])
def test_malformed_messages_are_refused(index, path, value):
    message = samples()[index]
    with pytest.raises(SecAggMessageError, match="malformed"):
        w.decode(type(message), _mutate(message, path, value))


def test_oversized_messages_are_refused_before_parsing():
    big = b"{" + b" " * (w.ConsistencyRequest.MAX_BYTES + 1) + b"}"
    with pytest.raises(SecAggMessageError, match="exceeds") as err:
        w.decode(w.ConsistencyRequest, big)
    assert err.value.code == "oversized"


def test_too_many_sites_are_refused():
    message = samples()[4]
    names = [f"s{i}" for i in range(w.MAX_SITES + 1)]
    with pytest.raises(SecAggMessageError):
        w.decode(w.ConsistencyRequest, _mutate(message, ["survivors"], names))


@pytest.mark.parametrize("header,vector", [
    (b"not json", b""), (b"[1]", b""), (b'{"vector": "AA=="}', b""),
    (json.dumps({"run_id": "run", "round": 1, "site": "s0", "mask_peers": []}).encode(), "str"),
    (json.dumps({"run_id": "run", "round": 1, "site": "s0"}).encode(), b""),
    (b" " * (w.MaskedInput.MAX_BYTES + 1), b""),
])
def test_malformed_masked_input_parts_are_refused(header, vector):
    with pytest.raises(SecAggMessageError):
        w.masked_input_from_parts(header, vector)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode),
       st.sampled_from([type(m) for m in samples()]))
def test_arbitrary_bytes_give_only_typed_errors(data, kind):
    with contextlib.suppress(SecAggMessageError):  # anything else fails the test
        w.decode(kind, data)


def test_the_largest_legitimate_messages_fit_their_bounds():
    """1000 sites with 64-character names: every message a full round can produce decodes."""
    names = [f"{i:04d}" + "x" * 60 for i in range(w.MAX_SITES)]
    entry = {"channel_key": KEY, "mask_key": b"\x02" * 32}
    params = make_params("r" * 128, 2**62, n_sites=w.MAX_SITES, vector_length=10, clip=1.0,
                         neighbours=w.MAX_SITES)
    sealed = [w.SealedShares(peer=n, ciphertext=b"\x02" * w.SEALED_SHARES_SIZE)
              for n in names[1:]]
    tags = [w.PeerTag(peer=n, tag=KEY) for n in names[1:]]
    shares = [w.RevealedShare(owner=n, share=b"\x03" * 66) for n in names]
    head = {"run_id": "r" * 128, "round": 2**62}
    for message in [
        w.ShareKeysRequest(**head, params=params,
                           roster=[w.RosterEntry(site=n, **entry) for n in names]),
        w.ShareKeysResponse(**head, site=names[0], sealed=sealed, self_mask_commitment=KEY,
                            commitments=[w.ShareCommitment(holder=n, self_mask_share=KEY,
                                                           mask_key_share=KEY) for n in names]),
        w.MaskedInputRequest(**head, site=names[0], sealed=sealed),
        w.ConsistencyRequest(**head, site=names[0], survivors=names),
        w.ConsistencyResponse(**head, site=names[0], tags=tags),
        w.UnmaskRequest(**head, site=names[0], tags=tags, reveal_self_mask=names[:500],
                        reveal_mask_key=names[500:]),
        w.UnmaskResponse(**head, site=names[0], self_mask_shares=shares[:500],
                         mask_key_shares=shares[500:]),
    ]:
        assert w.decode(type(message), w.encode(message)) == message
    big = w.MaskedInput(**head, site=names[0], mask_peers=names[1:], vector=b"\x00" * 80)
    assert w.masked_input_from_parts(*w.masked_input_parts(big)) == big
