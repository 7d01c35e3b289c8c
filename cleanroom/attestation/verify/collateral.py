"""TDX collateral: load it from a folder, check its signatures and dates, and derive the TCB status.

Collateral is what Intel's Provisioning Certification Service (PCS) publishes about a platform
family, and it is optional: without it a quote can still be shown authentic (signatures and the
PCK chain), but nothing can be said about how current the platform's TCB is.

Folder layout read by :func:`load_collateral` (Intel PCS formats, unchanged)::

    tcb_info.json           {"tcbInfo": {...}, "signature": "<hex r||s>"}        (TDX, version 3)
    qe_identity.json        {"enclaveIdentity": {...}, "signature": "<hex r||s>"} (TD_QE, v 2)
    tcb_signing_chain.pem   Intel SGX TCB Signing certificate, then (optionally) the root
    pck_crl.der|.pem        optional: CRL of the PCK Platform/Processor CA
    root_crl.der|.pem       optional: CRL of the Intel SGX Root CA

The signatures cover the exact bytes of the ``tcbInfo`` / ``enclaveIdentity`` JSON values as
they appear in the file: those bytes are sliced from the raw text, never re-serialised.

:func:`check_collateral` returns one :class:`Check` per question (signing chain to the *pinned*
root, each signature, each date window at the verification time, each CRL, FMSPC/PCE-ID, QE
identity, QE TCB, TDX module identity, TDX TCB status). The TCB status follows Intel's
algorithm (SGX-TDX-DCAP-QuoteVerificationLibrary, also google/go-tdx-guest and dcap-qvl): the
first TCB level whose SGX components and PCESVN are <= the PCK certificate's and whose TDX
components are <= TEE_TCB_SVN (components 0 and 1 skipped when TEE_TCB_SVN[1], the TDX module
major version, is non-zero: the module is then matched in ``tdxModuleIdentities``), converged
with the TDX module and QE TCB statuses. TEE_TCB_SVN2 (TDX 1.5 bodies) is not used.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cleanroom.attestation.abi.tdx import (
    TCB_COMPONENT_COUNT,
    PckExtensions,
    TdxQuote,
)
from cleanroom.attestation.trust import validity_problem
from cleanroom.attestation.verdict import Check, Layer, failed, passed
from cleanroom.attestation.verify.chain import der, issued_by
from cleanroom.errors import CollateralError

TCB_INFO_FILE = "tcb_info.json"
QE_IDENTITY_FILE = "qe_identity.json"
TCB_SIGNING_CHAIN_FILE = "tcb_signing_chain.pem"
PCK_CRL_STEM = "pck_crl"
ROOT_CRL_STEM = "root_crl"
MAX_COLLATERAL_FILE_SIZE = 1024 * 1024

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

TDX_MODULE_VERSION_INDEX = 1  # TEE_TCB_SVN[1]: TDX module major version
TDX_MODULE_ISVSVN_INDEX = 0  # TEE_TCB_SVN[0]: TDX module SVN
TDX_MODULE_MRSIGNER_SIZE = 48
TDX_MODULE_ATTRIBUTES_SIZE = 8
QE_MRSIGNER_SIZE = 32
QE_MISCSELECT_SIZE = 4
QE_ATTRIBUTES_SIZE = 16
FMSPC_SIZE = 6
PCE_ID_SIZE = 2

_V = Layer.VERIFY


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


@dataclass(frozen=True)
class TdxCollateral:
    """Everything :func:`check_collateral` needs; nothing in it is trusted until checked."""

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


def load_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    """A CRL in DER or PEM."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CollateralError(f"{source}: not a DER or PEM X.509 CRL: {exc}") from None


def load_tcb_signing_chain(data: bytes, source: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise CollateralError(f"{source}: not a PEM certificate chain: {exc}") from None
    if not 1 <= len(certs) <= MAX_TCB_SIGNING_CHAIN:
        raise CollateralError(f"{source}: holds {len(certs)} certificates, expect the TCB "
                              "signing certificate and optionally the root")
    return certs


def _read(directory: Path, name: str, required: bool) -> bytes | None:
    path = directory / name
    if not path.is_file():
        if required:
            raise CollateralError(f"collateral {directory}: {name} is missing")
        return None
    try:
        size = path.stat().st_size
        if size > MAX_COLLATERAL_FILE_SIZE:
            raise CollateralError(f"collateral {path}: {size} bytes, limit "
                                  f"{MAX_COLLATERAL_FILE_SIZE}")
        return path.read_bytes()
    except OSError as exc:
        raise CollateralError(f"collateral {path}: cannot read: {exc.strerror}") from None


def _read_crl(directory: Path, stem: str) -> x509.CertificateRevocationList | None:
    found = [(n, d) for n in (f"{stem}.der", f"{stem}.pem")
             if (d := _read(directory, n, required=False)) is not None]
    if len(found) > 1:
        raise CollateralError(f"collateral {directory}: both {stem}.der and {stem}.pem; keep one")
    if not found:
        return None
    name, data = found[0]
    return load_crl(data, name)


def load_collateral(directory: Path) -> TdxCollateral:
    """Read and parse a collateral folder (see the module docstring for the layout).

    Raises :class:`CollateralError` naming the file (and JSON path) for anything malformed or
    missing. Nothing is verified here: :func:`check_collateral` does that.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CollateralError(f"collateral {directory} is not a folder")
    tcb_info = parse_tcb_info(_read(directory, TCB_INFO_FILE, True) or b"", TCB_INFO_FILE)
    qe_identity = parse_qe_identity(_read(directory, QE_IDENTITY_FILE, True) or b"",
                                    QE_IDENTITY_FILE)
    chain = load_tcb_signing_chain(_read(directory, TCB_SIGNING_CHAIN_FILE, True) or b"",
                                   TCB_SIGNING_CHAIN_FILE)
    return TdxCollateral(tcb_info=tcb_info, qe_identity=qe_identity, tcb_signing_chain=chain,
                         pck_crl=_read_crl(directory, PCK_CRL_STEM),
                         root_crl=_read_crl(directory, ROOT_CRL_STEM), source=str(directory))


# --------------------------------------------------------------------------- TCB evaluation


def match_tcb_level(tcb_info: TcbInfo, pck: PckExtensions, tee_tcb_svn: bytes) -> TcbLevel | None:
    """Intel's rule: the first level the platform (PCK TCB + TEE_TCB_SVN) is at or above."""
    start = 2 if tee_tcb_svn[TDX_MODULE_VERSION_INDEX] > 0 else 0
    for level in tcb_info.tcb_levels:
        if all(have >= need for have, need in zip(pck.tcb_components, level.sgx_components,
                                                  strict=True)) \
                and pck.pcesvn >= level.pcesvn \
                and all(tee_tcb_svn[i] >= level.tdx_components[i]
                        for i in range(start, TCB_COMPONENT_COUNT)):
            return level
    return None


def match_enclave_level(levels: tuple[EnclaveTcbLevel, ...], isvsvn: int) \
        -> EnclaveTcbLevel | None:
    """The first level whose ISVSVN is <= ``isvsvn``."""
    for level in levels:
        if isvsvn >= level.isvsvn:
            return level
    return None


def converge(status: str, other: str | None) -> str:
    """Fold the TDX module or QE TCB status into the platform status (Intel QVL rules)."""
    if other == OUT_OF_DATE:
        if status in (UP_TO_DATE, SW_HARDENING_NEEDED):
            return OUT_OF_DATE
        if status in (CONFIGURATION_NEEDED, CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return OUT_OF_DATE_CONFIGURATION_NEEDED
    if other == REVOKED:
        return REVOKED
    return status


def tdx_module_identity(tcb_info: TcbInfo, tee_tcb_svn: bytes) -> TdxModuleIdentity | None:
    """The module entry to match: ``tdxModule`` for version 0, else ``TDX_<version>``."""
    version = tee_tcb_svn[TDX_MODULE_VERSION_INDEX]
    if version == 0:
        return tcb_info.tdx_module
    wanted = f"TDX_{version:02X}"
    for identity in tcb_info.tdx_module_identities:
        if identity.id is not None and identity.id.upper() == wanted:
            return identity
    return None


@dataclass(frozen=True)
class CollateralResult:
    checks: tuple[Check, ...]
    tcb_status: str | None
    advisory_ids: tuple[str, ...]


def _verify_p256(cert: x509.Certificate, signature: bytes, message: bytes) -> str | None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        return "signing certificate key is not ECDSA P-256"
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "signature does not verify with the TCB signing certificate"
    return None




def _window(what: str, issued: dt.datetime, next_update: dt.datetime,
            at: dt.datetime) -> str | None:
    if at < issued:
        return f"{what} is issued {issued.isoformat()}, after the verification time " \
               f"{at.isoformat()}"
    if at > next_update:
        return f"{what} expired: nextUpdate {next_update.isoformat()} is before the " \
               f"verification time {at.isoformat()}"
    return None


def _crl_check(name: str, crl: x509.CertificateRevocationList | None,
               issuer: x509.Certificate | None, issuer_name: str,
               subjects: list[tuple[str, x509.Certificate]], at: dt.datetime) -> Check:
    if crl is None:
        return passed(name, f"not checked: no {name} given", _V)
    if issuer is None:
        return failed(name, f"no {issuer_name} certificate to check the CRL against", _V)
    problems: list[str] = []
    if crl.issuer != issuer.subject:
        problems.append(f"CRL issuer {crl.issuer.rfc4514_string()} is not the "
                        f"{issuer_name} ({issuer.subject.rfc4514_string()})")
    else:
        try:
            ok = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError, UnsupportedAlgorithm):
            ok = False
        if not ok:
            problems.append(f"CRL signature does not verify with the {issuer_name} key")
    next_update = crl.next_update_utc
    if next_update is None:
        problems.append("CRL has no nextUpdate")
    else:
        window = _window(f"{name}", crl.last_update_utc, next_update, at)
        if window:
            problems.append(window)
    for what, cert in subjects:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            problems.append(f"{what} (serial {cert.serial_number:x}) is REVOKED since "
                            f"{entry.revocation_date_utc.isoformat()}")
    if problems:
        return failed(name, "; ".join(problems), _V)
    covered = ", ".join(what for what, _ in subjects)
    return passed(name, f"signed by the {issuer_name}, current, {covered} not revoked "
                        f"({len(crl)} entries)", _V)


def check_collateral(collateral: TdxCollateral, quote: TdxQuote, *, at: dt.datetime,
                     root: x509.Certificate, pck: PckExtensions | None,
                     pck_cert: x509.Certificate | None,
                     intermediate: x509.Certificate | None) -> CollateralResult:
    """Every collateral check for ``quote``; all failures are collected.

    ``root`` is the *pinned* Intel SGX Root CA. ``pck``/``pck_cert``/``intermediate`` come from
    the quote's (already verified) PCK chain and may be None when that chain was unusable.
    """
    checks: list[Check] = []
    info = collateral.tcb_info
    qe_id = collateral.qe_identity

    # TCB signing certificate -> pinned root.
    signing = collateral.tcb_signing_chain[0]
    chain_problems: list[str] = []
    for extra in collateral.tcb_signing_chain[1:]:
        if der(extra) != der(root):
            chain_problems.append(f"certificate {extra.subject.rfc4514_string()} in "
                                  f"{TCB_SIGNING_CHAIN_FILE} is not the pinned Intel SGX Root CA")
    if not issued_by(signing, root):
        chain_problems.append(f"TCB signing certificate {signing.subject.rfc4514_string()} is "
                              "not issued by the pinned Intel SGX Root CA")
    problem = validity_problem(signing, at, "TCB signing certificate")
    if problem:
        chain_problems.append(problem)
    checks.append(failed("tcb_signing_chain", "; ".join(chain_problems), _V) if chain_problems
                  else passed("tcb_signing_chain", "TCB signing certificate <- pinned Intel "
                              f"SGX Root CA, valid at {at.isoformat()}", _V))

    for name, doc, label in (("tcb_info_signature", info, "TCB info"),
                             ("qe_identity_signature", qe_id, "QE identity")):
        sig_problem = _verify_p256(signing, doc.signature, doc.body)
        checks.append(failed(name, f"{label}: {sig_problem}", _V) if sig_problem
                      else passed(name, f"{label} signed by the TCB signing certificate", _V))

    for name, doc, label in (("tcb_info_fresh", info, "TCB info"),
                             ("qe_identity_fresh", qe_id, "QE identity")):
        window = _window(label, doc.issue_date, doc.next_update, at)
        checks.append(failed(name, window, _V) if window else
                      passed(name, f"{label} issued {doc.issue_date.isoformat()}, next update "
                             f"{doc.next_update.isoformat()}", _V))

    # CRLs.
    checks.append(_crl_check("root_crl", collateral.root_crl, root, "Intel SGX Root CA",
                             ([("PCK intermediate CA", intermediate)] if intermediate else [])
                             + [("TCB signing certificate", signing)], at))
    checks.append(_crl_check("pck_crl", collateral.pck_crl, intermediate, "PCK intermediate CA",
                             [("PCK certificate", pck_cert)] if pck_cert else [], at))

    # QE identity.
    qe = quote.certification.qe_report
    qe_problems: list[str] = []
    if qe.mr_signer != qe_id.mrsigner:
        qe_problems.append(f"QE MRSIGNER {qe.mr_signer.hex()} != {qe_id.mrsigner.hex()}")
    if qe.isv_prod_id != qe_id.isvprodid:
        qe_problems.append(f"QE ISVPRODID {qe.isv_prod_id} != {qe_id.isvprodid}")
    misc = qe.misc_select.to_bytes(QE_MISCSELECT_SIZE, "little")
    if bytes(a & m for a, m in zip(misc, qe_id.miscselect_mask, strict=True)) != \
            qe_id.miscselect:
        qe_problems.append(f"QE MISCSELECT {misc.hex()} & mask {qe_id.miscselect_mask.hex()} "
                           f"!= {qe_id.miscselect.hex()}")
    if bytes(a & m for a, m in zip(qe.attributes, qe_id.attributes_mask, strict=True)) != \
            qe_id.attributes:
        qe_problems.append(f"QE ATTRIBUTES {qe.attributes.hex()} & mask "
                           f"{qe_id.attributes_mask.hex()} != {qe_id.attributes.hex()}")
    checks.append(failed("qe_identity", "; ".join(qe_problems), _V) if qe_problems
                  else passed("qe_identity", f"QE matches {qe_id.id} (MRSIGNER "
                              f"{qe_id.mrsigner.hex()[:16]}..., ISVPRODID {qe_id.isvprodid})", _V))
    qe_level = match_enclave_level(qe_id.tcb_levels, qe.isv_svn)
    qe_status = qe_level.status if qe_level else None
    if qe_level is None:
        checks.append(failed("qe_tcb", f"QE ISVSVN {qe.isv_svn} is below every TCB level of the "
                             "QE identity", _V))
    elif qe_level.status == REVOKED:
        checks.append(failed("qe_tcb", f"QE ISVSVN {qe.isv_svn}: TCB status Revoked", _V))
    else:
        checks.append(passed("qe_tcb", f"QE ISVSVN {qe.isv_svn}: {qe_level.status}", _V))

    # FMSPC / PCE-ID and the TDX TCB.
    advisories: list[str] = list(qe_level.advisory_ids) if qe_level else []
    if pck is None:
        checks.append(failed("tcb_status", "cannot evaluate the TCB: the PCK certificate's SGX "
                             "extensions are unavailable", _V))
        return CollateralResult(tuple(checks), None, tuple(sorted(set(advisories))))
    fmspc_problems = []
    if pck.fmspc != info.fmspc:
        fmspc_problems.append(f"TCB info is for FMSPC {info.fmspc.hex()} but the PCK "
                              f"certificate says {pck.fmspc.hex()}")
    if pck.pce_id != info.pce_id:
        fmspc_problems.append(f"TCB info is for PCE-ID {info.pce_id.hex()} but the PCK "
                              f"certificate says {pck.pce_id.hex()}")
    checks.append(failed("fmspc", "; ".join(fmspc_problems), _V) if fmspc_problems
                  else passed("fmspc", f"FMSPC {pck.fmspc.hex()}, PCE-ID {pck.pce_id.hex()}",
                              _V))

    body = quote.body
    tee_tcb_svn = body.tee_tcb_svn
    module = tdx_module_identity(info, tee_tcb_svn)
    module_status: str | None = None
    version = tee_tcb_svn[TDX_MODULE_VERSION_INDEX]
    module_name = "tdxModule" if version == 0 else f"TDX_{version:02X}"
    if module is None:
        checks.append(failed("tdx_module", f"TCB info has no {module_name} entry for TDX "
                             f"module version {version}", _V))
    else:
        seam_attributes = body.seam_attributes.to_bytes(TDX_MODULE_ATTRIBUTES_SIZE, "little")
        module_problems = []
        if body.mr_signer_seam != module.mrsigner:
            module_problems.append(f"MRSIGNERSEAM {body.mr_signer_seam.hex()[:16]}... != "
                                   f"{module_name} mrsigner {module.mrsigner.hex()[:16]}...")
        if bytes(a & m for a, m in zip(seam_attributes, module.attributes_mask, strict=True)) \
                != module.attributes:
            module_problems.append(f"SEAMATTRIBUTES {seam_attributes.hex()} & mask "
                                   f"{module.attributes_mask.hex()} != {module.attributes.hex()}")
        module_reason = f"{module_name}"
        if version > 0:
            isvsvn = tee_tcb_svn[TDX_MODULE_ISVSVN_INDEX]
            module_level = match_enclave_level(module.tcb_levels, isvsvn)
            if module_level is None:
                module_problems.append(f"TDX module SVN {isvsvn} is below every TCB level of "
                                       f"{module_name}")
            else:
                module_status = module_level.status
                advisories.extend(module_level.advisory_ids)
                module_reason += f" SVN {isvsvn}: {module_status}"
        checks.append(failed("tdx_module", "; ".join(module_problems), _V) if module_problems
                      else passed("tdx_module", module_reason, _V))

    level = match_tcb_level(info, pck, tee_tcb_svn)
    if level is None:
        # Authentic, but Intel lists no TCB level this platform meets: report the status and
        # let the policy refuse it (no policy should accept TCB_NOT_SUPPORTED).
        checks.append(passed(
            "tcb_level", f"{TCB_NOT_SUPPORTED}: no TCB level of the TCB info matches (PCK SGX "
            f"components {list(pck.tcb_components)}, PCESVN {pck.pcesvn}, TEE_TCB_SVN "
            f"{tee_tcb_svn.hex()})", _V))
        return CollateralResult(tuple(checks), TCB_NOT_SUPPORTED,
                                tuple(sorted(set(advisories))))
    advisories.extend(level.advisory_ids)
    status = converge(converge(level.status, module_status), qe_status)
    detail = f"platform {level.status} (TCB date {level.tcb_date})"
    if module_status is not None:
        detail += f", TDX module {module_status}"
    if qe_status is not None:
        detail += f", QE {qe_status}"
    unique = tuple(sorted(set(advisories)))
    if unique:
        detail += "; advisories " + ", ".join(unique)
    checks.append(failed("tcb_level", f"{status}: {detail}", _V) if status == REVOKED
                  else passed("tcb_level", f"{status}: {detail}", _V))
    return CollateralResult(tuple(checks), status, unique)
