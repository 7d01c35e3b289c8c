"""TDX authenticity: quote signature, QE report, and the PCK chain to the pinned Intel root.

Checks (each reported separately, all collected):

* ``quote_signature``: the ECDSA P-256/SHA-256 signature over header and body verifies with the
  attestation key carried in the quote;
* ``qe_report_binding``: QE REPORTDATA[0:32] = SHA-256(attestation key || QE auth data) and
  REPORTDATA[32:64] is zero (the QE vouches for that attestation key);
* ``pck_certificate``: the PCK leaf is an ECDSA P-256 certificate with decodable SGX extensions
  (FMSPC, PCE-ID, TCB component SVNs, PCESVN);
* ``qe_report_signature``: the 384-byte QE report is signed by the PCK key;
* ``pck_chain``: PCK <- intermediate (PCK Platform/Processor CA) <- the *pinned* Intel SGX Root
  CA passed as ``root``. A root certificate carried in the quote is never trusted: it is only
  required to be byte-identical to the pinned one when present;
* ``validity``: root, intermediate and PCK are all valid at the verification time;
* with collateral, every check of :func:`cleanroom.attestation.verify.collateral.check_collateral`
  (TCB info / QE identity signatures and dates, CRLs, QE identity, TDX module, TCB status);
* without collateral, ``qe_identity`` when a pinned QE identity is given (the evidence pipeline
  always gives Intel's, :func:`cleanroom.attestation.trust.intel_td_qe_identity`): the QE
  report's MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES match Intel's TD Quoting Enclave, so
  an enclave the host controls cannot pose as the quoting enclave.

ECDSA signatures are malleable: (r, n - s) verifies as well as (r, s). Nothing here (or in the
callers) may deduplicate or identify evidence by its signature bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cleanroom.attestation.abi._x509 import X509_EXTENSION_ERRORS
from cleanroom.attestation.abi.tdx import (
    REPORT_DATA_SIZE,
    EcdsaSignature,
    PckExtensions,
    TdxQuote,
    parse_pck_extensions,
)
from cleanroom.attestation.abi.tdx_collateral import QeIdentityValues, TdxCollateral
from cleanroom.attestation.trust import validity_problem
from cleanroom.attestation.verdict import Check, Layer, failed, passed
from cleanroom.attestation.verify.chain import der, issued_by
from cleanroom.attestation.verify.collateral import check_collateral, qe_identity_check
from cleanroom.errors import CertificateError

QE_REPORT_DATA_HASH_SIZE = 32
PCK_CHAIN_MIN = 2  # PCK and intermediate; the root is optional (and never trusted)
PCK_CHAIN_MAX = 3
INTERMEDIATE_NAMES = ("Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA")
_V = Layer.VERIFY


@dataclass(frozen=True)
class TdxVerification:
    """What the verify layer established about one quote."""

    checks: tuple[Check, ...]
    tcb_status: str | None = None  # only with collateral
    pck: PckExtensions | None = None
    advisory_ids: tuple[str, ...] = ()
    pck_certificate: x509.Certificate | None = None
    intermediate: x509.Certificate | None = None
    collateral_checked: bool = False

    @property
    def authentic(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)




def _common_name(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        return "?"
    value = names[0].value if names else "?"
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _p256_key(key: object) -> ec.EllipticCurvePublicKey | None:
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def verify_p256(key: ec.EllipticCurvePublicKey, signature: EcdsaSignature,
                message: bytes) -> bool:
    """ECDSA P-256/SHA-256 over ``message``; False for any invalid signature."""
    try:
        der = encode_dss_signature(signature.r, signature.s)
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def attestation_public_key(quote: TdxQuote) -> ec.EllipticCurvePublicKey | None:
    """The quote's attestation key (x||y) as a P-256 key; None if not a point on the curve."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key)
    except ValueError:
        return None


def _quote_signature(quote: TdxQuote) -> Check:
    key = attestation_public_key(quote)
    if key is None:
        return failed("quote_signature", "attestation key is not a valid P-256 point", _V)
    if not verify_p256(key, quote.signature, quote.signed_bytes):
        return failed("quote_signature", "quote signature over header and body does not "
                      "verify with the attestation key", _V)
    return passed("quote_signature", "ECDSA P-256 signature over header and body verifies", _V)


def _qe_binding(quote: TdxQuote) -> Check:
    cert = quote.certification
    expect = hashlib.sha256(quote.attestation_key + cert.qe_auth_data).digest()
    data = cert.qe_report.report_data
    problems = []
    if data[:QE_REPORT_DATA_HASH_SIZE] != expect:
        problems.append("QE REPORTDATA[0:32] is not SHA-256(attestation key || QE auth data)")
    if data[QE_REPORT_DATA_HASH_SIZE:REPORT_DATA_SIZE] != bytes(
            REPORT_DATA_SIZE - QE_REPORT_DATA_HASH_SIZE):
        problems.append("QE REPORTDATA[32:64] is not zero")
    if problems:
        return failed("qe_report_binding", "; ".join(problems), _V)
    return passed("qe_report_binding", "QE report binds the attestation key", _V)


def _chain(chain: tuple[x509.Certificate, ...], root: x509.Certificate,
           at: dt.datetime) -> tuple[list[Check], x509.Certificate | None]:
    """``pck_chain`` and ``validity`` checks; returns the intermediate when the chain holds."""
    if not PCK_CHAIN_MIN <= len(chain) <= PCK_CHAIN_MAX:
        return [failed("pck_chain", f"quote carries {len(chain)} certificate(s); expect the "
                       "PCK, its intermediate CA and optionally the root", _V)], None
    pck, intermediate = chain[0], chain[1]
    problems: list[str] = []
    if len(chain) == PCK_CHAIN_MAX and der(chain[2]) != der(root):
        problems.append(f"root certificate in the quote ({_common_name(chain[2])}) is not the "
                        "pinned Intel SGX Root CA")
    if not issued_by(root, root):
        problems.append("pinned root is not a valid self-signed certificate")
    inter_name = _common_name(intermediate)
    try:
        constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
        is_ca = constraints.value.ca
    except (x509.ExtensionNotFound, *X509_EXTENSION_ERRORS):
        is_ca = False
    if not is_ca:
        problems.append(f"intermediate {inter_name!r} is not a CA certificate")
    if inter_name not in INTERMEDIATE_NAMES:
        problems.append(f"intermediate is {inter_name!r}, expect one of {INTERMEDIATE_NAMES}")
    if not issued_by(intermediate, root):
        problems.append(f"intermediate {inter_name!r} is not issued by the pinned Intel SGX "
                        "Root CA")
    if not issued_by(pck, intermediate):
        problems.append(f"PCK certificate is not issued by {inter_name!r}")
    checks = [failed("pck_chain", "; ".join(problems), _V) if problems else
              passed("pck_chain", f"PCK <- {inter_name} <- pinned Intel SGX Root CA", _V)]
    validity = [p for p in (validity_problem(root, at, "Intel SGX Root CA"),
                            validity_problem(intermediate, at, inter_name),
                            validity_problem(pck, at, "PCK certificate")) if p]
    checks.append(failed("validity", "; ".join(validity), _V) if validity else
                  passed("validity", f"all certificates valid at {at.isoformat()}", _V))
    return checks, (None if problems else intermediate)


def verify_tdx(quote: TdxQuote, *, at: dt.datetime, root: x509.Certificate,
               collateral: TdxCollateral | None = None,
               qe_identity: QeIdentityValues | None = None) -> TdxVerification:
    """Verify ``quote`` against the pinned Intel SGX Root CA ``root`` (and optional collateral).

    ``at`` is the verification time (certificate validity, collateral dates, CRLs); a naive
    datetime is taken as UTC. ``qe_identity`` is the QE identity checked when no collateral is
    given (with collateral, the collateral's signed QE identity is checked instead); not checked
    if None. Every check runs; the result lists them all.
    """
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    checks: list[Check] = [_quote_signature(quote), _qe_binding(quote)]

    chain = quote.certification.pck_chain
    pck_cert = chain[0] if chain else None
    pck: PckExtensions | None = None
    pck_key: ec.EllipticCurvePublicKey | None = None
    if pck_cert is None:
        checks.append(failed("pck_certificate", "quote carries no PCK certificate", _V))
    else:
        try:
            pck_key = _p256_key(pck_cert.public_key())
            pck = parse_pck_extensions(pck_cert)
        except (CertificateError, ValueError, UnsupportedAlgorithm) as exc:
            checks.append(failed("pck_certificate", f"PCK certificate unusable: {exc}", _V))
        else:
            if pck_key is None:
                checks.append(failed("pck_certificate", "PCK public key is not ECDSA P-256", _V))
            else:
                checks.append(passed("pck_certificate", f"FMSPC {pck.fmspc_hex}, PCE-ID "
                                     f"{pck.pce_id_hex}, PCESVN {pck.pcesvn}", _V))

    qe = quote.certification
    if pck_key is None:
        checks.append(failed("qe_report_signature", "no usable PCK key to check the QE report "
                             "signature", _V))
    elif not verify_p256(pck_key, qe.qe_report_signature, qe.qe_report.raw):
        checks.append(failed("qe_report_signature", "QE report signature does not verify with "
                             "the PCK key", _V))
    else:
        checks.append(passed("qe_report_signature", "QE report signed by the PCK key", _V))

    chain_checks, intermediate = _chain(chain, root, at)
    checks.extend(chain_checks)

    tcb_status: str | None = None
    advisories: tuple[str, ...] = ()
    if collateral is not None:
        result = check_collateral(collateral, quote, at=at, root=root, pck=pck,
                                  pck_cert=pck_cert, intermediate=intermediate)
        checks.extend(result.checks)
        tcb_status = result.tcb_status
        advisories = result.advisory_ids
    elif qe_identity is not None:
        checks.append(qe_identity_check(qe.qe_report, qe_identity))
    return TdxVerification(checks=tuple(checks), tcb_status=tcb_status, pck=pck,
                           advisory_ids=advisories, pck_certificate=pck_cert,
                           intermediate=intermediate, collateral_checked=collateral is not None)
