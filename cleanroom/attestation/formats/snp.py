"""AMD SEV-SNP as a registered format: abi/snp.py, verify/snp.py and validate/snp.py joined up."""

from __future__ import annotations

from cleanroom.attestation import trust
from cleanroom.attestation.abi import snp as abi
from cleanroom.attestation.abi.amd_cert import load_certificates, pick_key_certificate
from cleanroom.attestation.registry import TeeFormat, Verified, VerifyContext
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.validate.snp import validate_snp
from cleanroom.attestation.verdict import Check, Claims, Layer, failed
from cleanroom.attestation.verify.snp import SnpVerification, verify_snp

NAME = "sev-snp"


def trusted_amd_chains(policy: Policy) -> tuple[trust.AmdChain, ...]:
    """Pinned AMD chains, plus the simulated chain when (and only when) the policy names it."""
    chains = trust.amd_chains()
    if policy.simulated_root is not None:
        chains = chains + trust.load_simulated_chain(policy.simulated_root)
    return chains


def _verify(report: abi.SnpReport, ctx: VerifyContext) -> Verified:
    key_certificate = ctx.endorsements.key_certificate
    if key_certificate is None:
        return Verified((failed("certificate", "no VCEK/VLEK given: SEV-SNP evidence needs the "
                                "certificate of the key that signed it", Layer.VERIFY),), False)
    key_cert = pick_key_certificate(load_certificates(key_certificate))
    chains = ctx.amd_chains if ctx.amd_chains is not None else trusted_amd_chains(ctx.policy)
    result = verify_snp(report, key_cert, at=ctx.at, chains=chains)
    authentic = result.authentic and result.product is not None \
        and result.signing_key is not None
    return Verified(result.checks, authentic, result)


def _validate(report: abi.SnpReport, verified: Verified, policy: Policy) -> list[Check]:
    result: SnpVerification = verified.detail
    assert result.product is not None and result.signing_key is not None  # authentic
    return validate_snp(report, product=result.product, signing_key=result.signing_key,
                        policy=policy)


def _claims(report: abi.SnpReport, verified: Verified) -> Claims:
    result: SnpVerification = verified.detail
    assert result.product is not None  # authentic
    chain = result.chain
    return Claims(
        format=NAME, measurement=report.measurement, report_data=report.report_data,
        debug=report.debug, product=result.product.value, signing_key=result.signing_key,
        version=report.version, tcb=report.tcb("reported", result.product).components(),
        root=chain.name if chain else None, simulated=bool(chain and chain.simulated),
        chip_id=report.chip_id,
        extra={"vmpl": report.vmpl, "policy": f"{report.policy.raw:#x}",
               "guest_svn": report.guest_svn, "host_data": report.host_data.hex()},
    )


FORMAT = TeeFormat(
    name=NAME,
    description=f"an SEV-SNP report ({abi.REPORT_SIZE} bytes, known VERSION)",
    detect=abi.looks_like_report,
    parse=abi.parse_report,
    summary=lambda report: f"SEV-SNP report version {report.version}",
    canonical_bytes=abi.canonical_bytes,
    verify=_verify,
    validate=_validate,
    claims=_claims,
)
