"""Little-endian field readers shared by the SEV-SNP and TDX parsers (callers check lengths)."""

from __future__ import annotations

import struct


def u16(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", buf, off)[0])


def u32(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", buf, off)[0])


def u64(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", buf, off)[0])


def raw(buf: bytes, off: int, size: int) -> bytes:
    return bytes(buf[off:off + size])
