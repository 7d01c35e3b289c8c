"""TDX collateral checks: parsed collateral + a quote -> checks and the TCB status (pure).

Collateral is optional: without it a quote can still be shown authentic (signatures and the
PCK chain), and its Quoting Enclave is checked against Intel's QE identity pinned in
:mod:`cleanroom.attestation.trust`, but nothing can be said about how current the platform's TCB
is. Parsing is :mod:`cleanroom.attestation.abi.tdx_collateral`; reading a folder is
:mod:`cleanroom.attestation.collateral_folder`.

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
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cleanroom.attestation.abi._x509 import X509_KEY_ERRORS
from cleanroom.attestation.abi.tdx import (
    TCB_COMPONENT_COUNT,
    EnclaveReport,
    PckExtensions,
    TdxQuote,
)
from cleanroom.attestation.abi.tdx_collateral import (
    CONFIGURATION_AND_SW_HARDENING_NEEDED,
    CONFIGURATION_NEEDED,
    OUT_OF_DATE,
    OUT_OF_DATE_CONFIGURATION_NEEDED,
    QE_MISCSELECT_SIZE,
    REVOKED,
    SW_HARDENING_NEEDED,
    TCB_NOT_SUPPORTED,
    TCB_SIGNING_CHAIN_FILE,
    TDX_MODULE_ATTRIBUTES_SIZE,
    UP_TO_DATE,
    EnclaveTcbLevel,
    QeIdentityValues,
    TcbInfo,
    TcbLevel,
    TdxCollateral,
    TdxModuleIdentity,
)
from cleanroom.attestation.trust import validity_problem
from cleanroom.attestation.verdict import Check, Layer, failed, passed
from cleanroom.attestation.verify.chain import der, issued_by

__all__ = ["TCB_NOT_SUPPORTED", "CollateralResult", "check_collateral", "converge",
           "match_enclave_level", "match_tcb_level", "qe_identity_check", "tdx_module_identity"]

TDX_MODULE_VERSION_INDEX = 1  # TEE_TCB_SVN[1]: TDX module major version
TDX_MODULE_ISVSVN_INDEX = 0  # TEE_TCB_SVN[0]: TDX module SVN

_V = Layer.VERIFY


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
    try:
        key = cert.public_key()
    except X509_KEY_ERRORS:
        return "signing certificate key does not decode"
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


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & m for a, m in zip(value, mask, strict=True))


def qe_identity_problems(qe: EnclaveReport, identity: QeIdentityValues) -> list[str]:
    """Each field of the QE report that does not match ``identity``: field, found, expected."""
    problems: list[str] = []
    if qe.mr_signer != identity.mrsigner:
        problems.append(f"QE MRSIGNER is {qe.mr_signer.hex()}, expect "
                        f"{identity.mrsigner.hex()}")
    if qe.isv_prod_id != identity.isvprodid:
        problems.append(f"QE ISVPRODID is {qe.isv_prod_id}, expect {identity.isvprodid}")
    misc = qe.misc_select.to_bytes(QE_MISCSELECT_SIZE, "little")
    if _masked(misc, identity.miscselect_mask) != identity.miscselect:
        problems.append(f"QE MISCSELECT is {misc.hex()} (masked with "
                        f"{identity.miscselect_mask.hex()}), expect {identity.miscselect.hex()}")
    if _masked(qe.attributes, identity.attributes_mask) != identity.attributes:
        problems.append(f"QE ATTRIBUTES is {qe.attributes.hex()} (masked with "
                        f"{identity.attributes_mask.hex()}), expect {identity.attributes.hex()}")
    return problems


def qe_identity_check(qe: EnclaveReport, identity: QeIdentityValues) -> Check:
    """``qe_identity``: the QE report matches ``identity`` (whose source the reason names)."""
    problems = qe_identity_problems(qe, identity)
    if problems:
        return failed("qe_identity", "; ".join(problems) + f" ({identity.source})", _V)
    return passed("qe_identity", f"QE matches {identity.source} (MRSIGNER "
                  f"{identity.mrsigner.hex()[:16]}..., ISVPRODID {identity.isvprodid})", _V)


def _signing_chain_check(collateral: TdxCollateral, root: x509.Certificate,
                         at: dt.datetime) -> Check:
    """``tcb_signing_chain``: the TCB signing certificate <- the pinned root, valid at ``at``."""
    signing = collateral.tcb_signing_chain[0]
    problems: list[str] = []
    for extra in collateral.tcb_signing_chain[1:]:
        if der(extra) != der(root):
            problems.append(f"certificate {extra.subject.rfc4514_string()} in "
                            f"{TCB_SIGNING_CHAIN_FILE} is not the pinned Intel SGX Root CA")
    if not issued_by(signing, root):
        problems.append(f"TCB signing certificate {signing.subject.rfc4514_string()} is "
                        "not issued by the pinned Intel SGX Root CA")
    problem = validity_problem(signing, at, "TCB signing certificate")
    if problem:
        problems.append(problem)
    if problems:
        return failed("tcb_signing_chain", "; ".join(problems), _V)
    return passed("tcb_signing_chain", "TCB signing certificate <- pinned Intel SGX Root CA, "
                  f"valid at {at.isoformat()}", _V)


def _document_checks(collateral: TdxCollateral, at: dt.datetime) -> list[Check]:
    """Signature by the TCB signing certificate and date window of TCB info and QE identity."""
    signing = collateral.tcb_signing_chain[0]
    docs = (("tcb_info", collateral.tcb_info, "TCB info"),
            ("qe_identity", collateral.qe_identity, "QE identity"))
    checks: list[Check] = []
    for name, doc, label in docs:
        problem = _verify_p256(signing, doc.signature, doc.body)
        checks.append(failed(f"{name}_signature", f"{label}: {problem}", _V) if problem
                      else passed(f"{name}_signature",
                                  f"{label} signed by the TCB signing certificate", _V))
    for name, doc, label in docs:
        window = _window(label, doc.issue_date, doc.next_update, at)
        checks.append(failed(f"{name}_fresh", window, _V) if window else
                      passed(f"{name}_fresh", f"{label} issued {doc.issue_date.isoformat()}, "
                             f"next update {doc.next_update.isoformat()}", _V))
    return checks


def _qe_tcb_check(qe: EnclaveReport, level: EnclaveTcbLevel | None) -> Check:
    if level is None:
        return failed("qe_tcb", f"QE ISVSVN {qe.isv_svn} is below every TCB level of the "
                      "QE identity", _V)
    if level.status == REVOKED:
        return failed("qe_tcb", f"QE ISVSVN {qe.isv_svn}: TCB status Revoked", _V)
    return passed("qe_tcb", f"QE ISVSVN {qe.isv_svn}: {level.status}", _V)


def _fmspc_check(info: TcbInfo, pck: PckExtensions) -> Check:
    problems = []
    if pck.fmspc != info.fmspc:
        problems.append(f"TCB info is for FMSPC {info.fmspc.hex()} but the PCK "
                        f"certificate says {pck.fmspc.hex()}")
    if pck.pce_id != info.pce_id:
        problems.append(f"TCB info is for PCE-ID {info.pce_id.hex()} but the PCK "
                        f"certificate says {pck.pce_id.hex()}")
    if problems:
        return failed("fmspc", "; ".join(problems), _V)
    return passed("fmspc", f"FMSPC {pck.fmspc.hex()}, PCE-ID {pck.pce_id.hex()}", _V)


@dataclass(frozen=True)
class _ModuleResult:
    check: Check
    status: str | None
    advisory_ids: tuple[str, ...]


def _tdx_module_check(info: TcbInfo, quote: TdxQuote) -> _ModuleResult:
    """``tdx_module``: MRSIGNERSEAM and SEAMATTRIBUTES against the module entry, and its TCB."""
    body = quote.body
    tee_tcb_svn = body.tee_tcb_svn
    version = tee_tcb_svn[TDX_MODULE_VERSION_INDEX]
    name = "tdxModule" if version == 0 else f"TDX_{version:02X}"
    module = tdx_module_identity(info, tee_tcb_svn)
    if module is None:
        return _ModuleResult(failed("tdx_module", f"TCB info has no {name} entry for TDX "
                                    f"module version {version}", _V), None, ())
    seam_attributes = body.seam_attributes.to_bytes(TDX_MODULE_ATTRIBUTES_SIZE, "little")
    problems = []
    if body.mr_signer_seam != module.mrsigner:
        problems.append(f"MRSIGNERSEAM {body.mr_signer_seam.hex()[:16]}... != "
                        f"{name} mrsigner {module.mrsigner.hex()[:16]}...")
    if _masked(seam_attributes, module.attributes_mask) != module.attributes:
        problems.append(f"SEAMATTRIBUTES {seam_attributes.hex()} & mask "
                        f"{module.attributes_mask.hex()} != {module.attributes.hex()}")
    reason, status, advisories = name, None, ()
    if version > 0:
        isvsvn = tee_tcb_svn[TDX_MODULE_ISVSVN_INDEX]
        level = match_enclave_level(module.tcb_levels, isvsvn)
        if level is None:
            problems.append(f"TDX module SVN {isvsvn} is below every TCB level of {name}")
        else:
            status, advisories = level.status, level.advisory_ids
            reason += f" SVN {isvsvn}: {status}"
    check = failed("tdx_module", "; ".join(problems), _V) if problems \
        else passed("tdx_module", reason, _V)
    return _ModuleResult(check, status, advisories)


def _tcb_level_check(info: TcbInfo, pck: PckExtensions, tee_tcb_svn: bytes,
                     module_status: str | None, qe_status: str | None,
                     advisories: list[str]) -> tuple[Check, str, tuple[str, ...]]:
    """``tcb_level``: Intel's TCB status of the platform, converged with module and QE."""
    level = match_tcb_level(info, pck, tee_tcb_svn)
    if level is None:
        # Authentic, but Intel lists no TCB level this platform meets: report the status and
        # let the policy refuse it (no policy should accept TCB_NOT_SUPPORTED).
        return passed(
            "tcb_level", f"{TCB_NOT_SUPPORTED}: no TCB level of the TCB info matches (PCK SGX "
            f"components {list(pck.tcb_components)}, PCESVN {pck.pcesvn}, TEE_TCB_SVN "
            f"{tee_tcb_svn.hex()})", _V), TCB_NOT_SUPPORTED, tuple(sorted(set(advisories)))
    advisories = [*advisories, *level.advisory_ids]
    status = converge(converge(level.status, module_status), qe_status)
    detail = f"platform {level.status} (TCB date {level.tcb_date})"
    if module_status is not None:
        detail += f", TDX module {module_status}"
    if qe_status is not None:
        detail += f", QE {qe_status}"
    unique = tuple(sorted(set(advisories)))
    if unique:
        detail += "; advisories " + ", ".join(unique)
    check = failed("tcb_level", f"{status}: {detail}", _V) if status == REVOKED \
        else passed("tcb_level", f"{status}: {detail}", _V)
    return check, status, unique


def check_collateral(collateral: TdxCollateral, quote: TdxQuote, *, at: dt.datetime,
                     root: x509.Certificate, pck: PckExtensions | None,
                     pck_cert: x509.Certificate | None,
                     intermediate: x509.Certificate | None) -> CollateralResult:
    """Every collateral check for ``quote``; all failures are collected.

    ``root`` is the *pinned* Intel SGX Root CA. ``pck``/``pck_cert``/``intermediate`` come from
    the quote's (already verified) PCK chain and may be None when that chain was unusable.
    """
    info = collateral.tcb_info
    signing = collateral.tcb_signing_chain[0]
    checks = [_signing_chain_check(collateral, root, at), *_document_checks(collateral, at)]
    checks.append(_crl_check("root_crl", collateral.root_crl, root, "Intel SGX Root CA",
                             ([("PCK intermediate CA", intermediate)] if intermediate else [])
                             + [("TCB signing certificate", signing)], at))
    checks.append(_crl_check("pck_crl", collateral.pck_crl, intermediate, "PCK intermediate CA",
                             [("PCK certificate", pck_cert)] if pck_cert else [], at))

    qe = quote.certification.qe_report
    qe_id = collateral.qe_identity
    checks.append(qe_identity_check(qe, qe_id.values))
    qe_level = match_enclave_level(qe_id.tcb_levels, qe.isv_svn)
    checks.append(_qe_tcb_check(qe, qe_level))
    advisories: list[str] = list(qe_level.advisory_ids) if qe_level else []
    if pck is None:
        checks.append(failed("tcb_status", "cannot evaluate the TCB: the PCK certificate's SGX "
                             "extensions are unavailable", _V))
        return CollateralResult(tuple(checks), None, tuple(sorted(set(advisories))))
    checks.append(_fmspc_check(info, pck))
    module = _tdx_module_check(info, quote)
    checks.append(module.check)
    advisories.extend(module.advisory_ids)
    level_check, status, unique = _tcb_level_check(
        info, pck, quote.body.tee_tcb_svn, module.status,
        qe_level.status if qe_level else None, advisories)
    checks.append(level_check)
    return CollateralResult(tuple(checks), status, unique)
