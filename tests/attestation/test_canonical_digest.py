"""Canonical evidence digests: one piece of evidence, one digest.

Unsigned variations (padding after a TDX quote, the reserved tail of an SNP signature field, PEM
line breaks or NUL padding of the PCK chain, the (r, n - s) twin of an ECDSA signature) keep the
digest; any signed byte, or another signature value, changes it. ``verify_evidence`` records it
as ``Verdict.evidence_sha256``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from cleanroom.attestation.abi import snp as snp_abi
from cleanroom.attestation.abi import tdx as tdx_abi
from cleanroom.attestation.evidence import Endorsements, verify_evidence
from cleanroom.attestation.registry import canonical_evidence_digest
from cleanroom.attestation.validate.policy import Policy
from cleanroom.errors import ParseError, UnsupportedFormatError
from tests.attestation.test_tdx import AT_REAL, DCAP_QVL, load_hex

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SNP = next(e for e in json.loads((VECTORS / "manifest.json").read_text())
           if e["format"] == "sev-snp" and e["signature_verifies"])
SNP_AT = dt.datetime.fromisoformat(SNP["verify_at"].replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def report() -> bytes:
    return (VECTORS / SNP["file"]).read_bytes()


@pytest.fixture(scope="module")
def vcek() -> bytes:
    return (VECTORS / SNP["cert"]).read_bytes()


@pytest.fixture(scope="module")
def quote() -> bytes:
    return load_hex(DCAP_QVL / "quote-from-tappd.hex")


def flip(data: bytes, offset: int) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= 0x01
    return bytes(buf)


# ------------------------------------------------------------------------------------ SEV-SNP


def snp_twin(report: bytes) -> bytes:
    """The same report with S replaced by n - S (still a valid signature)."""
    size = snp_abi.ECDSA_P384_COMPONENT_SIZE
    off = snp_abi.OFF_SIGNATURE + size
    s = int.from_bytes(report[off:off + size], "little")
    buf = bytearray(report)
    buf[off:off + size] = (snp_abi.P384_ORDER - s).to_bytes(size, "little")
    return bytes(buf)


def test_snp_digest_ignores_the_reserved_signature_tail(report: bytes, vcek: bytes) -> None:
    tail = snp_abi.OFF_SIGNATURE + 2 * snp_abi.ECDSA_P384_COMPONENT_SIZE
    padded = report[:tail] + b"\xa5" * (snp_abi.REPORT_SIZE - tail)
    assert padded != report
    assert canonical_evidence_digest(padded) == canonical_evidence_digest(report)
    policy = Policy(vmpl=None)
    one = verify_evidence(report, policy=policy, at=SNP_AT, endorsements=Endorsements(vcek))
    two = verify_evidence(padded, policy=policy, at=SNP_AT, endorsements=Endorsements(vcek))
    assert one.accepted and two.accepted, two.reasons  # unsigned: still verifies
    assert one.evidence_sha256 == two.evidence_sha256 == canonical_evidence_digest(report)
    assert one.evidence_sha256 != hashlib.sha256(report).hexdigest()


def test_snp_digest_is_the_same_for_the_signature_twin(report: bytes, vcek: bytes) -> None:
    twin = snp_twin(report)
    verdict = verify_evidence(twin, policy=Policy(vmpl=None), at=SNP_AT,
                              endorsements=Endorsements(vcek))
    assert verdict.accepted, verdict.reasons  # ECDSA malleability: (r, n - s) verifies
    assert verdict.evidence_sha256 == canonical_evidence_digest(report)


@pytest.mark.parametrize("offset", [snp_abi.OFF_REPORT_DATA, snp_abi.OFF_MEASUREMENT,
                                    snp_abi.SIGNED_LENGTH - 1, snp_abi.OFF_SIGNATURE])
def test_snp_digest_changes_with_signed_content_or_signature(report: bytes,
                                                             offset: int) -> None:
    assert canonical_evidence_digest(flip(report, offset)) != canonical_evidence_digest(report)


# ------------------------------------------------------------------------------------ TDX


def rebuild(quote: bytes, *, pem: bytes | None = None, signature: bytes | None = None,
            trailing: bytes = b"") -> bytes:
    """``quote`` with another PCK chain text and/or quote signature, sizes fixed up."""
    parsed = tdx_abi.parse_quote(quote)
    cert = parsed.certification
    pem = cert.pck_chain_pem if pem is None else pem
    start = parsed.signed_length + 4
    signature = quote[start:start + 64] if signature is None else signature
    qe = quote[start + 128 + 6:start + 128 + 6 + 384 + 64]
    inner = struct.pack("<HI", tdx_abi.CERT_DATA_TYPE_PCK_CHAIN, len(pem)) + pem
    qe_data = qe + struct.pack("<H", len(cert.qe_auth_data)) + cert.qe_auth_data + inner
    sig_data = signature + parsed.attestation_key + \
        struct.pack("<HI", tdx_abi.CERT_DATA_TYPE_QE_REPORT, len(qe_data)) + qe_data
    return parsed.signed_bytes + struct.pack("<I", len(sig_data)) + sig_data + trailing


def rewrapped_pem(pem: bytes) -> bytes:
    """The same certificates as PEM with 76-character lines and CRLF line ends."""
    out = b""
    for cert in tdx_abi.parse_pem_chain(pem):
        b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER))
        lines = [b64[i:i + 76] for i in range(0, len(b64), 76)]
        out += b"-----BEGIN CERTIFICATE-----\r\n" + b"\r\n".join(lines) + \
            b"\r\n-----END CERTIFICATE-----\r\n"
    return out


def test_tdx_digest_ignores_padding_after_the_quote(quote: bytes) -> None:
    parsed = tdx_abi.parse_quote(quote)
    assert parsed.trailing_bytes == 70
    base = canonical_evidence_digest(quote)
    for tail in (b"", b"\x00" * 3000, b"\xff" * 7):
        variant = quote[:len(parsed.raw)] + tail
        assert canonical_evidence_digest(variant) == base
        verdict = verify_evidence(variant, policy=Policy(), at=AT_REAL)
        assert verdict.accepted and verdict.evidence_sha256 == base, verdict.reasons


def test_tdx_digest_ignores_pem_layout_and_nul_padding(quote: bytes) -> None:
    pem = tdx_abi.parse_quote(quote).certification.pck_chain_pem
    for new_pem in (rewrapped_pem(pem), pem.rstrip(b"\x00") + b"\x00" * 40):
        variant = rebuild(quote, pem=new_pem)
        assert variant[:len(quote) - 70] != quote[:len(quote) - 70]
        verdict = verify_evidence(variant, policy=Policy(), at=AT_REAL)
        assert verdict.accepted, verdict.reasons
        assert verdict.evidence_sha256 == canonical_evidence_digest(quote)


def test_tdx_digest_is_the_same_for_the_signature_twin(quote: bytes) -> None:
    start = tdx_abi.parse_quote(quote).signed_length + 4
    r, s = quote[start:start + 32], int.from_bytes(quote[start + 32:start + 64], "big")
    twin = rebuild(quote, signature=r + (tdx_abi.P256_ORDER - s).to_bytes(32, "big"))
    verdict = verify_evidence(twin, policy=Policy(), at=AT_REAL)
    assert verdict.accepted, verdict.reasons
    assert verdict.evidence_sha256 == canonical_evidence_digest(quote)


def test_tdx_digest_changes_with_signed_content_or_signature(quote: bytes) -> None:
    parsed = tdx_abi.parse_quote(quote)
    base = canonical_evidence_digest(quote)
    report_data = tdx_abi.HEADER_SIZE + tdx_abi.BODY_OFF_REPORT_DATA
    qe_report = parsed.signed_length + 4 + 128 + 6
    for offset in (tdx_abi.OFF_USER_DATA, report_data, parsed.signed_length + 4,
                   parsed.signed_length + 4 + 64, qe_report + tdx_abi.QE_OFF_ISV_SVN):
        assert canonical_evidence_digest(flip(quote, offset)) != base, offset
    other = load_hex(DCAP_QVL / "tdx-quote.hex")
    assert canonical_evidence_digest(other) != base


def test_unparsable_evidence_has_no_canonical_digest_and_a_raw_one_in_the_verdict() -> None:
    junk = b"\x07" * 100
    with pytest.raises(UnsupportedFormatError):
        canonical_evidence_digest(junk)
    truncated = load_hex(DCAP_QVL / "quote-from-tappd.hex")[:700]
    with pytest.raises(ParseError):
        canonical_evidence_digest(truncated)
    verdict = verify_evidence(truncated, policy=Policy(), at=AT_REAL)
    assert verdict.evidence_sha256 == hashlib.sha256(truncated).hexdigest()
