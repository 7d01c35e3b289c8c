"""Intel PCS collateral for TDX: bytes -> typed, immutable structures, and nothing else.

Parses what Intel's Provisioning Certification Service (PCS) publishes about a platform family
(formats unchanged from PCS)::

    TCB info        {"tcbInfo": {...}, "signature": "<hex r||s>"}          (TDX, version 3)
    QE identity     {"enclaveIdentity": {...}, "signature": "<hex r||s>"}  (TD_QE, version 2)
    signing chain   PEM: Intel SGX TCB Signing certificate, then (optionally) the root
    CRLs            DER or PEM X.509 CRLs (PCK Platform/Processor CA, Intel SGX Root CA)

The signatures cover the exact bytes of the ``tcbInfo`` / ``enclaveIdentity`` JSON values as
they appear in the document: :func:`split_signed_json` slices those bytes from the raw text and
never re-serialises them. Every malformed input raises :class:`CollateralError` naming the file
and the JSON path. Pure functions: no I/O (reading a folder is
:mod:`cleanroom.attestation.collateral_folder`), no signature or date checks (that is
:mod:`cleanroom.attestation.verify.collateral`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from cleanroom.attestation.abi._x509 import X509_LOAD_ERRORS
from cleanroom.attestation.abi.tdx import TCB_COMPONENT_COUNT
from cleanroom.errors import CollateralError

TCB_INFO_FILE = "tcb_info.json"
QE_IDENTITY_FILE = "qe_identity.json"
TCB_SIGNING_CHAIN_FILE = "tcb_signing_chain.pem"
MAX_DOCUMENT_SIZE = 1024 * 1024  # a PCS document or CRL larger than this is refused unread

TCB_INFO_KEY = "tcbInfo"
QE_IDENTITY_KEY = "enclaveIdentity"
SIGNATURE_KEY = "signature"
TCB_INFO_ID_TDX = "TDX"
TCB_INFO_VERSION = 3
QE_IDENTITY_ID_TD_QE = "TD_QE"
QE_IDENTITY_VERSION = 2
SIGNATURE_SIZE = 64  # r||s, 32 bytes each
MAX_TCB_SIGNING_CHAIN = 4

UP_TO_DATE = "UpToDate"
SW_HARDENING_NEEDED = "SWHardeningNeeded"
CONFIGURATION_NEEDED = "ConfigurationNeeded"
CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
OUT_OF_DATE = "OutOfDate"
OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
REVOKED = "Revoked"
TCB_NOT_SUPPORTED = "TcbNotSupported"
TCB_STATUSES = frozenset({UP_TO_DATE, SW_HARDENING_NEEDED, CONFIGURATION_NEEDED,
                          CONFIGURATION_AND_SW_HARDENING_NEEDED, OUT_OF_DATE,
                          OUT_OF_DATE_CONFIGURATION_NEEDED, REVOKED})

TDX_MODULE_MRSIGNER_SIZE = 48
TDX_MODULE_ATTRIBUTES_SIZE = 8
QE_MRSIGNER_SIZE = 32
QE_MISCSELECT_SIZE = 4
QE_ATTRIBUTES_SIZE = 16
FMSPC_SIZE = 6
PCE_ID_SIZE = 2


# --------------------------------------------------------------------------- typed collateral


@dataclass(frozen=True)
class TcbLevel:
    """One entry of ``tcbInfo.tcbLevels`` (TDX, version 3)."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...]
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class EnclaveTcbLevel:
    """A TCB level keyed by one ISVSVN (QE identity, TDX module identities)."""

    isvsvn: int
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    """``tcbInfo.tdxModule`` (id None) or one of ``tcbInfo.tdxModuleIdentities``."""

    id: str | None
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[EnclaveTcbLevel, ...] = ()


@dataclass(frozen=True)
class TcbInfo:
    """A signed TDX TCB info. ``body`` is the exact signed bytes of the ``tcbInfo`` value."""

    body: bytes
    signature: bytes
    id: str
    version: int
    issue_date: dt.datetime
    next_update: dt.datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


@dataclass(frozen=True)
class QeIdentityValues:
    """What a Quoting Enclave's report must match: its signer, product and masked attributes.

    A QE report matches when MRSIGNER and ISVPRODID are equal and ``MISCSELECT & miscselect_mask
    == miscselect`` and ``ATTRIBUTES & attributes_mask == attributes`` (Intel's rule).
    """

    mrsigner: bytes
    isvprodid: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    source: str = "QE identity"  # where the values come from, named in check reasons


@dataclass(frozen=True)
class QeIdentity:
    """A signed TD_QE identity. ``body`` is the exact signed bytes of ``enclaveIdentity``."""

    body: bytes
    signature: bytes
    id: str
    version: int
    issue_date: dt.datetime
    next_update: dt.datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[EnclaveTcbLevel, ...]

    @property
    def values(self) -> QeIdentityValues:
        return QeIdentityValues(mrsigner=self.mrsigner, isvprodid=self.isvprodid,
                                miscselect=self.miscselect, miscselect_mask=self.miscselect_mask,
                                attributes=self.attributes, attributes_mask=self.attributes_mask,
                                source=self.id)


@dataclass(frozen=True)
class TdxCollateral:
    """Parsed collateral for one platform family; nothing in it is trusted until checked."""

    tcb_info: TcbInfo
    qe_identity: QeIdentity
    tcb_signing_chain: tuple[x509.Certificate, ...]  # signing certificate first
    pck_crl: x509.CertificateRevocationList | None = None
    root_crl: x509.CertificateRevocationList | None = None
    source: str | None = None


# --------------------------------------------------------------------------- JSON helpers

_JSON_WS = " \t\n\r"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def split_signed_json(data: bytes, source: str) -> dict[str, tuple[Any, bytes]]:
    """Top-level members of a JSON object as ``{key: (decoded value, exact raw bytes)}``.

    The raw bytes are sliced from the text as it is (never re-serialised), so a signature over
    a member's value can be checked against exactly what was signed. Duplicate keys anywhere are
    refused (they would make "the" signed value ambiguous).
    """
    _bounded(data, source)
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CollateralError(f"{source}: not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start})") from None
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    out: dict[str, tuple[Any, bytes]] = {}

    def fail(pos: int, what: str) -> CollateralError:
        return CollateralError(f"{source}: not a JSON object: {what} at character {pos}")

    pos = _skip_ws(text, 0)
    if text[pos:pos + 1] != "{":
        raise fail(pos, "expected '{'")
    pos = _skip_ws(text, pos + 1)
    if text[pos:pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos:pos + 1] != '"':
                raise fail(pos, "expected a member name")
            try:
                key, pos = json.decoder.scanstring(text, pos + 1)
                pos = _skip_ws(text, pos)
                if text[pos:pos + 1] != ":":
                    raise fail(pos, "expected ':'")
                start = _skip_ws(text, pos + 1)
                value, end = decoder.raw_decode(text, start)
            except (ValueError, RecursionError) as exc:
                raise CollateralError(f"{source}: invalid JSON: {exc}") from None
            if key in out:
                raise CollateralError(f"{source}: duplicate top-level key {key!r}")
            out[key] = (value, text[start:end].encode("utf-8"))
            pos = _skip_ws(text, end)
            if text[pos:pos + 1] == ",":
                pos = _skip_ws(text, pos + 1)
                continue
            if text[pos:pos + 1] == "}":
                pos += 1
                break
            raise fail(pos, "expected ',' or '}'")
    if text[pos:].strip(_JSON_WS):
        raise fail(pos, "unexpected text after the object")
    return out


class _Obj:
    """Typed access to one JSON object; every error names the file and the JSON path."""

    def __init__(self, value: Any, path: str, source: str) -> None:
        if not isinstance(value, dict):
            raise CollateralError(f"{source}: {path} is not a JSON object")
        self.value = value
        self.path = path
        self.source = source

    def error(self, key: str, detail: str) -> CollateralError:
        return CollateralError(f"{self.source}: {self.path}.{key} {detail}")

    def has(self, key: str) -> bool:
        return key in self.value

    def raw(self, key: str) -> Any:
        if key not in self.value:
            raise self.error(key, "is missing")
        return self.value[key]

    def obj(self, key: str) -> _Obj:
        return _Obj(self.raw(key), f"{self.path}.{key}", self.source)

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"is {type(value).__name__}, expect a string")
        return value

    def integer(self, key: str, maximum: int = 0xFFFFFFFF) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"is {type(value).__name__}, expect an integer")
        if not 0 <= value <= maximum:
            raise self.error(key, f"is {value}, expect 0..{maximum}")
        return value

    def hexbytes(self, key: str, size: int) -> bytes:
        value = self.text(key)
        try:
            out = bytes.fromhex(value)
        except ValueError:
            raise self.error(key, "is not hex") from None
        if len(out) != size or len(value) != 2 * size:
            raise self.error(key, f"is {len(value)} hex digits, expect {2 * size}")
        return out

    def date(self, key: str) -> dt.datetime:
        value = self.text(key)
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise self.error(key, f"{value!r} is not an ISO 8601 date") from None
        if when.tzinfo is None:
            raise self.error(key, f"{value!r} has no time zone")
        return when.astimezone(dt.UTC)

    def items(self, key: str) -> list[Any]:
        value = self.raw(key)
        if not isinstance(value, list):
            raise self.error(key, f"is {type(value).__name__}, expect a list")
        return value

    def status(self, key: str) -> str:
        value = self.text(key)
        if value not in TCB_STATUSES:
            raise self.error(key, f"is {value!r}, expect one of {sorted(TCB_STATUSES)}")
        return value

    def advisories(self) -> tuple[str, ...]:
        if not self.has("advisoryIDs"):
            return ()
        items = self.items("advisoryIDs")
        if not all(isinstance(i, str) for i in items):
            raise self.error("advisoryIDs", "must be a list of strings")
        return tuple(items)


def _signature(members: dict[str, tuple[Any, bytes]], source: str) -> bytes:
    if SIGNATURE_KEY not in members:
        raise CollateralError(f"{source}: top-level {SIGNATURE_KEY!r} is missing")
    value = members[SIGNATURE_KEY][0]
    if not isinstance(value, str):
        raise CollateralError(f"{source}: {SIGNATURE_KEY} is not a string")
    try:
        sig = bytes.fromhex(value)
    except ValueError:
        raise CollateralError(f"{source}: {SIGNATURE_KEY} is not hex") from None
    if len(sig) != SIGNATURE_SIZE:
        raise CollateralError(f"{source}: {SIGNATURE_KEY} is {len(sig)} bytes, expect "
                              f"{SIGNATURE_SIZE} (r||s)")
    return sig


def _components(level: _Obj, key: str) -> tuple[int, ...]:
    items = level.items(key)
    if len(items) != TCB_COMPONENT_COUNT:
        raise level.error(key, f"has {len(items)} entries, expect {TCB_COMPONENT_COUNT}")
    return tuple(_Obj(item, f"{level.path}.{key}[{i}]", level.source).integer("svn", 0xFF)
                 for i, item in enumerate(items))


def _enclave_levels(parent: _Obj, key: str = "tcbLevels") -> tuple[EnclaveTcbLevel, ...]:
    out = []
    for i, item in enumerate(parent.items(key)):
        level = _Obj(item, f"{parent.path}.{key}[{i}]", parent.source)
        out.append(EnclaveTcbLevel(isvsvn=level.obj("tcb").integer("isvsvn", 0xFFFF),
                                   tcb_date=level.text("tcbDate"), status=level.status("tcbStatus"),
                                   advisory_ids=level.advisories()))
    if not out:
        raise parent.error(key, "is empty")
    return tuple(out)


def _module(obj: _Obj, with_levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=obj.text("id") if with_levels else None,
        mrsigner=obj.hexbytes("mrsigner", TDX_MODULE_MRSIGNER_SIZE),
        attributes=obj.hexbytes("attributes", TDX_MODULE_ATTRIBUTES_SIZE),
        attributes_mask=obj.hexbytes("attributesMask", TDX_MODULE_ATTRIBUTES_SIZE),
        tcb_levels=_enclave_levels(obj) if with_levels else ())


def _signed_document(data: bytes, source: str, key: str, expected_id: str, what: str,
                     expected_version: int) -> tuple[_Obj, bytes, bytes]:
    """The signed member ``key`` of a PCS document, its exact body bytes and signature, after
    checking its ``id`` and ``version``."""
    members = split_signed_json(data, source)
    if key not in members:
        raise CollateralError(f"{source}: top-level {key!r} is missing")
    value, body = members[key]
    obj = _Obj(value, key, source)
    ident = obj.text("id")
    if ident != expected_id:
        raise obj.error("id", f"is {ident!r}, expect {expected_id!r} ({what})")
    version = obj.integer("version")
    if version != expected_version:
        raise obj.error("version", f"is {version}, expect {expected_version}")
    return obj, body, _signature(members, source)


def parse_tcb_info(data: bytes, source: str = TCB_INFO_FILE) -> TcbInfo:
    """Parse a PCS TDX TCB info document ``{"tcbInfo": {...}, "signature": "..."}``."""
    info, body, signature = _signed_document(data, source, TCB_INFO_KEY, TCB_INFO_ID_TDX,
                                             "a TDX TCB info", TCB_INFO_VERSION)
    ident, version = TCB_INFO_ID_TDX, TCB_INFO_VERSION
    levels: list[TcbLevel] = []
    for i, item in enumerate(info.items("tcbLevels")):
        level = _Obj(item, f"{TCB_INFO_KEY}.tcbLevels[{i}]", source)
        tcb = level.obj("tcb")
        levels.append(TcbLevel(
            sgx_components=_components(tcb, "sgxtcbcomponents"),
            pcesvn=tcb.integer("pcesvn", 0xFFFF),
            tdx_components=_components(tcb, "tdxtcbcomponents"),
            tcb_date=level.text("tcbDate"), status=level.status("tcbStatus"),
            advisory_ids=level.advisories()))
    if not levels:
        raise info.error("tcbLevels", "is empty")
    identities: list[TdxModuleIdentity] = []
    if info.has("tdxModuleIdentities"):
        for i, item in enumerate(info.items("tdxModuleIdentities")):
            identities.append(_module(_Obj(item, f"{TCB_INFO_KEY}.tdxModuleIdentities[{i}]",
                                           source), with_levels=True))
    return TcbInfo(
        body=body, signature=signature, id=ident, version=version,
        issue_date=info.date("issueDate"), next_update=info.date("nextUpdate"),
        fmspc=info.hexbytes("fmspc", FMSPC_SIZE), pce_id=info.hexbytes("pceId", PCE_ID_SIZE),
        tcb_type=info.integer("tcbType"),
        tcb_evaluation_data_number=info.integer("tcbEvaluationDataNumber"),
        tdx_module=_module(info.obj("tdxModule"), with_levels=False)
        if info.has("tdxModule") else None,
        tdx_module_identities=tuple(identities), tcb_levels=tuple(levels))


def parse_qe_identity(data: bytes, source: str = QE_IDENTITY_FILE) -> QeIdentity:
    """Parse a PCS TD QE identity ``{"enclaveIdentity": {...}, "signature": "..."}``."""
    ident, body, signature = _signed_document(data, source, QE_IDENTITY_KEY,
                                              QE_IDENTITY_ID_TD_QE, "the TDX QE",
                                              QE_IDENTITY_VERSION)
    return QeIdentity(
        body=body, signature=signature, id=QE_IDENTITY_ID_TD_QE, version=QE_IDENTITY_VERSION,
        issue_date=ident.date("issueDate"), next_update=ident.date("nextUpdate"),
        tcb_evaluation_data_number=ident.integer("tcbEvaluationDataNumber"),
        miscselect=ident.hexbytes("miscselect", QE_MISCSELECT_SIZE),
        miscselect_mask=ident.hexbytes("miscselectMask", QE_MISCSELECT_SIZE),
        attributes=ident.hexbytes("attributes", QE_ATTRIBUTES_SIZE),
        attributes_mask=ident.hexbytes("attributesMask", QE_ATTRIBUTES_SIZE),
        mrsigner=ident.hexbytes("mrsigner", QE_MRSIGNER_SIZE),
        isvprodid=ident.integer("isvprodid", 0xFFFF),
        tcb_levels=_enclave_levels(ident))


def parse_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    """A CRL in DER or PEM."""
    _bounded(data, source)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except X509_LOAD_ERRORS as exc:
        raise CollateralError(f"{source}: not a DER or PEM X.509 CRL: {exc}") from None


def parse_tcb_signing_chain(data: bytes, source: str = TCB_SIGNING_CHAIN_FILE) \
        -> tuple[x509.Certificate, ...]:
    """The TCB signing certificate, then optionally the root (PEM)."""
    _bounded(data, source)
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except X509_LOAD_ERRORS as exc:
        raise CollateralError(f"{source}: not a PEM certificate chain: {exc}") from None
    if not 1 <= len(certs) <= MAX_TCB_SIGNING_CHAIN:
        raise CollateralError(f"{source}: holds {len(certs)} certificates, expect the TCB "
                              "signing certificate and optionally the root")
    return certs


def _bounded(data: bytes, source: str) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise CollateralError(f"{source}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_DOCUMENT_SIZE:
        raise CollateralError(f"{source}: {len(data)} bytes, limit {MAX_DOCUMENT_SIZE}")


@dataclass(frozen=True)
class CollateralFiles:
    """The raw bytes of one collateral set, as read from a folder (or received otherwise).

    ``pck_crl`` / ``root_crl`` are ``(file name, bytes)`` when present.
    """

    tcb_info: bytes
    qe_identity: bytes
    tcb_signing_chain: bytes
    pck_crl: tuple[str, bytes] | None = None
    root_crl: tuple[str, bytes] | None = None
    source: str | None = None


def parse_collateral(files: CollateralFiles) -> TdxCollateral:
    """Parse every document of ``files``; :class:`CollateralError` names the first bad one."""
    return TdxCollateral(
        tcb_info=parse_tcb_info(files.tcb_info, TCB_INFO_FILE),
        qe_identity=parse_qe_identity(files.qe_identity, QE_IDENTITY_FILE),
        tcb_signing_chain=parse_tcb_signing_chain(files.tcb_signing_chain,
                                                  TCB_SIGNING_CHAIN_FILE),
        pck_crl=parse_crl(files.pck_crl[1], files.pck_crl[0]) if files.pck_crl else None,
        root_crl=parse_crl(files.root_crl[1], files.root_crl[0]) if files.root_crl else None,
        source=files.source)
