"""Intel TDX DCAP quote (versions 4 and 5): bytes -> typed, immutable structure, and nothing else.

Layout: Intel "TDX DCAP Quote Generation Library and Quote Verification Library" specification
(quote format v4 and v5), also implemented by google/go-tdx-guest ``abi``. Every offset and size
is a named constant below.

::

    v4: header (48) | TD report body TDX 1.0 (584)                  | signature data
    v5: header (48) | body type u16 | body size u32 | body (584/648) | signature data

    signature data: u32 length, then
        quote ECDSA P-256 signature (64, r||s big endian)
        attestation public key (64, x||y)
        certification data: u16 type (6 = QE report), u32 size, then
            QE report (SGX enclave report body, 384) | QE report signature (64)
            u16 QE auth data size | QE auth data
            certification data: u16 type (5 = PCK certificate chain, PEM), u32 size, data

The quote signature covers the header and the body (for v5 including the body type and size).
Bytes after the declared signature data are ignored (quote buffers are often padded) and counted
in :attr:`TdxQuote.trailing_bytes`.

The parser is strict: every length is checked against what is left and against the length of
its container, and any malformed input raises :class:`ParseError` (or its subclass
:class:`UnsupportedFormatError`) naming the field. It makes no judgement about whether the values
are acceptable (the validate layer's job) and checks no signature (the verify layer's job). It
also decodes Intel's SGX extensions of a PCK certificate (:func:`parse_pck_extensions`), which the
verify layer and the collateral evaluation need.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cleanroom.attestation.abi._le import raw as _bytes
from cleanroom.attestation.abi._le import u16 as _u16
from cleanroom.attestation.abi._le import u32 as _u32
from cleanroom.attestation.abi._le import u64 as _u64
from cleanroom.attestation.abi._x509 import X509_EXTENSION_ERRORS, X509_LOAD_ERRORS
from cleanroom.errors import CertificateError, ParseError, UnsupportedFormatError

MAX_QUOTE_SIZE = 64 * 1024  # refused unread above this

# --------------------------------------------------------------------------- header
HEADER_SIZE = 48
OFF_VERSION = 0
OFF_ATTESTATION_KEY_TYPE = 2
OFF_TEE_TYPE = 4
OFF_QE_SVN = 8  # "reserved" in the v4/v5 spec; QE SVN in SGX quote v3 and go-tdx-guest
OFF_PCE_SVN = 10  # likewise
OFF_QE_VENDOR_ID = 12
OFF_USER_DATA = 28
QE_VENDOR_ID_SIZE = 16
USER_DATA_SIZE = 20

QUOTE_VERSION_4 = 4
QUOTE_VERSION_5 = 5
SUPPORTED_VERSIONS = (QUOTE_VERSION_4, QUOTE_VERSION_5)
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
ATTESTATION_KEY_TYPE_ECDSA_P384 = 3
TEE_TYPE_SGX = 0x00
TEE_TYPE_TDX = 0x81
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

# --------------------------------------------------------------------------- v5 body descriptor
BODY_DESCRIPTOR_SIZE = 6  # u16 type + u32 size
BODY_TYPE_SGX_ENCLAVE = 1
BODY_TYPE_TDX10 = 2
BODY_TYPE_TDX15 = 3

# --------------------------------------------------------------------------- TD report body
TD10_BODY_SIZE = 584
TD15_BODY_SIZE = 648
BODY_SIZES = {BODY_TYPE_TDX10: TD10_BODY_SIZE, BODY_TYPE_TDX15: TD15_BODY_SIZE}

TEE_TCB_SVN_SIZE = 16
MEASUREMENT_SIZE = 48  # MRSEAM, MRSIGNERSEAM, MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMRs
ATTRIBUTES_SIZE = 8
REPORT_DATA_SIZE = 64
RTMR_COUNT = 4

BODY_OFF_TEE_TCB_SVN = 0
BODY_OFF_MR_SEAM = 16
BODY_OFF_MR_SIGNER_SEAM = 64
BODY_OFF_SEAM_ATTRIBUTES = 112
BODY_OFF_TD_ATTRIBUTES = 120
BODY_OFF_XFAM = 128
BODY_OFF_MR_TD = 136
BODY_OFF_MR_CONFIG_ID = 184
BODY_OFF_MR_OWNER = 232
BODY_OFF_MR_OWNER_CONFIG = 280
BODY_OFF_RTMR0 = 328  # RTMR n at BODY_OFF_RTMR0 + n * MEASUREMENT_SIZE
BODY_OFF_REPORT_DATA = 520
BODY_OFF_TEE_TCB_SVN2 = 584  # TDX 1.5 only
BODY_OFF_MR_SERVICETD = 600  # TDX 1.5 only

TD_ATTRIBUTES_DEBUG_BIT = 0

# --------------------------------------------------------------------------- signature data
SIGNATURE_DATA_LENGTH_SIZE = 4
ECDSA_SIGNATURE_SIZE = 64
ECDSA_COMPONENT_SIZE = 32
P256_ORDER = int("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551", 16)  # n
ATTESTATION_KEY_SIZE = 64
CERT_DATA_HEADER_SIZE = 6  # u16 type + u32 size
QE_AUTH_DATA_SIZE_SIZE = 2
CERT_DATA_TYPE_PCK_CHAIN = 5
CERT_DATA_TYPE_QE_REPORT = 6
KNOWN_CERT_DATA_TYPES = {
    1: "PPID in plain text", 2: "PPID encrypted with RSA-2048-OAEP",
    3: "PPID encrypted with RSA-3072-OAEP", 4: "PCK leaf certificate",
    5: "PCK certificate chain", 6: "QE report certification data", 7: "platform manifest",
}
MAX_PCK_CHAIN_CERTIFICATES = 8

# --------------------------------------------------------------------------- SGX report body (QE)
QE_REPORT_SIZE = 384
QE_OFF_CPU_SVN = 0
QE_OFF_MISC_SELECT = 16
QE_OFF_ATTRIBUTES = 48
QE_OFF_MR_ENCLAVE = 64
QE_OFF_MR_SIGNER = 128
QE_OFF_ISV_PROD_ID = 256
QE_OFF_ISV_SVN = 258
QE_OFF_REPORT_DATA = 320
CPU_SVN_SIZE = 16
SGX_ATTRIBUTES_SIZE = 16
SGX_MEASUREMENT_SIZE = 32

# --------------------------------------------------------------------------- PCK SGX extensions
SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
OID_PPID = f"{SGX_EXTENSIONS_OID}.1"
OID_TCB = f"{SGX_EXTENSIONS_OID}.2"
OID_PCESVN = f"{OID_TCB}.17"
OID_CPUSVN = f"{OID_TCB}.18"
OID_PCE_ID = f"{SGX_EXTENSIONS_OID}.3"
OID_FMSPC = f"{SGX_EXTENSIONS_OID}.4"
OID_SGX_TYPE = f"{SGX_EXTENSIONS_OID}.5"
OID_PLATFORM_INSTANCE_ID = f"{SGX_EXTENSIONS_OID}.6"
OID_CONFIGURATION = f"{SGX_EXTENSIONS_OID}.7"
TCB_COMPONENT_COUNT = 16
PPID_SIZE = 16
PCE_ID_SIZE = 2
FMSPC_SIZE = 6


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int  # reserved in v4/v5
    pce_svn: int  # reserved in v4/v5
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReportBody:
    """A TD report body: TDX 1.0 (584 bytes) or TDX 1.5 (648 bytes, two more fields)."""

    raw: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: int  # u64 little endian
    td_attributes: int  # u64 little endian; bit 0 = DEBUG
    xfam: int  # u64 little endian
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None  # TDX 1.5 only
    mr_servicetd: bytes | None = None  # TDX 1.5 only

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        return bool((self.td_attributes >> TD_ATTRIBUTES_DEBUG_BIT) & 1)


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX enclave report body (here: the Quoting Enclave's). ``raw`` is the 384 signed bytes."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int  # u32 little endian
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True)
class EcdsaSignature:
    """An ECDSA P-256 signature as integers (decoded from the 64-byte r||s big-endian field)."""

    r: int
    s: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> EcdsaSignature:
        return cls(r=int.from_bytes(raw[:ECDSA_COMPONENT_SIZE], "big"),
                   s=int.from_bytes(raw[ECDSA_COMPONENT_SIZE:ECDSA_SIGNATURE_SIZE], "big"))


@dataclass(frozen=True)
class QeCertificationData:
    """Certification data type 6: QE report, its signature by the PCK key, and the PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: EcdsaSignature
    qe_auth_data: bytes
    pck_chain_type: int  # always CERT_DATA_TYPE_PCK_CHAIN after parsing
    pck_chain_pem: bytes  # exactly as carried (trailing NULs included)
    pck_chain: tuple[x509.Certificate, ...]  # leaf first, as carried; NOT trusted by itself


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote. ``raw`` keeps the exact bytes up to the end of the signature data."""

    raw: bytes
    header: QuoteHeader
    body_type: int  # BODY_TYPE_TDX10 or BODY_TYPE_TDX15 (v4 quotes are always TDX10)
    body: TdReportBody
    signed_length: int
    signature: EcdsaSignature
    attestation_key: bytes  # 64 bytes: x||y of the P-256 attestation public key
    certification: QeCertificationData
    trailing_bytes: int  # bytes after the declared signature data (ignored)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the quote signature covers: header and body (with the v5 descriptor)."""
        return self.raw[:self.signed_length]

    @property
    def debug(self) -> bool:
        return self.body.debug


# --------------------------------------------------------------------------- reading helpers


class _Reader:
    """Bounded sequential reader: every read is checked, every failure names the field."""

    def __init__(self, buf: bytes, start: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = start
        self.end = len(buf) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise ParseError(field, f"needs {size} bytes at offset {self.pos}, only "
                                    f"{max(self.remaining, 0)} left")
        out = self.buf[self.pos:self.pos + size]
        self.pos += size
        return out

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])


# --------------------------------------------------------------------------- structure parsers


def parse_header(buf: bytes) -> QuoteHeader:
    """Parse and check the 48-byte header (version 4/5, ECDSA P-256 key, TEE type TDX)."""
    if len(buf) < HEADER_SIZE:
        raise ParseError("header", f"quote is {len(buf)} bytes, shorter than the "
                                   f"{HEADER_SIZE}-byte header")
    version = _u16(buf, OFF_VERSION)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatError("header.version", f"is {version}, expect 4 or 5")
    key_type = _u16(buf, OFF_ATTESTATION_KEY_TYPE)
    if key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise UnsupportedFormatError(
            "header.attestation_key_type",
            f"is {key_type}, expect {ATTESTATION_KEY_TYPE_ECDSA_P256} (ECDSA P-256)")
    tee_type = _u32(buf, OFF_TEE_TYPE)
    if tee_type != TEE_TYPE_TDX:
        what = " (SGX)" if tee_type == TEE_TYPE_SGX else ""
        raise UnsupportedFormatError("header.tee_type",
                                     f"is {tee_type:#x}{what}, expect {TEE_TYPE_TDX:#x} (TDX)")
    return QuoteHeader(
        version=version, attestation_key_type=key_type, tee_type=tee_type,
        qe_svn=_u16(buf, OFF_QE_SVN), pce_svn=_u16(buf, OFF_PCE_SVN),
        qe_vendor_id=_bytes(buf, OFF_QE_VENDOR_ID, QE_VENDOR_ID_SIZE),
        user_data=_bytes(buf, OFF_USER_DATA, USER_DATA_SIZE))


def parse_td_report_body(raw: bytes, body_type: int = BODY_TYPE_TDX10) -> TdReportBody:
    """Parse a TD report body of ``body_type`` (its length must match exactly)."""
    expect = BODY_SIZES.get(body_type)
    if expect is None:
        raise UnsupportedFormatError("body.type", f"is {body_type}, expect "
                                                  f"{BODY_TYPE_TDX10} or {BODY_TYPE_TDX15}")
    if len(raw) != expect:
        raise ParseError("body", f"is {len(raw)} bytes, expect {expect}")
    raw = bytes(raw)
    rtmrs = [_bytes(raw, BODY_OFF_RTMR0 + i * MEASUREMENT_SIZE, MEASUREMENT_SIZE)
             for i in range(RTMR_COUNT)]
    td15 = body_type == BODY_TYPE_TDX15
    return TdReportBody(
        raw=raw,
        tee_tcb_svn=_bytes(raw, BODY_OFF_TEE_TCB_SVN, TEE_TCB_SVN_SIZE),
        mr_seam=_bytes(raw, BODY_OFF_MR_SEAM, MEASUREMENT_SIZE),
        mr_signer_seam=_bytes(raw, BODY_OFF_MR_SIGNER_SEAM, MEASUREMENT_SIZE),
        seam_attributes=_u64(raw, BODY_OFF_SEAM_ATTRIBUTES),
        td_attributes=_u64(raw, BODY_OFF_TD_ATTRIBUTES),
        xfam=_u64(raw, BODY_OFF_XFAM),
        mr_td=_bytes(raw, BODY_OFF_MR_TD, MEASUREMENT_SIZE),
        mr_config_id=_bytes(raw, BODY_OFF_MR_CONFIG_ID, MEASUREMENT_SIZE),
        mr_owner=_bytes(raw, BODY_OFF_MR_OWNER, MEASUREMENT_SIZE),
        mr_owner_config=_bytes(raw, BODY_OFF_MR_OWNER_CONFIG, MEASUREMENT_SIZE),
        rtmr0=rtmrs[0], rtmr1=rtmrs[1], rtmr2=rtmrs[2], rtmr3=rtmrs[3],
        report_data=_bytes(raw, BODY_OFF_REPORT_DATA, REPORT_DATA_SIZE),
        tee_tcb_svn2=_bytes(raw, BODY_OFF_TEE_TCB_SVN2, TEE_TCB_SVN_SIZE) if td15 else None,
        mr_servicetd=_bytes(raw, BODY_OFF_MR_SERVICETD, MEASUREMENT_SIZE) if td15 else None,
    )


def parse_enclave_report(raw: bytes) -> EnclaveReport:
    """Parse a 384-byte SGX enclave report body."""
    if len(raw) != QE_REPORT_SIZE:
        raise ParseError("qe_report", f"is {len(raw)} bytes, expect {QE_REPORT_SIZE}")
    raw = bytes(raw)
    return EnclaveReport(
        raw=raw,
        cpu_svn=_bytes(raw, QE_OFF_CPU_SVN, CPU_SVN_SIZE),
        misc_select=_u32(raw, QE_OFF_MISC_SELECT),
        attributes=_bytes(raw, QE_OFF_ATTRIBUTES, SGX_ATTRIBUTES_SIZE),
        mr_enclave=_bytes(raw, QE_OFF_MR_ENCLAVE, SGX_MEASUREMENT_SIZE),
        mr_signer=_bytes(raw, QE_OFF_MR_SIGNER, SGX_MEASUREMENT_SIZE),
        isv_prod_id=_u16(raw, QE_OFF_ISV_PROD_ID),
        isv_svn=_u16(raw, QE_OFF_ISV_SVN),
        report_data=_bytes(raw, QE_OFF_REPORT_DATA, REPORT_DATA_SIZE),
    )


_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\r\n\t ]*)-----END CERTIFICATE-----")


def parse_pem_chain(data: bytes, field: str = "pck_chain") -> tuple[x509.Certificate, ...]:
    """Strictly parse a PEM chain: only CERTIFICATE blocks and whitespace (trailing NULs allowed).

    Raises :class:`ParseError` naming ``field`` (with the block index) on anything else.
    """
    text = bytes(data).rstrip(b"\x00")
    if b"\x00" in text:
        raise ParseError(field, "contains a NUL byte before its end")
    certs: list[x509.Certificate] = []
    pos = 0
    for index, match in enumerate(_PEM_BLOCK.finditer(text)):
        if text[pos:match.start()].strip():
            raise ParseError(field, f"unexpected bytes before certificate {index}")
        if index >= MAX_PCK_CHAIN_CERTIFICATES:
            raise ParseError(field, f"more than {MAX_PCK_CHAIN_CERTIFICATES} certificates")
        body = b"".join(match.group(1).split())
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ParseError(f"{field}[{index}]", "is not valid base64") from None
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except X509_LOAD_ERRORS as exc:
            raise ParseError(f"{field}[{index}]", f"is not an X.509 certificate: {exc}") \
                from None
        pos = match.end()
    if text[pos:].strip():
        raise ParseError(field, f"unexpected bytes after certificate {len(certs) - 1}"
                         if certs else "holds no PEM CERTIFICATE block")
    if not certs:
        raise ParseError(field, "holds no PEM CERTIFICATE block")
    return tuple(certs)


def _parse_certification_data(reader: _Reader) -> QeCertificationData:
    cert_type = reader.u16("certification_data.type")
    cert_size = reader.u32("certification_data.size")
    if cert_type != CERT_DATA_TYPE_QE_REPORT:
        name = KNOWN_CERT_DATA_TYPES.get(cert_type)
        detail = f"is {cert_type}" + (f" ({name})" if name else "") + \
            f", expect {CERT_DATA_TYPE_QE_REPORT} (QE report certification data)"
        if name:
            raise UnsupportedFormatError("certification_data.type", detail)
        raise ParseError("certification_data.type", detail)
    if cert_size != reader.remaining:
        raise ParseError("certification_data.size", f"is {cert_size}, but the signature data "
                                                    f"leaves {reader.remaining} bytes for it")
    qe_report = parse_enclave_report(reader.take(QE_REPORT_SIZE, "qe_report"))
    qe_signature = EcdsaSignature.from_bytes(
        reader.take(ECDSA_SIGNATURE_SIZE, "qe_report_signature"))
    auth_size = reader.u16("qe_auth_data.size")
    auth_data = reader.take(auth_size, "qe_auth_data")
    inner_type = reader.u16("pck_chain.type")
    inner_size = reader.u32("pck_chain.size")
    if inner_type != CERT_DATA_TYPE_PCK_CHAIN:
        name = KNOWN_CERT_DATA_TYPES.get(inner_type)
        detail = f"is {inner_type}" + (f" ({name})" if name else "") + \
            f", expect {CERT_DATA_TYPE_PCK_CHAIN} (PCK certificate chain)"
        if name:
            raise UnsupportedFormatError("pck_chain.type", detail)
        raise ParseError("pck_chain.type", detail)
    if inner_size != reader.remaining:
        raise ParseError("pck_chain.size", f"is {inner_size}, but the QE certification data "
                                           f"leaves {reader.remaining} bytes for it")
    pem = reader.take(inner_size, "pck_chain")
    return QeCertificationData(
        qe_report=qe_report, qe_report_signature=qe_signature, qe_auth_data=auth_data,
        pck_chain_type=inner_type, pck_chain_pem=pem, pck_chain=parse_pem_chain(pem))


def parse_quote(data: bytes) -> TdxQuote:
    """Parse one TDX quote (version 4 or 5, ECDSA P-256, QE report certification data).

    Bytes after the declared signature data are ignored and counted in ``trailing_bytes``.
    Raises :class:`ParseError` (or :class:`UnsupportedFormatError`) naming the offending field.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("quote", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_QUOTE_SIZE:
        raise ParseError("quote", f"is {len(data)} bytes, limit {MAX_QUOTE_SIZE}")
    buf = bytes(data)
    header = parse_header(buf)
    reader = _Reader(buf, HEADER_SIZE)
    if header.version == QUOTE_VERSION_4:
        body_type = BODY_TYPE_TDX10
        body_size = TD10_BODY_SIZE
    else:
        body_type = reader.u16("body.type")
        body_size = reader.u32("body.size")
        if body_type == BODY_TYPE_SGX_ENCLAVE:
            raise UnsupportedFormatError("body.type", "is 1 (SGX enclave report): not a TD quote")
        if body_type not in BODY_SIZES:
            raise UnsupportedFormatError("body.type", f"is {body_type}, expect "
                                                      f"{BODY_TYPE_TDX10} or {BODY_TYPE_TDX15}")
        if body_size != BODY_SIZES[body_type]:
            raise ParseError("body.size", f"is {body_size}, expect {BODY_SIZES[body_type]} "
                                          f"for body type {body_type}")
    body = parse_td_report_body(reader.take(body_size, "body"), body_type)
    signed_length = reader.pos

    sig_length = reader.u32("signature_data.length")
    if sig_length > reader.remaining:
        raise ParseError("signature_data.length", f"is {sig_length}, but only "
                                                  f"{reader.remaining} bytes follow")
    end = reader.pos + sig_length
    sig_reader = _Reader(buf, reader.pos, end)
    signature = EcdsaSignature.from_bytes(sig_reader.take(ECDSA_SIGNATURE_SIZE,
                                                          "signature_data.signature"))
    attestation_key = sig_reader.take(ATTESTATION_KEY_SIZE, "signature_data.attestation_key")
    certification = _parse_certification_data(sig_reader)

    return TdxQuote(
        raw=buf[:end], header=header, body_type=body_type, body=body,
        signed_length=signed_length, signature=signature, attestation_key=attestation_key,
        certification=certification, trailing_bytes=len(buf) - end)


def _low_s(signature: EcdsaSignature) -> bytes:
    s = signature.s
    if 0 < s < P256_ORDER and s > P256_ORDER // 2:
        s = P256_ORDER - s
    return signature.r.to_bytes(ECDSA_COMPONENT_SIZE, "big") + \
        s.to_bytes(ECDSA_COMPONENT_SIZE, "big")


def _sized(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def canonical_bytes(quote: TdxQuote) -> bytes:
    """The quote's canonical encoding (lengths as u32 little endian)::

        len || header and body as signed | quote signature r || low-S s | attestation key |
        QE report | QE report signature r || low-S s | len || QE auth data |
        count || (len || DER) of each PCK chain certificate

    Bytes after the signature data, the PEM text layout and NUL padding of the PCK chain, and
    the (r, n - s) twin of either signature do not change it: one quote, one encoding.
    """
    cert = quote.certification
    ders = [c.public_bytes(serialization.Encoding.DER) for c in cert.pck_chain]
    return b"".join([
        _sized(quote.signed_bytes), _low_s(quote.signature), quote.attestation_key,
        cert.qe_report.raw, _low_s(cert.qe_report_signature), _sized(cert.qe_auth_data),
        struct.pack("<I", len(ders)), *(_sized(d) for d in ders)])


def looks_like_quote(data: bytes) -> bool:
    """Cheap format sniff used by evidence detection (never raises)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return False
    if len(data) < HEADER_SIZE or len(data) > MAX_QUOTE_SIZE:
        return False
    head = bytes(data[:HEADER_SIZE])
    return _u16(head, OFF_VERSION) in SUPPORTED_VERSIONS and \
        _u16(head, OFF_ATTESTATION_KEY_TYPE) == ATTESTATION_KEY_TYPE_ECDSA_P256 and \
        _u32(head, OFF_TEE_TYPE) == TEE_TYPE_TDX


# --------------------------------------------------------------------------- PCK certificate


@dataclass(frozen=True)
class PckExtensions:
    """Intel SGX extensions of a PCK certificate (OID 1.2.840.113741.1.13.1)."""

    ppid: bytes
    tcb_components: tuple[int, ...]  # SGX TCB component SVNs 1..16
    pcesvn: int
    cpusvn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int  # 0 Standard, 1 Scalable, 2 Scalable with integrity
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None

    @property
    def fmspc_hex(self) -> str:
        return self.fmspc.hex()

    @property
    def pce_id_hex(self) -> str:
        return self.pce_id.hex()


_DER_BOOLEAN = 0x01
_DER_INTEGER = 0x02
_DER_OCTET_STRING = 0x04
_DER_OID = 0x06
_DER_ENUMERATED = 0x0A
_DER_SEQUENCE = 0x30
_MAX_DER_LENGTH_OCTETS = 3


def _der_items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """Split DER bytes into (tag, content) pairs; every length is checked."""
    items: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise CertificateError(f"PCK extension {what}: truncated DER")
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > _MAX_DER_LENGTH_OCTETS or pos + count > len(data):
                raise CertificateError(f"PCK extension {what}: bad DER length")
            length = int.from_bytes(data[pos:pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise CertificateError(f"PCK extension {what}: DER length past the end")
        items.append((tag, data[pos:pos + length]))
        pos += length
    return items


def _der_oid(content: bytes, what: str) -> str:
    if not content:
        raise CertificateError(f"PCK extension {what}: empty OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if content[-1] & 0x80:
        raise CertificateError(f"PCK extension {what}: truncated OID")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _der_uint(tag: int, content: bytes, what: str, expect_tag: int = _DER_INTEGER) -> int:
    if tag != expect_tag or not content:
        raise CertificateError(f"PCK extension {what}: expected an INTEGER")
    value = int.from_bytes(content, "big", signed=True)
    if value < 0:
        raise CertificateError(f"PCK extension {what}: negative value {value}")
    return value


def _der_octets(tag: int, content: bytes, what: str, size: int | None) -> bytes:
    if tag != _DER_OCTET_STRING:
        raise CertificateError(f"PCK extension {what}: expected an OCTET STRING")
    if size is not None and len(content) != size:
        raise CertificateError(f"PCK extension {what}: is {len(content)} bytes, expect {size}")
    return bytes(content)


def _oid_value_pairs(content: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """SEQUENCE OF SEQUENCE { OID, value } -> {oid: (tag, content)}; duplicates refused."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, entry in _der_items(content, what):
        if tag != _DER_SEQUENCE:
            raise CertificateError(f"PCK extension {what}: expected a SEQUENCE entry")
        parts = _der_items(entry, what)
        if len(parts) != 2 or parts[0][0] != _DER_OID:
            raise CertificateError(f"PCK extension {what}: entry is not (OID, value)")
        oid = _der_oid(parts[0][1], what)
        if oid in out:
            raise CertificateError(f"PCK extension {what}: {oid} appears twice")
        out[oid] = parts[1]
    return out


def parse_pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """Decode the SGX extensions of a PCK certificate; :class:`CertificateError` if malformed."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID))
    except x509.ExtensionNotFound:
        raise CertificateError("PCK certificate has no SGX extensions "
                               f"({SGX_EXTENSIONS_OID})") from None
    except X509_EXTENSION_ERRORS as exc:
        raise CertificateError(f"PCK certificate extensions are malformed: {exc}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateError("PCK SGX extension could not be read as raw DER")
    top = _der_items(value.value, "SGX extensions")
    if len(top) != 1 or top[0][0] != _DER_SEQUENCE:
        raise CertificateError("PCK extension SGX extensions: expected one SEQUENCE")
    fields = _oid_value_pairs(top[0][1], "SGX extensions")
    for oid, name in ((OID_PPID, "PPID"), (OID_TCB, "TCB"), (OID_PCE_ID, "PCE-ID"),
                      (OID_FMSPC, "FMSPC"), (OID_SGX_TYPE, "SGX Type")):
        if oid not in fields:
            raise CertificateError(f"PCK extension {name} ({oid}) is missing")
    tcb_tag, tcb_content = fields[OID_TCB]
    if tcb_tag != _DER_SEQUENCE:
        raise CertificateError("PCK extension TCB: expected a SEQUENCE")
    tcb = _oid_value_pairs(tcb_content, "TCB")
    components: list[int] = []
    for index in range(1, TCB_COMPONENT_COUNT + 1):
        oid = f"{OID_TCB}.{index}"
        if oid not in tcb:
            raise CertificateError(f"PCK extension TCB component {index} ({oid}) is missing")
        svn = _der_uint(*tcb[oid], f"TCB component {index}")
        if svn > 0xFF:
            raise CertificateError(f"PCK extension TCB component {index}: {svn} > 255")
        components.append(svn)
    if OID_PCESVN not in tcb or OID_CPUSVN not in tcb:
        raise CertificateError("PCK extension TCB: PCESVN or CPUSVN is missing")
    pcesvn = _der_uint(*tcb[OID_PCESVN], "PCESVN")
    if pcesvn > 0xFFFF:
        raise CertificateError(f"PCK extension PCESVN: {pcesvn} > 65535")

    config: dict[str, tuple[int, bytes]] = {}
    if OID_CONFIGURATION in fields:
        conf_tag, conf_content = fields[OID_CONFIGURATION]
        if conf_tag != _DER_SEQUENCE:
            raise CertificateError("PCK extension Configuration: expected a SEQUENCE")
        config = _oid_value_pairs(conf_content, "Configuration")

    def flag(index: int) -> bool | None:
        item = config.get(f"{OID_CONFIGURATION}.{index}")
        if item is None:
            return None
        if item[0] != _DER_BOOLEAN or len(item[1]) != 1:
            raise CertificateError(f"PCK extension Configuration.{index}: expected a BOOLEAN")
        return item[1] != b"\x00"

    instance = fields.get(OID_PLATFORM_INSTANCE_ID)
    return PckExtensions(
        ppid=_der_octets(*fields[OID_PPID], "PPID", PPID_SIZE),
        tcb_components=tuple(components),
        pcesvn=pcesvn,
        cpusvn=_der_octets(*tcb[OID_CPUSVN], "CPUSVN", CPU_SVN_SIZE),
        pce_id=_der_octets(*fields[OID_PCE_ID], "PCE-ID", PCE_ID_SIZE),
        fmspc=_der_octets(*fields[OID_FMSPC], "FMSPC", FMSPC_SIZE),
        sgx_type=_der_uint(*fields[OID_SGX_TYPE], "SGX Type", _DER_ENUMERATED),
        platform_instance_id=_der_octets(*instance, "PlatformInstanceID", None)
        if instance is not None else None,
        dynamic_platform=flag(1), cached_keys=flag(2), smt_enabled=flag(3),
    )
