"""The SEV-SNP certificate table: bytes -> typed, immutable structure, and nothing else.

The host returns it with an extended report (``SNP_GET_EXT_REPORT``, or configfs-tsm's
``auxblob``): AMD GHCB specification (pub. 56421), "SNP Extended Guest Request", certificate
table. It is a list of 24-byte entries (16-byte GUID in little-endian UUID layout, u32 offset,
u32 length; offsets from the start of the table), ended by an all-zero entry, followed by the
certificates the entries point to::

    entry 0 | entry 1 | ... | 24 zero bytes | certificate data ... | (zero padding)

The host is not trusted, so the table is parsed strictly: at most :data:`MAX_ENTRIES` entries,
the whole table at most :data:`MAX_TABLE_SIZE` bytes, every entry's data inside the buffer and
after the terminator, no two entries' data overlapping, no GUID twice, no empty entry. What the
certificates are worth is decided later: the verifier chains them to pinned roots.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from cleanroom.errors import ParseError

ENTRY_SIZE = 24
GUID_SIZE = 16
OFF_ENTRY_OFFSET = 16
OFF_ENTRY_LENGTH = 20
MAX_ENTRIES = 32  # real tables hold ARK, ASK, VCEK or VLEK, maybe a CRL
MAX_TABLE_SIZE = 64 * 1024

# GUIDs of the certificate table (GHCB specification).
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
GUID_NAMES = {GUID_VCEK: "VCEK", GUID_VLEK: "VLEK", GUID_ASK: "ASK", GUID_ARK: "ARK"}


@dataclass(frozen=True)
class CertTableEntry:
    """One certificate of the table: its GUID, where it was, and its bytes."""

    guid: uuid.UUID
    offset: int
    data: bytes

    @property
    def name(self) -> str:
        return GUID_NAMES.get(self.guid, str(self.guid))


@dataclass(frozen=True)
class CertTable:
    """A parsed certificate table, entries in table order."""

    entries: tuple[CertTableEntry, ...]

    def get(self, guid: uuid.UUID) -> bytes | None:
        for entry in self.entries:
            if entry.guid == guid:
                return entry.data
        return None

    def key_certificate(self) -> bytes | None:
        """The certificate of the key that signs reports: the VCEK, else the VLEK, else None."""
        return self.get(GUID_VCEK) or self.get(GUID_VLEK)

    def as_dict(self) -> dict[uuid.UUID, bytes]:
        return {entry.guid: entry.data for entry in self.entries}


def _entry_name(index: int, guid: uuid.UUID) -> str:
    return f"entry[{index}] ({GUID_NAMES.get(guid, guid)})"


def parse_cert_table(data: bytes) -> CertTable:
    """Parse a certificate table; :class:`ParseError` names the entry and what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("cert_table", f"expected bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) > MAX_TABLE_SIZE:
        raise ParseError("cert_table", f"is {len(buf)} bytes, limit {MAX_TABLE_SIZE}")
    raw_entries: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + ENTRY_SIZE > len(buf):
            raise ParseError("cert_table", f"has no terminating entry (all-zero, {ENTRY_SIZE} "
                             f"bytes) within its {len(buf)} bytes")
        guid_bytes = buf[pos:pos + GUID_SIZE]
        offset, length = struct.unpack_from("<II", buf, pos + OFF_ENTRY_OFFSET)
        pos += ENTRY_SIZE
        if guid_bytes == bytes(GUID_SIZE):
            if offset or length:
                raise ParseError(f"cert_table.entry[{len(raw_entries)}]",
                                 f"has a zero GUID but offset {offset}, length {length}: "
                                 "expect an all-zero terminator")
            break
        if len(raw_entries) == MAX_ENTRIES:
            raise ParseError("cert_table", f"has more than {MAX_ENTRIES} entries")
        raw_entries.append((uuid.UUID(bytes_le=guid_bytes), offset, length))
    table_end = pos
    entries: list[CertTableEntry] = []
    spans: list[tuple[int, int, str]] = []
    for index, (guid, offset, length) in enumerate(raw_entries):
        name = _entry_name(index, guid)
        if length == 0:
            raise ParseError(f"cert_table.{name}", "has length 0")
        if offset < table_end:
            raise ParseError(f"cert_table.{name}", f"offset {offset} is inside the entry list "
                             f"(which ends at {table_end})")
        if offset + length > len(buf):
            raise ParseError(f"cert_table.{name}", f"is out of range: offset {offset} + length "
                             f"{length} is past the end of the {len(buf)}-byte table")
        if any(e.guid == guid for e in entries):
            raise ParseError(f"cert_table.{name}", "appears twice")
        for start, end, other in spans:
            if offset < end and start < offset + length:
                raise ParseError(f"cert_table.{name}", f"bytes {offset}..{offset + length} "
                                 f"overlap {other} (bytes {start}..{end})")
        spans.append((offset, offset + length, name))
        entries.append(CertTableEntry(guid=guid, offset=offset,
                                      data=buf[offset:offset + length]))
    return CertTable(tuple(entries))
