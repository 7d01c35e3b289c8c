"""Validate an authentic TDX quote against a :class:`Policy` (pure function, no I/O)."""

from __future__ import annotations

from typing import Any

from cleanroom.attestation.validate.common import (
    allow_list_check,
    equal_check,
    report_data_check,
)
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.verdict import Check, Layer, failed, passed

_L = Layer.VALIDATE
TD_ATTRIBUTES_DEBUG_BIT = 0


def td_debug(td_attributes: bytes | int) -> bool:
    value = td_attributes if isinstance(td_attributes, int) else \
        int.from_bytes(td_attributes, "little")
    return bool((value >> TD_ATTRIBUTES_DEBUG_BIT) & 1)


def validate_tdx(quote: Any, *, tcb_status: str | None, policy: Policy) -> list[Check]:
    """Every policy check for a TDX quote whose signatures and PCK chain already verified
    (the evidence pipeline has checked ``policy.formats``).

    ``quote`` is a parsed :class:`cleanroom.attestation.abi.tdx.TdxQuote`.
    """
    body = quote.body
    checks: list[Check] = []
    checks.append(allow_list_check("measurement", "MRTD", body.mr_td, policy.measurements))
    for index, allowed in sorted(policy.rtmrs.items()):
        value = getattr(body, f"rtmr{index}")
        checks.append(allow_list_check(f"rtmr{index}", f"RTMR{index}", value, allowed))
    debug = td_debug(body.td_attributes)
    checks.append(failed("debug", "TD_ATTRIBUTES.DEBUG is set: the host can read the TD", _L)
                  if debug and not policy.allow_debug else passed("debug", f"DEBUG={int(debug)}",
                                                                  _L))
    if policy.mr_seam:
        checks.append(allow_list_check("mr_seam", "MRSEAM", body.mr_seam, policy.mr_seam))
    if policy.config_id is not None:
        checks.append(equal_check("config_id", "MRCONFIGID", body.mr_config_id, policy.config_id))
    if policy.mr_owner is not None:
        checks.append(equal_check("mr_owner", "MROWNER", body.mr_owner, policy.mr_owner))
    if policy.min_tee_tcb_svn is not None:
        low = [f"[{i}]={have} < {want}" for i, (have, want)
               in enumerate(zip(body.tee_tcb_svn, policy.min_tee_tcb_svn, strict=True))
               if have < want]
        checks.append(failed("tcb_floor", "TEE_TCB_SVN below floor: " + ", ".join(low), _L)
                      if low else passed("tcb_floor", f"TEE_TCB_SVN {body.tee_tcb_svn.hex()}",
                                         _L))
    if tcb_status is None:
        checks.append(failed("tcb_status", "no TCB collateral given and the policy requires it",
                             _L) if policy.require_collateral else
                      passed("tcb_status", "not checked: no collateral given", _L))
    elif tcb_status in policy.accepted_tcb_statuses:
        checks.append(passed("tcb_status", tcb_status, _L))
    else:
        checks.append(failed("tcb_status", f"TCB status {tcb_status} not in "
                             f"{policy.accepted_tcb_statuses}", _L))
    checks.append(report_data_check(body.report_data, policy.report_data))
    return checks
