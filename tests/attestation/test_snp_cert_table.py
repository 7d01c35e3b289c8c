"""The SEV-SNP certificate table the host returns with an extended report: parsed strictly.

The host is not trusted; each hostile table below is refused with a :class:`ParseError` naming
the entry, and the honest tables (including the real AWS VLEK, wrapped as AWS's host wraps it)
give back the certificate bytes unchanged.
"""

from __future__ import annotations

import itertools
import re
import struct
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.attestation.abi import snp_cert_table as ct
from cleanroom.attestation.abi.amd_cert import load_certificates, pick_key_certificate
from cleanroom.errors import ParseError

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def entry(guid: uuid.UUID | bytes, offset: int, length: int) -> bytes:
    raw = guid.bytes_le if isinstance(guid, uuid.UUID) else guid
    return raw + struct.pack("<II", offset, length)


def table(certs: list[tuple[uuid.UUID, bytes]], *, padding: int = 0) -> bytes:
    """An honest table: entries, terminator, then the certificates back to back."""
    offset = ct.ENTRY_SIZE * (len(certs) + 1)
    head, blobs = b"", b""
    for guid, blob in certs:
        head += entry(guid, offset + len(blobs), len(blob))
        blobs += blob
    return head + bytes(ct.ENTRY_SIZE) + blobs + bytes(padding)


def test_honest_table_with_the_real_aws_vlek() -> None:
    vlek_pem = (VECTORS / "snp" / "milan_v2_vlek_aws_constellation_vlek.pem").read_bytes()
    vlek_der = pick_key_certificate(load_certificates(vlek_pem)).public_bytes(
        serialization.Encoding.DER)
    # AWS puts the VLEK alone in a one-entry table: data at 0x30, as in PROVENANCE.md.
    raw = table([(ct.GUID_VLEK, vlek_der)], padding=4096 - 0x30 - len(vlek_der))
    parsed = ct.parse_cert_table(raw)
    assert [e.name for e in parsed.entries] == ["VLEK"] and parsed.entries[0].offset == 0x30
    assert parsed.key_certificate() == vlek_der
    assert pick_key_certificate(load_certificates(parsed.key_certificate() or b""))


def test_honest_table_with_three_certificates() -> None:
    raw = table([(ct.GUID_ARK, b"ark" * 100), (ct.GUID_ASK, b"ask" * 100),
                 (ct.GUID_VCEK, b"vcek" * 50)])
    parsed = ct.parse_cert_table(raw)
    assert [e.name for e in parsed.entries] == ["ARK", "ASK", "VCEK"]
    assert parsed.key_certificate() == b"vcek" * 50 and parsed.get(ct.GUID_VLEK) is None
    assert ct.parse_cert_table(bytes(24)).entries == ()  # empty table: just the terminator


def vcek_at(offset: int, length: int, *, extra: bytes = b"", size: int = 200) -> bytes:
    head = entry(ct.GUID_VCEK, offset, length) + extra + bytes(ct.ENTRY_SIZE)
    return head + bytes(max(0, size - len(head)))


HOSTILE: list[tuple[str, bytes, str]] = [
    ("offset past the end", vcek_at(4000, 10), "out of range"),
    ("length past the end", vcek_at(48, 10_000), "out of range"),
    ("u32 wrap-around", vcek_at(0xFFFFFFF0, 0x20), "out of range"),
    ("zero length", vcek_at(48, 0), "length 0"),
    ("data inside the entry list", vcek_at(8, 16), "inside the entry list"),
    ("overlapping entries", vcek_at(72, 40, extra=entry(ct.GUID_ASK, 100, 40)),
     "overlap entry[0] (VCEK)"),
    ("same GUID twice", vcek_at(72, 10, extra=entry(ct.GUID_VCEK, 90, 10)), "appears twice"),
    ("no terminator", entry(ct.GUID_VCEK, 24, 1) + b"x", "no terminating entry"),
    ("zero GUID with data", entry(bytes(16), 48, 4) + bytes(60), "zero GUID"),
    ("huge entry count", b"".join(entry(uuid.UUID(int=i + 1), 0, 1) for i in range(40))
     + bytes(24), f"more than {ct.MAX_ENTRIES} entries"),
    ("oversized table", bytes(24) + bytes(ct.MAX_TABLE_SIZE), "limit"),
]


@pytest.mark.parametrize(("data", "needle"), [(d, n) for _, d, n in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_hostile_tables_are_refused(data: bytes, needle: str) -> None:
    with pytest.raises(ParseError, match=re.escape(needle)):
        ct.parse_cert_table(data)


def test_not_bytes() -> None:
    with pytest.raises(ParseError, match="expected bytes"):
        ct.parse_cert_table("table")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_tables_only_typed_errors(data: bytes) -> None:
    try:
        parsed = ct.parse_cert_table(data)
    except ParseError:
        return
    spans = sorted((e.offset, e.offset + len(e.data)) for e in parsed.entries)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert all(e.data and e.offset + len(e.data) <= len(data) for e in parsed.entries)
