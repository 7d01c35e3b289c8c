"""Intel TDX as a registered format: abi/tdx.py, verify/tdx.py (+ collateral) and
validate/tdx.py joined up.

Without collateral the Quoting Enclave is checked against Intel's pinned TD_QE identity; with
collateral (parsed, or a folder read now) against the collateral's signed one.
"""

from __future__ import annotations

from cleanroom.attestation import trust
from cleanroom.attestation.abi import tdx as abi
from cleanroom.attestation.abi.tdx_collateral import TdxCollateral
from cleanroom.attestation.registry import TeeFormat, Verified, VerifyContext
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.validate.tdx import td_debug, validate_tdx
from cleanroom.attestation.verdict import Check, Claims
from cleanroom.attestation.verify.tdx import TdxVerification, verify_tdx

NAME = "tdx"
ROOT_NAME = "intel-sgx-root-ca"


def _collateral(ctx: VerifyContext) -> TdxCollateral | None:
    endorsements = ctx.endorsements
    if endorsements.collateral is not None:
        return endorsements.collateral
    if endorsements.collateral_dir is not None:
        from cleanroom.attestation.collateral_folder import load_collateral

        return load_collateral(endorsements.collateral_dir)
    return None


def _verify(quote: abi.TdxQuote, ctx: VerifyContext) -> Verified:
    result = verify_tdx(quote, at=ctx.at, root=trust.intel_sgx_root(),
                        collateral=_collateral(ctx), qe_identity=trust.intel_td_qe_identity())
    return Verified(result.checks, result.authentic, result)


def _validate(quote: abi.TdxQuote, verified: Verified, policy: Policy) -> list[Check]:
    result: TdxVerification = verified.detail
    return validate_tdx(quote, tcb_status=result.tcb_status, policy=policy)


def _claims(quote: abi.TdxQuote, verified: Verified) -> Claims:
    result: TdxVerification = verified.detail
    body = quote.body
    return Claims(
        format=NAME, measurement=body.mr_td, report_data=body.report_data,
        debug=td_debug(body.td_attributes), version=quote.header.version,
        tcb={f"tee_tcb_svn[{i}]": v for i, v in enumerate(body.tee_tcb_svn) if v},
        tcb_status=result.tcb_status, root=ROOT_NAME,
        extra={"rtmr": [rtmr.hex() for rtmr in body.rtmrs],
               "mr_seam": body.mr_seam.hex(), "mr_config_id": body.mr_config_id.hex()},
    )


FORMAT = TeeFormat(
    name=NAME,
    description="a TDX quote (version 4/5, TEE type 0x81)",
    detect=abi.looks_like_quote,
    parse=abi.parse_quote,
    summary=lambda quote: f"TDX quote version {quote.header.version}",
    canonical_bytes=abi.canonical_bytes,
    verify=_verify,
    validate=_validate,
    claims=_claims,
)
