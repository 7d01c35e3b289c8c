"""SEV-SNP authenticity: report signature by the VCEK/VLEK, and the key's chain to a pinned root.

Checks (each reported separately, all collected):

* the VCEK/VLEK certificate parses and its AMD extensions decode;
* the report's SIGNING_KEY field names the kind of key that was given (VCEK or VLEK);
* the product (certificate productName, and the report's CPUID fields when present) agrees;
* the certificate chains ARK -> ASK/ASVK -> VCEK/VLEK to a *pinned* chain for that product
  (certificates that came with the evidence are never trusted);
* every certificate in the chain is valid at the verification time;
* the report's ECDSA P-384 signature over bytes [0, 0x2A0) verifies with the key;
* the certificate's TCB extensions equal REPORTED_TCB (the TCB the key was derived from);
* for a VCEK, its hwID equals CHIP_ID.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cleanroom.attestation.abi.amd_cert import (
    AmdKeyCertificate,
    parse_amd_key_certificate,
)
from cleanroom.attestation.abi.snp import Product, SigningKey, SnpReport, TcbVersion
from cleanroom.attestation.trust import AmdChain, validity_problem
from cleanroom.attestation.verdict import Check, Layer, failed, passed
from cleanroom.attestation.verify.chain import issued_by
from cleanroom.errors import CertificateError

TURIN_HWID_SIZE = 8
_V = Layer.VERIFY


@dataclass(frozen=True)
class SnpVerification:
    """What the verify layer established about one report."""

    checks: tuple[Check, ...]
    product: Product | None
    signing_key: str | None
    chain: AmdChain | None
    key_cert: AmdKeyCertificate | None
    reported_tcb: TcbVersion | None

    @property
    def authentic(self) -> bool:
        return all(c.passed for c in self.checks)



def verify_report_signature(report: SnpReport, public_key: object) -> str | None:
    """None when the signature verifies with ``public_key``, else the reason."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
            not isinstance(public_key.curve, ec.SECP384R1):
        return "signing key is not an ECDSA P-384 key"
    signature = encode_dss_signature(report.signature.r, report.signature.s)
    try:
        public_key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return "report signature does not verify with the VCEK/VLEK public key"
    return None


def _product(report: SnpReport, key: AmdKeyCertificate) -> tuple[Product | None, Check]:
    cert_product = key.product
    hint = report.product_hint
    if key.product_name is not None and cert_product is None:
        return None, failed("product", f"certificate productName {key.product_name!r} is not "
                            "a known SEV-SNP product", _V)
    if cert_product and hint and cert_product is not hint:
        return None, failed("product", f"certificate is for {cert_product.value} but report "
                            f"CPUID says {hint.value}", _V)
    product = cert_product or hint
    if product is None:
        return None, failed("product", "cannot tell the product: certificate has no "
                            "productName and the report (version < 3) has no CPUID", _V)
    return product, passed("product", f"{product.value}", _V)


def verify_snp(report: SnpReport, key_cert: x509.Certificate, *, at: dt.datetime,
               chains: Sequence[AmdChain]) -> SnpVerification:
    """Verify ``report`` against ``key_cert`` (VCEK or VLEK) and the given trusted ``chains``."""
    checks: list[Check] = []
    try:
        key = parse_amd_key_certificate(key_cert)
    except CertificateError as exc:
        checks.append(failed("certificate", str(exc), _V))
        return SnpVerification(tuple(checks), None, None, None, None, None)
    checks.append(passed("certificate", f"{key.kind.upper()} {key.product_name or ''}".strip(),
                         _V))

    # SIGNING_KEY field vs certificate kind
    if report.signing_key is SigningKey.NONE:
        checks.append(failed("signing_key", "report SIGNING_KEY is 7: the report is unsigned",
                             _V))
    elif report.signing_key.label != key.kind:
        checks.append(failed("signing_key", f"report SIGNING_KEY is {report.signing_key.name} "
                             f"but the certificate given is a {key.kind.upper()}", _V))
    else:
        checks.append(passed("signing_key", key.kind, _V))

    product, product_check = _product(report, key)
    checks.append(product_check)

    # Chain to a pinned root: ARK -> ASK/ASVK -> key.
    chain: AmdChain | None = None
    candidates = [c for c in chains if c.signing_key == key.kind
                  and (product is None or c.product is product)]
    for candidate in candidates:
        if issued_by(key_cert, candidate.intermediate) and \
                issued_by(candidate.intermediate, candidate.ark) and \
                issued_by(candidate.ark, candidate.ark):
            chain = candidate
            break
    if chain is None:
        what = f"{product.value} " if product else ""
        inter = "ASVK" if key.kind == "vlek" else "ASK"
        checks.append(failed("chain", f"{key.kind.upper()} is not issued by any trusted "
                             f"{what}{inter} ({len(candidates)} pinned chain(s) tried)", _V))
    else:
        checks.append(passed("chain", f"{key.kind.upper()} <- {chain.name}", _V))
        problems = [p for p in (validity_problem(chain.ark, at, "ARK"),
                                validity_problem(chain.intermediate, at, "ASK/ASVK"),
                                validity_problem(key_cert, at, key.kind.upper())) if p]
        if problems:
            checks.append(failed("validity", "; ".join(problems), _V))
        else:
            checks.append(passed("validity", f"all certificates valid at {at.isoformat()}", _V))

    # Report signature.
    problem = verify_report_signature(report, key_cert.public_key())
    checks.append(failed("signature", problem, _V) if problem
                  else passed("signature", "ECDSA P-384 signature verifies", _V))

    # TCB extensions vs REPORTED_TCB.
    reported = report.tcb("reported", product) if product else None
    if reported is not None:
        if key.bootloader is None and key.snp is None:
            checks.append(failed("tcb_binding", "certificate has no TCB extensions", _V))
        else:
            mismatches = key.tcb_matches(reported)
            checks.append(failed("tcb_binding", "certificate TCB differs from REPORTED_TCB: "
                                 + ", ".join(mismatches), _V) if mismatches else
                          passed("tcb_binding", f"REPORTED_TCB {reported}", _V))

    # hwID vs CHIP_ID (VCEK only: a VLEK is not chip-specific).
    if key.kind == "vcek":
        if key.hwid is None:
            checks.append(failed("chip_id", "VCEK has no hwID extension", _V))
        else:
            expect = report.chip_id[:TURIN_HWID_SIZE] if len(key.hwid) == TURIN_HWID_SIZE \
                else report.chip_id
            if report.mask_chip_key:
                checks.append(failed("chip_id", "report has MASK_CHIP_KEY set (CHIP_ID is "
                                     "zeroed) so it cannot be bound to the VCEK", _V))
            elif key.hwid != expect:
                checks.append(failed("chip_id", f"VCEK hwID {key.hwid.hex()[:16]}... differs "
                                     f"from report CHIP_ID {report.chip_id.hex()[:16]}...", _V))
            else:
                checks.append(passed("chip_id", f"hwID {key.hwid.hex()[:16]}...", _V))

    return SnpVerification(tuple(checks), product, key.kind, chain, key, reported)
