"""One entry point: evidence bytes + endorsements + policy -> :class:`Verdict`.

Order of work (cheap before expensive, authenticity before policy):
size limit -> format detection -> parse -> signatures and chain to a pinned root ->
(TDX) collateral -> policy. Nothing raised by broken input escapes: every failure becomes a
failed :class:`Check` in the verdict, and an unexpected internal error fails closed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanroom.attestation import trust
from cleanroom.attestation.abi import snp as snp_abi
from cleanroom.attestation.abi.amd_cert import load_certificates, pick_key_certificate
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.verdict import Check, Claims, Layer, Verdict, failed, passed
from cleanroom.errors import CleanroomError, ParseError, UnsupportedFormatError

log = logging.getLogger(__name__)

FORMAT_SNP = "sev-snp"
FORMAT_TDX = "tdx"


def detect_format(data: bytes) -> str:
    """'sev-snp' or 'tdx' from the bytes alone; UnsupportedFormatError otherwise."""
    if snp_abi.looks_like_report(data):
        return FORMAT_SNP
    from cleanroom.attestation.abi import tdx as tdx_abi

    if tdx_abi.looks_like_quote(data):
        return FORMAT_TDX
    raise UnsupportedFormatError(
        "evidence", f"{len(data)} bytes are neither an SEV-SNP report ({snp_abi.REPORT_SIZE} "
        "bytes, known VERSION) nor a TDX quote (version 4/5, TEE type 0x81)")


@dataclass(frozen=True)
class Endorsements:
    """What the verifier needs besides the evidence: the VCEK/VLEK (SNP), collateral (TDX)."""

    key_certificate: bytes | None = None  # DER or PEM (bundle allowed) of VCEK/VLEK
    collateral_dir: Path | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _reject(checks: list[Check], fmt: str | None, digest: str | None) -> Verdict:
    return Verdict(checks=tuple(checks), claims=None, format=fmt, evidence_sha256=digest)


def verify_evidence(data: bytes, *, policy: Policy, endorsements: Endorsements | None = None,
                    at: dt.datetime | None = None,
                    amd_chains: Sequence[trust.AmdChain] | None = None) -> Verdict:
    """Verify ``data`` (SNP report or TDX quote) and validate it against ``policy``."""
    endorsements = endorsements or Endorsements()
    at = at or _now()
    checks: list[Check] = []
    if not isinstance(data, (bytes, bytearray)):
        return _reject([failed("evidence", "evidence must be bytes", Layer.PARSE)], None, None)
    data = bytes(data)
    if len(data) > policy.max_evidence_bytes:
        return _reject([failed("size", f"evidence is {len(data)} bytes, policy limit "
                               f"{policy.max_evidence_bytes}", Layer.PARSE)], None, None)
    digest = hashlib.sha256(data).hexdigest()
    try:
        fmt = detect_format(data)
    except ParseError as exc:
        return _reject([failed("format", str(exc), Layer.PARSE)], None, digest)
    try:
        if fmt == FORMAT_SNP:
            return _verify_snp(data, digest, policy, endorsements, at, amd_chains, checks)
        return _verify_tdx(data, digest, policy, endorsements, at, checks)
    except CleanroomError as exc:
        checks.append(failed(type(exc).__name__, str(exc), Layer.PARSE))
        return _reject(checks, fmt, digest)
    except Exception as exc:
        log.exception("internal error verifying evidence sha256=%s", digest)
        checks.append(failed("internal", f"verifier error {type(exc).__name__}: {exc}",
                             Layer.VERIFY))
        return _reject(checks, fmt, digest)


def trusted_amd_chains(policy: Policy) -> tuple[trust.AmdChain, ...]:
    """Pinned AMD chains, plus the simulated chain when (and only when) the policy names it."""
    chains = trust.amd_chains()
    if policy.simulated_root is not None:
        chains = chains + trust.load_simulated_chain(policy.simulated_root)
    return chains


def _verify_snp(data: bytes, digest: str, policy: Policy, endorsements: Endorsements,
                at: dt.datetime, amd_chains: Sequence[trust.AmdChain] | None,
                checks: list[Check]) -> Verdict:
    from cleanroom.attestation.validate.snp import validate_snp
    from cleanroom.attestation.verify.snp import verify_snp

    try:
        report = snp_abi.parse_report(data)
    except ParseError as exc:
        return _reject([failed("parse", str(exc), Layer.PARSE)], FORMAT_SNP, digest)
    checks.append(passed("parse", f"SEV-SNP report version {report.version}", Layer.PARSE))
    if endorsements.key_certificate is None:
        checks.append(failed("certificate", "no VCEK/VLEK given: SEV-SNP evidence needs the "
                             "certificate of the key that signed it", Layer.VERIFY))
        return _reject(checks, FORMAT_SNP, digest)
    key_cert = pick_key_certificate(load_certificates(endorsements.key_certificate))
    chains = tuple(amd_chains) if amd_chains is not None else trusted_amd_chains(policy)
    verification = verify_snp(report, key_cert, at=at, chains=chains)
    checks.extend(verification.checks)
    product = verification.product
    if not verification.authentic or product is None or verification.signing_key is None:
        return _reject(checks, FORMAT_SNP, digest)
    checks.extend(validate_snp(report, product=product, signing_key=verification.signing_key,
                               policy=policy))
    tcb = report.tcb("reported", product)
    claims = Claims(
        format=FORMAT_SNP, measurement=report.measurement, report_data=report.report_data,
        debug=report.debug, product=product.value, signing_key=verification.signing_key,
        version=report.version, tcb=tcb.components(),
        root=verification.chain.name if verification.chain else None,
        simulated=bool(verification.chain and verification.chain.simulated),
        chip_id=report.chip_id,
        extra={"vmpl": report.vmpl, "policy": f"{report.policy.raw:#x}",
               "guest_svn": report.guest_svn, "host_data": report.host_data.hex()},
    )
    return Verdict(checks=tuple(checks), claims=claims, format=FORMAT_SNP, evidence_sha256=digest)


def _verify_tdx(data: bytes, digest: str, policy: Policy, endorsements: Endorsements,
                at: dt.datetime, checks: list[Check]) -> Verdict:
    from cleanroom.attestation.abi import tdx as tdx_abi
    from cleanroom.attestation.validate.tdx import td_debug, validate_tdx
    from cleanroom.attestation.verify import tdx as tdx_verify

    try:
        quote = tdx_abi.parse_quote(data)
    except ParseError as exc:
        return _reject([failed("parse", str(exc), Layer.PARSE)], FORMAT_TDX, digest)
    checks.append(passed("parse", f"TDX quote version {quote.header.version}", Layer.PARSE))
    collateral: Any = None
    if endorsements.collateral_dir is not None:
        from cleanroom.attestation.collateral_folder import load_collateral

        collateral = load_collateral(endorsements.collateral_dir)
    verification = tdx_verify.verify_tdx(quote, at=at, root=trust.intel_sgx_root(),
                                         collateral=collateral)
    checks.extend(verification.checks)
    if not verification.authentic:
        return _reject(checks, FORMAT_TDX, digest)
    checks.extend(validate_tdx(quote, tcb_status=verification.tcb_status, policy=policy))
    body = quote.body
    claims = Claims(
        format=FORMAT_TDX, measurement=body.mr_td, report_data=body.report_data,
        debug=td_debug(body.td_attributes), version=quote.header.version,
        tcb={f"tee_tcb_svn[{i}]": v for i, v in enumerate(body.tee_tcb_svn) if v},
        tcb_status=verification.tcb_status, root="intel-sgx-root-ca",
        extra={"rtmr": [getattr(body, f"rtmr{i}").hex() for i in range(4)],
               "mr_seam": body.mr_seam.hex(), "mr_config_id": body.mr_config_id.hex()},
    )
    return Verdict(checks=tuple(checks), claims=claims, format=FORMAT_TDX, evidence_sha256=digest)
