"""Helpers to build (and deliberately break) SEV-SNP reports with the simulated chain."""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cleanroom.attestation.abi import snp as abi


def resign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Recompute the signature of ``report`` with ``key`` (as a genuine AMD-SP would)."""
    buf = bytearray(report)
    r, s = decode_dss_signature(key.sign(bytes(buf[:abi.SIGNED_LENGTH]),
                                         ec.ECDSA(hashes.SHA384())))
    size = abi.ECDSA_P384_COMPONENT_SIZE
    buf[abi.OFF_SIGNATURE:abi.OFF_SIGNATURE + abi.SIGNATURE_SIZE] = bytes(abi.SIGNATURE_SIZE)
    buf[abi.OFF_SIGNATURE:abi.OFF_SIGNATURE + size] = r.to_bytes(size, "little")
    buf[abi.OFF_SIGNATURE + size:abi.OFF_SIGNATURE + 2 * size] = s.to_bytes(size, "little")
    return bytes(buf)


def patch(report: bytes, offset: int, value: bytes) -> bytes:
    buf = bytearray(report)
    buf[offset:offset + len(value)] = value
    return bytes(buf)


def patch_u32(report: bytes, offset: int, value: int) -> bytes:
    return patch(report, offset, struct.pack("<I", value))


def patch_u64(report: bytes, offset: int, value: int) -> bytes:
    return patch(report, offset, struct.pack("<Q", value))
