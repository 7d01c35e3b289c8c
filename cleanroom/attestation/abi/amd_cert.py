"""AMD VCEK / VLEK certificates: load them and decode AMD's X.509 extensions.

AMD KDS encodes the TCB the key was derived from and the chip identity in private extensions
under OID 1.3.6.1.4.1.3704.1 (AMD "Versioned Chip Endorsement Key" specification, pub. 57230):
``.1`` structVersion, ``.2`` productName, ``.3.1`` blSPL, ``.3.2`` teeSPL, ``.3.3`` snpSPL,
``.3.8`` ucodeSPL, ``.3.9`` fmcSPL (Turin), ``.4`` hwID (VCEK), ``.5`` cspID (VLEK).
Integers and strings are DER inside the extension value; hwID is the raw chip id bytes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cleanroom.attestation.abi._x509 import (
    X509_EXTENSION_ERRORS,
    X509_KEY_ERRORS,
    X509_LOAD_ERRORS,
)
from cleanroom.attestation.abi.snp import Product, TcbVersion
from cleanroom.errors import CertificateError

AMD_OID_PREFIX = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = f"{AMD_OID_PREFIX}.1"
OID_PRODUCT_NAME = f"{AMD_OID_PREFIX}.2"
OID_BL_SPL = f"{AMD_OID_PREFIX}.3.1"
OID_TEE_SPL = f"{AMD_OID_PREFIX}.3.2"
OID_SNP_SPL = f"{AMD_OID_PREFIX}.3.3"
OID_UCODE_SPL = f"{AMD_OID_PREFIX}.3.8"
OID_FMC_SPL = f"{AMD_OID_PREFIX}.3.9"
OID_HWID = f"{AMD_OID_PREFIX}.4"
OID_CSP_ID = f"{AMD_OID_PREFIX}.5"

MAX_CERT_BYTES = 64 * 1024
_SERIAL_ZERO_WARNING = "Parsed a serial number which wasn't positive"

_DER_INTEGER = 0x02
_DER_IA5STRING = 0x16
_DER_UTF8STRING = 0x0C


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Load one DER certificate or every certificate of a PEM bundle.

    Real VCEKs have serial number 0, which cryptography accepts with a deprecation warning; we
    silence exactly that warning and nothing else.
    """
    if len(data) > MAX_CERT_BYTES:
        raise CertificateError(f"certificate data is {len(data)} bytes, limit {MAX_CERT_BYTES}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_ZERO_WARNING)
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                return list(x509.load_pem_x509_certificates(data))
            return [x509.load_der_x509_certificate(data)]
        except X509_LOAD_ERRORS as exc:
            raise CertificateError(f"not a DER or PEM X.509 certificate: {exc}") from None


def _der_value(raw: bytes, tag: int, what: str) -> bytes:
    if len(raw) < 2 or raw[0] != tag:
        raise CertificateError(f"AMD extension {what}: expected DER tag {tag:#x}")
    length = raw[1]
    offset = 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 2 or len(raw) < 2 + n:
            raise CertificateError(f"AMD extension {what}: bad DER length")
        length = int.from_bytes(raw[2:2 + n], "big")
        offset = 2 + n
    if offset + length != len(raw):
        raise CertificateError(f"AMD extension {what}: DER length does not match")
    return raw[offset:offset + length]


def _der_int(raw: bytes, what: str) -> int:
    value = _der_value(raw, _DER_INTEGER, what)
    if not value:
        raise CertificateError(f"AMD extension {what}: empty INTEGER")
    return int.from_bytes(value, "big", signed=True)


def _der_string(raw: bytes, what: str) -> str:
    tag = raw[0] if raw else -1
    if tag not in (_DER_IA5STRING, _DER_UTF8STRING):
        raise CertificateError(f"AMD extension {what}: expected a string")
    return _der_value(raw, tag, what).decode("ascii", errors="replace")


@dataclass(frozen=True)
class AmdKeyCertificate:
    """A VCEK or VLEK with its decoded AMD extensions."""

    cert: x509.Certificate
    product_name: str | None
    struct_version: int | None
    bootloader: int | None
    tee: int | None
    snp: int | None
    microcode: int | None
    fmc: int | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def kind(self) -> str:
        """'vlek' when the certificate carries a CSP id, else 'vcek'."""
        if self.csp_id is not None or "VLEK" in self.cert.subject.rfc4514_string():
            return "vlek"
        return "vcek"

    @property
    def product(self) -> Product | None:
        if self.product_name is None:
            return None
        try:
            return Product.from_name(self.product_name)
        except Exception:  # noqa: BLE001 - unknown product names are reported by the verifier
            return None

    def tcb_matches(self, tcb: TcbVersion) -> list[str]:
        """Mismatches between the certificate's TCB extensions and a report TCB (empty = equal)."""
        pairs = {"bootloader": (self.bootloader, tcb.bootloader), "tee": (self.tee, tcb.tee),
                 "snp": (self.snp, tcb.snp), "microcode": (self.microcode, tcb.microcode)}
        if tcb.fmc is not None or self.fmc is not None:
            pairs["fmc"] = (self.fmc, tcb.fmc)
        return [f"{name} certificate={cert_v} report={rep_v}"
                for name, (cert_v, rep_v) in pairs.items() if cert_v != rep_v]


def parse_amd_key_certificate(cert: x509.Certificate) -> AmdKeyCertificate:
    """Decode the AMD extensions of a VCEK/VLEK (missing extensions become None)."""
    if not isinstance(_public_key(cert), ec.EllipticCurvePublicKey):
        raise CertificateError("VCEK/VLEK public key is not an elliptic-curve key")
    values: dict[str, bytes] = {}
    try:
        extensions = list(cert.extensions)
    except X509_EXTENSION_ERRORS as exc:
        raise CertificateError(f"VCEK/VLEK extensions are malformed: {exc}") from None
    for ext in extensions:
        oid = ext.oid.dotted_string
        if oid.startswith(AMD_OID_PREFIX) and isinstance(ext.value, x509.UnrecognizedExtension):
            values[oid] = ext.value.value

    def integer(oid: str, name: str) -> int | None:
        return _der_int(values[oid], name) if oid in values else None

    hwid = values.get(OID_HWID)
    if hwid is not None and hwid[:1] == b"\x04" and len(hwid) in (66, 10):
        hwid = _der_value(hwid, 0x04, "hwID")  # tolerate a DER-wrapped OCTET STRING
    return AmdKeyCertificate(
        cert=cert,
        product_name=_der_string(values[OID_PRODUCT_NAME], "productName")
        if OID_PRODUCT_NAME in values else None,
        struct_version=integer(OID_STRUCT_VERSION, "structVersion"),
        bootloader=integer(OID_BL_SPL, "blSPL"),
        tee=integer(OID_TEE_SPL, "teeSPL"),
        snp=integer(OID_SNP_SPL, "snpSPL"),
        microcode=integer(OID_UCODE_SPL, "ucodeSPL"),
        fmc=integer(OID_FMC_SPL, "fmcSPL"),
        hwid=hwid,
        csp_id=_der_string(values[OID_CSP_ID], "cspID") if OID_CSP_ID in values else None,
    )


def _public_key(cert: x509.Certificate) -> object:
    """The certificate's public key, or None when it does not decode (a broken SPKI)."""
    try:
        return cert.public_key()
    except X509_KEY_ERRORS:
        return None


def pick_key_certificate(certs: list[x509.Certificate]) -> x509.Certificate:
    """From a PEM bundle that may also hold ASK/ARK, pick the VCEK/VLEK (the EC-keyed leaf)."""
    leaves = [c for c in certs if isinstance(_public_key(c), ec.EllipticCurvePublicKey)]
    if not leaves:
        raise CertificateError("no VCEK/VLEK (elliptic-curve certificate) in the given data")
    if len(leaves) > 1:
        raise CertificateError(f"{len(leaves)} elliptic-curve certificates given; expect one "
                               "VCEK or VLEK")
    return leaves[0]
