"""TDX quotes: parse and verify real quotes, and break them one way at a time.

Real vectors live in ``tests/vectors/tdx/`` (see ``tests/vectors/PROVENANCE.md``). Negative paths
that a real quote cannot reach (another PCK, a v5 body, a bad extension...) use a self-made PKI
built here: a fake root -> "Intel SGX PCK Platform CA" -> PCK carrying SGX extensions, and quotes
signed exactly as a Quoting Enclave would sign them. The fake root is never the pinned one.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanroom.attestation.abi import tdx as abi
from cleanroom.attestation.trust import INTEL_TD_QE_MRSIGNER, fingerprint, intel_sgx_root
from cleanroom.attestation.verify.tdx import verify_tdx
from cleanroom.errors import CertificateError, ParseError, UnsupportedFormatError

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "tdx"
DCAP_QVL = VECTORS / "dcap-qvl"
REAL_QUOTES = ("quote-from-tappd.hex", "tdx-quote.hex")
GCP_QUOTE = VECTORS / "teekit" / "tdx-v4-gcp-no-nonce.json"
UTC = dt.UTC
AT_REAL = dt.datetime(2025, 3, 20, tzinfo=UTC)  # inside every real certificate's validity
AT_GCP = dt.datetime(2025, 6, 1, tzinfo=UTC)  # GCP PCK certificate issued 2025-03-06
INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
P256_N = int("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551", 16)


def load_hex(path: Path) -> bytes:
    text = path.read_text().strip()
    return bytes.fromhex(text[2:] if text.startswith("0x") else text)


def load_gcp() -> bytes:
    return base64.b64decode(json.loads(GCP_QUOTE.read_text())["tdx"]["quote"], validate=True)


@pytest.fixture(scope="module", params=REAL_QUOTES)
def real_quote(request: pytest.FixtureRequest) -> bytes:
    return load_hex(DCAP_QVL / request.param)


REAL_CASES = {"dcap-qvl/" + name: (lambda n=name: load_hex(DCAP_QVL / n), AT_REAL)
              for name in REAL_QUOTES}
REAL_CASES["teekit/gcp"] = (load_gcp, AT_GCP)


@pytest.fixture(scope="module", params=sorted(REAL_CASES))
def any_real(request: pytest.FixtureRequest) -> tuple[bytes, dt.datetime]:
    loader, at = REAL_CASES[request.param]
    return loader(), at


@pytest.fixture(scope="module")
def tappd() -> bytes:
    return load_hex(DCAP_QVL / REAL_QUOTES[0])


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= mask
    return bytes(buf)


def failed_names(verification) -> set[str]:  # type: ignore[no-untyped-def]
    return {c.name for c in verification.checks if not c.passed}


# --------------------------------------------------------------------------- synthetic PKI / quotes


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(oid) + value)


def sgx_extension_der(*, components: tuple[int, ...], pcesvn: int, fmspc: bytes,
                      pce_id: bytes = b"\x00\x00", ppid: bytes = b"\x11" * 16,
                      sgx_type: int = 1, drop: str | None = None) -> bytes:
    """Intel's SGX extension SEQUENCE, as a PCK certificate carries it."""
    tcb = b"".join(_pair(f"{abi.OID_TCB}.{i + 1}", _int(svn)) for i, svn in enumerate(components))
    tcb += _pair(abi.OID_PCESVN, _int(pcesvn)) + _pair(abi.OID_CPUSVN,
                                                      _tlv(0x04, bytes(components)))
    entries = {
        abi.OID_PPID: _pair(abi.OID_PPID, _tlv(0x04, ppid)),
        abi.OID_TCB: _pair(abi.OID_TCB, _tlv(0x30, tcb)),
        abi.OID_PCE_ID: _pair(abi.OID_PCE_ID, _tlv(0x04, pce_id)),
        abi.OID_FMSPC: _pair(abi.OID_FMSPC, _tlv(0x04, fmspc)),
        abi.OID_SGX_TYPE: _pair(abi.OID_SGX_TYPE, _tlv(0x0A, bytes([sgx_type]))),
    }
    return _tlv(0x30, b"".join(v for k, v in entries.items() if k != drop))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cleanroom FL test")])


def make_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
              issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
              not_before: dt.datetime, not_after: dt.datetime, serial: int,
              extension: bytes | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(abi.SGX_EXTENSIONS_OID), extension),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


FAKE_FMSPC = bytes.fromhex("b0c06f000000")
FAKE_COMPONENTS = (4, 4, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)


@dataclass
class FakePki:
    """Self-made root -> 'Intel SGX PCK Platform CA' -> PCK, with the private keys."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey
    inter: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    not_before: dt.datetime
    not_after: dt.datetime
    extra: dict[str, object] = field(default_factory=dict)

    def chain_pem(self, with_root: bool = True) -> bytes:
        certs = [self.pck, self.inter] + ([self.root] if with_root else [])
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def make_pki(*, components: tuple[int, ...] = FAKE_COMPONENTS, pcesvn: int = 11,
             fmspc: bytes = FAKE_FMSPC, extension: bytes | None = None,
             pck_curve: ec.EllipticCurve | None = None) -> FakePki:
    nb = dt.datetime(2024, 1, 1, tzinfo=UTC)
    na = dt.datetime(2030, 1, 1, tzinfo=UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    pck_key = ec.generate_private_key(pck_curve or ec.SECP256R1())
    root = make_cert("Fake SGX Root CA", root_key, "Fake SGX Root CA", root_key, ca=True,
                     not_before=nb, not_after=na, serial=1)
    inter = make_cert("Intel SGX PCK Platform CA", inter_key, "Fake SGX Root CA", root_key,
                      ca=True, not_before=nb, not_after=na, serial=2)
    ext = extension if extension is not None else sgx_extension_der(
        components=components, pcesvn=pcesvn, fmspc=fmspc)
    pck = make_cert("Intel SGX PCK Certificate", pck_key, "Intel SGX PCK Platform CA", inter_key,
                    ca=False, not_before=nb, not_after=na, serial=0x1234567, extension=ext)
    return FakePki(root_key, root, inter_key, inter, pck_key, pck, nb, na)


def _sig_bytes(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    if not isinstance(key.curve, ec.SECP256R1):
        return bytes(64)  # a quote cannot carry a non-P-256 signature
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def make_body(body_type: int = abi.BODY_TYPE_TDX10, *, tee_tcb_svn: bytes | None = None,
              td_attributes: int = 0, report_data: bytes = b"\x42" * 64) -> bytes:
    body = bytearray(abi.BODY_SIZES[body_type])
    body[abi.BODY_OFF_TEE_TCB_SVN:abi.BODY_OFF_TEE_TCB_SVN + 16] = tee_tcb_svn or \
        bytes([5, 1, 5] + [0] * 13)
    struct.pack_into("<Q", body, abi.BODY_OFF_TD_ATTRIBUTES, td_attributes)
    body[abi.BODY_OFF_MR_TD:abi.BODY_OFF_MR_TD + 48] = b"\xaa" * 48
    body[abi.BODY_OFF_REPORT_DATA:abi.BODY_OFF_REPORT_DATA + 64] = report_data
    if body_type == abi.BODY_TYPE_TDX15:
        body[abi.BODY_OFF_MR_SERVICETD:abi.BODY_OFF_MR_SERVICETD + 48] = b"\x5e" * 48
    return bytes(body)


def make_qe_report(report_data: bytes, *, mr_signer: bytes = INTEL_TD_QE_MRSIGNER,
                   isv_prod_id: int = 2,
                   isv_svn: int = 6, attributes: bytes = bytes.fromhex("11") + bytes(15),
                   misc_select: int = 0) -> bytes:
    rep = bytearray(abi.QE_REPORT_SIZE)
    struct.pack_into("<I", rep, abi.QE_OFF_MISC_SELECT, misc_select)
    rep[abi.QE_OFF_ATTRIBUTES:abi.QE_OFF_ATTRIBUTES + 16] = attributes
    rep[abi.QE_OFF_MR_SIGNER:abi.QE_OFF_MR_SIGNER + 32] = mr_signer
    struct.pack_into("<HH", rep, abi.QE_OFF_ISV_PROD_ID, isv_prod_id, isv_svn)
    rep[abi.QE_OFF_REPORT_DATA:abi.QE_OFF_REPORT_DATA + 64] = report_data
    return bytes(rep)


def build_quote(pki: FakePki, *, version: int = 4, body_type: int = abi.BODY_TYPE_TDX10,
                body: bytes | None = None, qe_auth: bytes = bytes(range(32)),
                chain_pem: bytes | None = None, trailing: bytes = b"",
                qe_report_kwargs: dict[str, object] | None = None) -> bytes:
    """A quote signed exactly as a TD Quoting Enclave signs one, under ``pki``."""
    att_key = ec.generate_private_key(ec.SECP256R1())
    att_pub = att_key.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)[1:]
    header = struct.pack("<HHIHH", version, abi.ATTESTATION_KEY_TYPE_ECDSA_P256,
                         abi.TEE_TYPE_TDX, 0, 0) + abi.INTEL_QE_VENDOR_ID + bytes(20)
    body = body if body is not None else make_body(body_type)
    descriptor = struct.pack("<HI", body_type, len(body)) if version == 5 else b""
    signed = header + descriptor + body
    binding = hashlib.sha256(att_pub + qe_auth).digest() + bytes(32)
    qe_report = make_qe_report(binding, **(qe_report_kwargs or {}))  # type: ignore[arg-type]
    chain = pki.chain_pem() if chain_pem is None else chain_pem
    inner = struct.pack("<HI", abi.CERT_DATA_TYPE_PCK_CHAIN, len(chain)) + chain
    qe_data = qe_report + _sig_bytes(pki.pck_key, qe_report) + \
        struct.pack("<H", len(qe_auth)) + qe_auth + inner
    cert_data = struct.pack("<HI", abi.CERT_DATA_TYPE_QE_REPORT, len(qe_data)) + qe_data
    sig_data = _sig_bytes(att_key, signed) + att_pub + cert_data
    return signed + struct.pack("<I", len(sig_data)) + sig_data + trailing


@pytest.fixture(scope="module")
def pki() -> FakePki:
    return make_pki()


AT_FAKE = dt.datetime(2025, 6, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- pinned root


def test_pinned_root_is_the_intel_sgx_root_ca(tappd: bytes) -> None:
    root = intel_sgx_root()
    assert fingerprint(root) == INTEL_ROOT_SHA256
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "Intel SGX Root CA"
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    root.verify_directly_issued_by(root)
    # Second, independent source: the root a real quote carries is byte-identical.
    carried = abi.parse_quote(tappd).certification.pck_chain[2]
    assert fingerprint(carried) == INTEL_ROOT_SHA256


# --------------------------------------------------------------------------- real quotes: parse


def test_real_quote_parses(real_quote: bytes) -> None:
    quote = abi.parse_quote(real_quote)
    assert abi.looks_like_quote(real_quote)
    assert quote.version == 4 and quote.body_type == abi.BODY_TYPE_TDX10
    assert quote.header.tee_type == abi.TEE_TYPE_TDX
    assert quote.header.qe_vendor_id == abi.INTEL_QE_VENDOR_ID
    assert quote.signed_length == abi.HEADER_SIZE + abi.TD10_BODY_SIZE
    assert quote.signed_bytes == real_quote[:632]
    assert quote.trailing_bytes == 70  # the upstream buffer is zero-padded
    assert len(quote.raw) + quote.trailing_bytes == len(real_quote)
    assert quote.body.tee_tcb_svn.hex() == "05010200000000000000000000000000"
    assert not quote.debug and quote.body.td_attributes == 0x10000000
    assert quote.body.xfam == 0x602E7
    assert quote.body.mr_seam.hex().startswith("1cc6a17ab799e9a6")
    assert quote.body.tee_tcb_svn2 is None and quote.body.mr_servicetd is None
    qe = quote.certification.qe_report
    assert qe.isv_prod_id == 2 and qe.isv_svn == 6
    assert qe.mr_signer.hex() == \
        "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"
    assert quote.certification.qe_auth_data == bytes(range(32))
    names = [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
             for c in quote.certification.pck_chain]
    assert names == ["Intel SGX PCK Certificate", "Intel SGX PCK Platform CA",
                     "Intel SGX Root CA"]


def test_real_pck_extensions(tappd: bytes) -> None:
    pck = abi.parse_pck_extensions(abi.parse_quote(tappd).certification.pck_chain[0])
    assert pck.fmspc_hex == "b0c06f000000" and pck.pce_id_hex == "0000"
    assert pck.tcb_components == (2, 2, 2, 2, 3, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0)
    assert pck.pcesvn == 11 and pck.cpusvn == bytes(pck.tcb_components)
    assert pck.sgx_type == 1 and pck.smt_enabled is True and pck.cached_keys is True


# --------------------------------------------------------------------------- real quotes: verify


def test_real_quote_verifies(any_real: tuple[bytes, dt.datetime]) -> None:
    data, at = any_real
    assert abi.looks_like_quote(data)
    verification = verify_tdx(abi.parse_quote(data), at=at, root=intel_sgx_root())
    assert verification.authentic, [c for c in verification.checks if not c.passed]
    assert [c.name for c in verification.checks] == [
        "quote_signature", "qe_report_binding", "pck_certificate", "qe_report_signature",
        "pck_chain", "validity"]
    assert verification.tcb_status is None and not verification.collateral_checked
    assert verification.pck is not None


def test_real_gcp_quote() -> None:
    """A second platform: Google Cloud TDX VM, 8000-byte buffer, PCK of FMSPC 00806f050000."""
    data = load_gcp()
    quote = abi.parse_quote(data)
    assert len(data) == 8000 and quote.trailing_bytes == 3065
    assert quote.body.tee_tcb_svn.hex() == "08010800000000000000000000000000"
    assert quote.body.mr_td.hex().startswith("409c0cd3e63d9ea5")
    pck = abi.parse_pck_extensions(quote.certification.pck_chain[0])
    assert pck.fmspc_hex == "00806f050000" and pck.pcesvn == 11
    assert pck.tcb_components[:8] == (8, 8, 2, 2, 4, 1, 0, 6) and pck.cached_keys is False
    assert failed_names(verify_tdx(quote, at=dt.datetime(2025, 3, 1, tzinfo=UTC),
                                   root=intel_sgx_root())) == {"validity"}
    flipped = flip(data, abi.HEADER_SIZE + abi.BODY_OFF_REPORT_DATA)
    assert failed_names(verify_tdx(abi.parse_quote(flipped), at=AT_GCP,
                                   root=intel_sgx_root())) == {"quote_signature"}


def test_flipped_body_byte_breaks_only_the_quote_signature(tappd: bytes) -> None:
    off = abi.HEADER_SIZE + abi.BODY_OFF_MR_TD + 3
    verification = verify_tdx(abi.parse_quote(flip(tappd, off)), at=AT_REAL,
                              root=intel_sgx_root())
    assert failed_names(verification) == {"quote_signature"}


def test_flipped_header_byte_breaks_the_quote_signature(tappd: bytes) -> None:
    off = abi.OFF_USER_DATA + 5
    verification = verify_tdx(abi.parse_quote(flip(tappd, off)), at=AT_REAL,
                              root=intel_sgx_root())
    assert failed_names(verification) == {"quote_signature"}


def _qe_report_offset(data: bytes) -> int:
    quote = abi.parse_quote(data)
    return quote.signed_length + 4 + 64 + 64 + 6


def test_flipped_qe_report_data_breaks_binding_and_qe_signature(tappd: bytes) -> None:
    off = _qe_report_offset(tappd) + abi.QE_OFF_REPORT_DATA + 1
    verification = verify_tdx(abi.parse_quote(flip(tappd, off)), at=AT_REAL,
                              root=intel_sgx_root())
    assert failed_names(verification) == {"qe_report_binding", "qe_report_signature"}


def test_flipped_qe_mrsigner_breaks_qe_signature(tappd: bytes) -> None:
    off = _qe_report_offset(tappd) + abi.QE_OFF_MR_SIGNER
    verification = verify_tdx(abi.parse_quote(flip(tappd, off)), at=AT_REAL,
                              root=intel_sgx_root())
    assert failed_names(verification) == {"qe_report_signature"}


def test_flipped_attestation_key_breaks_signature_and_binding(tappd: bytes) -> None:
    quote = abi.parse_quote(tappd)
    off = quote.signed_length + 4 + 64 + 10
    verification = verify_tdx(abi.parse_quote(flip(tappd, off)), at=AT_REAL,
                              root=intel_sgx_root())
    assert {"quote_signature", "qe_report_binding"} <= failed_names(verification)
    assert "pck_chain" not in failed_names(verification)


def test_real_chain_does_not_verify_against_another_root(tappd: bytes, pki: FakePki) -> None:
    verification = verify_tdx(abi.parse_quote(tappd), at=AT_REAL, root=pki.root)
    assert failed_names(verification) == {"pck_chain"}
    reason = next(c.reason for c in verification.checks if c.name == "pck_chain")
    assert "not the pinned" in reason and "not issued by the pinned" in reason


@pytest.mark.parametrize(("when", "expect"), [
    (dt.datetime(2034, 1, 1, tzinfo=UTC), "expired 2033-05-21"),
    (dt.datetime(2024, 1, 1, tzinfo=UTC), "not valid before 2024-08-02"),
])
def test_real_chain_outside_validity(tappd: bytes, when: dt.datetime, expect: str) -> None:
    verification = verify_tdx(abi.parse_quote(tappd), at=when, root=intel_sgx_root())
    assert failed_names(verification) == {"validity"}
    reason = next(c.reason for c in verification.checks if c.name == "validity")
    assert expect in reason


def test_trailing_bytes_are_ignored(tappd: bytes) -> None:
    padded = tappd + b"\xff" * 1000
    quote = abi.parse_quote(padded)
    assert quote.trailing_bytes == 1070
    assert quote.raw == abi.parse_quote(tappd).raw
    assert verify_tdx(quote, at=AT_REAL, root=intel_sgx_root()).authentic


def test_malleated_signature_still_verifies(tappd: bytes) -> None:
    """ECDSA is malleable: (r, n - s) is a second valid signature over the same quote.

    So a quote is never identified or deduplicated by its signature bytes (replay protection
    must rest on REPORTDATA, i.e. the verifier's nonce), and two byte-different quotes can be
    the same attestation.
    """
    quote = abi.parse_quote(tappd)
    off = quote.signed_length + 4 + abi.ECDSA_COMPONENT_SIZE
    buf = bytearray(tappd)
    buf[off:off + 32] = (P256_N - quote.signature.s).to_bytes(32, "big")
    malleated = abi.parse_quote(bytes(buf))
    assert malleated.signature != quote.signature and malleated.raw != quote.raw
    assert verify_tdx(malleated, at=AT_REAL, root=intel_sgx_root()).authentic


def test_naive_time_is_taken_as_utc(tappd: bytes) -> None:
    verification = verify_tdx(abi.parse_quote(tappd), at=AT_REAL.replace(tzinfo=None),
                              root=intel_sgx_root())
    assert verification.authentic


def test_verify_evidence_end_to_end(tappd: bytes) -> None:
    from cleanroom.attestation.evidence import detect_format, verify_evidence
    from cleanroom.attestation.validate.policy import Policy

    assert detect_format(tappd) == "tdx"
    verdict = verify_evidence(tappd, policy=Policy(), at=AT_REAL)
    assert verdict.authentic, verdict.reasons
    assert verdict.claims is not None and verdict.claims.format == "tdx"
    assert verdict.claims.measurement.hex().startswith("c68518a0ebb42136")


# --------------------------------------------------------------------------- parse errors


def test_truncations_name_the_field(tappd: bytes) -> None:
    cases = {
        10: "header",
        abi.HEADER_SIZE + 100: "body",
        632 + 2: "signature_data.length",
        1000: "signature_data.length",
    }
    for size, field_name in cases.items():
        with pytest.raises(ParseError) as info:
            abi.parse_quote(tappd[:size])
        assert info.value.field == field_name, (size, info.value)


def test_length_field_edits_name_the_field(tappd: bytes) -> None:
    quote = abi.parse_quote(tappd)
    sig_len_off = quote.signed_length
    cert_type_off = sig_len_off + 4 + 128
    buf = bytearray(tappd)
    struct.pack_into("<I", buf, sig_len_off, 100)
    with pytest.raises(ParseError) as info:
        abi.parse_quote(bytes(buf))
    assert info.value.field == "signature_data.attestation_key"
    buf = bytearray(tappd)
    struct.pack_into("<I", buf, cert_type_off + 2, 99)
    with pytest.raises(ParseError) as info:
        abi.parse_quote(bytes(buf))
    assert info.value.field == "certification_data.size"
    buf = bytearray(tappd)
    struct.pack_into("<H", buf, cert_type_off, 5)
    with pytest.raises(UnsupportedFormatError) as info:
        abi.parse_quote(bytes(buf))
    assert info.value.field == "certification_data.type"
    buf = bytearray(tappd)
    auth_off = cert_type_off + 6 + abi.QE_REPORT_SIZE + 64
    struct.pack_into("<H", buf, auth_off, 3000)
    with pytest.raises(ParseError) as info:
        abi.parse_quote(bytes(buf))
    assert info.value.field in {"pck_chain.size", "pck_chain.type", "qe_auth_data"}


def test_header_errors(tappd: bytes) -> None:
    for off, value, field_name in ((abi.OFF_VERSION, 3, "header.version"),
                                   (abi.OFF_ATTESTATION_KEY_TYPE, 3,
                                    "header.attestation_key_type")):
        buf = bytearray(tappd)
        struct.pack_into("<H", buf, off, value)
        with pytest.raises(UnsupportedFormatError) as info:
            abi.parse_quote(bytes(buf))
        assert info.value.field == field_name
        assert not abi.looks_like_quote(bytes(buf))
    buf = bytearray(tappd)
    struct.pack_into("<I", buf, abi.OFF_TEE_TYPE, 0)
    with pytest.raises(UnsupportedFormatError, match="SGX") as info:
        abi.parse_quote(bytes(buf))
    assert info.value.field == "header.tee_type"


def test_garbled_pem_names_the_chain(tappd: bytes) -> None:
    quote = abi.parse_quote(tappd)
    start = tappd.index(b"-----BEGIN CERTIFICATE-----") + 40
    with pytest.raises(ParseError) as info:
        abi.parse_quote(tappd[:start] + b"!" + tappd[start + 1:])
    assert info.value.field.startswith("pck_chain")
    assert quote.certification.pck_chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_size_limit_and_type() -> None:
    with pytest.raises(ParseError, match="limit") as info:
        abi.parse_quote(bytes(abi.MAX_QUOTE_SIZE + 1))
    assert info.value.field == "quote"
    with pytest.raises(ParseError):
        abi.parse_quote("not bytes")  # type: ignore[arg-type]
    assert not abi.looks_like_quote(b"")
    assert not abi.looks_like_quote(bytes(1184))
    assert not abi.looks_like_quote(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- synthetic quotes


def test_synthetic_v4_quote_verifies_under_its_own_root(pki: FakePki) -> None:
    quote = abi.parse_quote(build_quote(pki))
    verification = verify_tdx(quote, at=AT_FAKE, root=pki.root)
    assert verification.authentic, verification.failures
    # ... and never under the pinned Intel root.
    assert failed_names(verify_tdx(quote, at=AT_FAKE, root=intel_sgx_root())) == {"pck_chain"}


@pytest.mark.parametrize("body_type", [abi.BODY_TYPE_TDX10, abi.BODY_TYPE_TDX15])
def test_synthetic_v5_quote(pki: FakePki, body_type: int) -> None:
    data = build_quote(pki, version=5, body_type=body_type)
    quote = abi.parse_quote(data)
    assert quote.version == 5 and quote.body_type == body_type
    assert quote.signed_length == abi.HEADER_SIZE + 6 + abi.BODY_SIZES[body_type]
    if body_type == abi.BODY_TYPE_TDX15:
        assert quote.body.mr_servicetd == b"\x5e" * 48 and quote.body.tee_tcb_svn2 == bytes(16)
    assert verify_tdx(quote, at=AT_FAKE, root=pki.root).authentic
    buf = bytearray(data)
    struct.pack_into("<I", buf, abi.HEADER_SIZE + 2, 1000)
    with pytest.raises(ParseError) as info:
        abi.parse_quote(bytes(buf))
    assert info.value.field == "body.size"


def test_v5_sgx_body_is_unsupported(pki: FakePki) -> None:
    data = bytearray(build_quote(pki, version=5))
    struct.pack_into("<H", data, abi.HEADER_SIZE, abi.BODY_TYPE_SGX_ENCLAVE)
    with pytest.raises(UnsupportedFormatError, match="SGX enclave report") as info:
        abi.parse_quote(bytes(data))
    assert info.value.field == "body.type"


def test_debug_property(pki: FakePki) -> None:
    quote = abi.parse_quote(build_quote(pki, body=make_body(td_attributes=1)))
    assert quote.debug and quote.body.debug


def test_chain_without_root_verifies_and_foreign_root_in_quote_fails(pki: FakePki) -> None:
    quote = abi.parse_quote(build_quote(pki, chain_pem=pki.chain_pem(with_root=False)))
    assert verify_tdx(quote, at=AT_FAKE, root=pki.root).authentic
    other = make_pki()
    quote = abi.parse_quote(build_quote(pki, chain_pem=pki.chain_pem(with_root=False)
                                        + other.root.public_bytes(serialization.Encoding.PEM)))
    verification = verify_tdx(quote, at=AT_FAKE, root=pki.root)
    assert failed_names(verification) == {"pck_chain"}


def test_chain_too_short(pki: FakePki) -> None:
    quote = abi.parse_quote(build_quote(pki, chain_pem=pki.pck.public_bytes(
        serialization.Encoding.PEM)))
    verification = verify_tdx(quote, at=AT_FAKE, root=pki.root)
    assert "pck_chain" in failed_names(verification)


def test_pck_from_another_intermediate(pki: FakePki) -> None:
    other = make_pki()
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM)
                     for c in (other.pck, pki.inter, pki.root))
    quote = abi.parse_quote(build_quote(other, chain_pem=chain))
    verification = verify_tdx(quote, at=AT_FAKE, root=pki.root)
    assert failed_names(verification) == {"pck_chain"}


def test_pck_without_sgx_extensions(pki: FakePki) -> None:
    bad = make_pki(extension=sgx_extension_der(components=FAKE_COMPONENTS, pcesvn=11,
                                                fmspc=FAKE_FMSPC, drop=abi.OID_FMSPC))
    quote = abi.parse_quote(build_quote(bad))
    verification = verify_tdx(quote, at=AT_FAKE, root=bad.root)
    assert failed_names(verification) == {"pck_certificate"}
    assert verification.pck is None
    with pytest.raises(CertificateError, match="FMSPC"):
        abi.parse_pck_extensions(bad.pck)


def test_pck_with_wrong_curve() -> None:
    bad = make_pki(pck_curve=ec.SECP384R1())
    verification = verify_tdx(abi.parse_quote(build_quote(bad)), at=AT_FAKE, root=bad.root)
    assert failed_names(verification) == {"pck_certificate", "qe_report_signature"}


def test_attestation_key_not_on_curve(pki: FakePki) -> None:
    data = bytearray(build_quote(pki))
    quote = abi.parse_quote(bytes(data))
    off = quote.signed_length + 4 + 64
    data[off:off + 64] = b"\x01" * 64
    verification = verify_tdx(abi.parse_quote(bytes(data)), at=AT_FAKE, root=pki.root)
    assert {"quote_signature", "qe_report_binding"} == failed_names(verification)
    reason = next(c.reason for c in verification.checks if c.name == "quote_signature")
    assert "not a valid P-256 point" in reason


def test_qe_report_data_upper_half_must_be_zero(pki: FakePki) -> None:
    data = build_quote(pki)
    off = _qe_report_offset(data) + abi.QE_OFF_REPORT_DATA + 40
    verification = verify_tdx(abi.parse_quote(flip(data, off)), at=AT_FAKE, root=pki.root)
    reason = next(c.reason for c in verification.checks if c.name == "qe_report_binding")
    assert "[32:64] is not zero" in reason


# --------------------------------------------------------------------------- vectors from others


def _other_vectors() -> list[Path]:
    return sorted(VECTORS.glob("*.dat")) if VECTORS.is_dir() else []


@pytest.mark.parametrize("path", _other_vectors(), ids=lambda p: p.name)
def test_collected_vector_parses_and_is_authentic(path: Path) -> None:
    """Any TDX quote collected into tests/vectors/tdx/*.dat parses and its signatures hold."""
    quote = abi.parse_quote(path.read_bytes())
    chain = quote.certification.pck_chain
    at = max(c.not_valid_before_utc for c in chain) + dt.timedelta(days=1)
    verification = verify_tdx(quote, at=at, root=intel_sgx_root())
    assert failed_names(verification) <= {"validity"}, verification.failures


# --------------------------------------------------------------------------- fuzzing


def _length_fields(data: bytes) -> dict[int, int]:
    """Offset -> width of every length/type field of a quote (the fuzzer's favourite targets)."""
    quote = abi.parse_quote(data)
    sig = quote.signed_length
    cert = sig + 4 + 128
    auth = cert + 6 + abi.QE_REPORT_SIZE + 64
    inner = auth + 2 + len(quote.certification.qe_auth_data)
    fields = {abi.OFF_VERSION: 2, abi.OFF_ATTESTATION_KEY_TYPE: 2, abi.OFF_TEE_TYPE: 4,
              sig: 4, cert: 2, cert + 2: 4, auth: 2, inner: 2, inner + 2: 4}
    if quote.version == 5:
        fields.update({abi.HEADER_SIZE: 2, abi.HEADER_SIZE + 2: 4})
    return fields


_SEEDS = [load_hex(DCAP_QVL / REAL_QUOTES[0]),  # real v4
          build_quote(make_pki(), version=5, body_type=abi.BODY_TYPE_TDX15)]  # synthetic v5
_FIELDS = [_length_fields(seed) for seed in _SEEDS]


def _parse_or_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        abi.parse_quote(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _parse_or_parse_error(data)
    abi.looks_like_quote(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_quotes(data: st.DataObject) -> None:
    index = data.draw(st.sampled_from(range(len(_SEEDS))), label="seed")
    buf = bytearray(_SEEDS[index])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "length", "insert"]), label="kind")
        if kind == "flip" and buf:
            pos = data.draw(st.integers(0, len(buf) - 1), label="pos")
            buf[pos] ^= data.draw(st.integers(1, 255), label="mask")
        elif kind == "truncate":
            del buf[data.draw(st.integers(0, len(buf)), label="cut"):]
        elif kind == "length":
            off, width = data.draw(st.sampled_from(sorted(_FIELDS[index].items())),
                                   label="field")
            value = data.draw(st.sampled_from([0, 1, 2, 3, 5, 6, 0x81, 584, 648, 0xFFFF,
                                               0xFFFFFFFF, 4300, 4299, 4301]), label="value")
            if off + width <= len(buf):
                buf[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        else:
            pos = data.draw(st.integers(0, len(buf)), label="at")
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="junk")
    _parse_or_parse_error(bytes(buf))
