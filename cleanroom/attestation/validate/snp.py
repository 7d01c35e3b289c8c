"""Validate an authentic SEV-SNP report against a :class:`Policy` (pure function, no I/O)."""

from __future__ import annotations

from cleanroom.attestation.abi.snp import Product, SnpReport, TcbVersion
from cleanroom.attestation.validate.common import (
    allow_list_check,
    equal_check,
    report_data_check,
)
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.verdict import Check, Layer, failed, passed

_L = Layer.VALIDATE


def tcb_floor_check(tcb: TcbVersion, product: Product, policy: Policy) -> Check:
    floor = policy.min_tcb.get(product.value)  # type: ignore[call-overload]
    if floor is None:
        return passed("tcb_floor", f"not checked: no floor for {product.value} "
                      f"(REPORTED_TCB {tcb})", _L)
    wanted = {"bootloader": floor.bootloader, "tee": floor.tee, "snp": floor.snp,
              "microcode": floor.microcode}
    if floor.fmc is not None:
        wanted["fmc"] = floor.fmc
    have = tcb.components()
    low = [f"{k}={have.get(k, 0)} < {v}" for k, v in wanted.items() if have.get(k, 0) < v]
    if low:
        return failed("tcb_floor", "REPORTED_TCB below policy floor: " + ", ".join(low), _L)
    return passed("tcb_floor", f"REPORTED_TCB {tcb} meets floor", _L)


def validate_snp(report: SnpReport, *, product: Product, signing_key: str,
                 policy: Policy) -> list[Check]:
    """Every policy check for an SNP report whose signature and chain already verified
    (the evidence pipeline has checked ``policy.formats``)."""
    checks: list[Check] = []
    if report.version < policy.min_report_version:
        checks.append(failed("report_version", f"VERSION is {report.version}, policy needs "
                             f">= {policy.min_report_version}", _L))
    checks.append(allow_list_check("measurement", "MEASUREMENT", report.measurement,
                                   policy.measurements))
    checks.append(failed("debug", "POLICY.DEBUG is set: debug enclaves can be inspected by "
                         "the host", _L) if report.policy.debug and not policy.allow_debug
                  else passed("debug", f"POLICY.DEBUG={int(report.policy.debug)}", _L))
    checks.append(failed("migration_agent", "POLICY.MIGRATE_MA is set: a migration agent "
                         "may export the guest", _L)
                  if report.policy.migrate_ma and not policy.allow_migration_agent
                  else passed("migration_agent", f"MIGRATE_MA={int(report.policy.migrate_ma)}",
                              _L))
    if policy.vmpl is not None:
        checks.append(passed("vmpl", f"VMPL {report.vmpl}", _L) if report.vmpl == policy.vmpl
                      else failed("vmpl", f"VMPL is {report.vmpl}, expect {policy.vmpl}", _L))
    if policy.products is not None:
        checks.append(passed("product_allowed", product.value, _L)
                      if product.value in policy.products else
                      failed("product_allowed", f"product {product.value} not in "
                             f"{policy.products}", _L))
    checks.append(passed("signing_key_allowed", signing_key, _L)
                  if signing_key in policy.signing_keys else
                  failed("signing_key_allowed", f"{signing_key.upper()} not in "
                         f"{policy.signing_keys}", _L))
    checks.append(tcb_floor_check(report.tcb("reported", product), product, policy))
    if report.guest_svn < policy.min_guest_svn:
        checks.append(failed("guest_svn", f"GUEST_SVN is {report.guest_svn}, expect >= "
                             f"{policy.min_guest_svn}", _L))
    for name, field, value, expected in (
        ("family_id", "FAMILY_ID", report.family_id, policy.family_id),
        ("image_id", "IMAGE_ID", report.image_id, policy.image_id),
        ("host_data", "HOST_DATA", report.host_data, policy.host_data),
    ):
        if expected is not None:
            checks.append(equal_check(name, field, value, expected))
    checks.append(report_data_check(report.report_data, policy.report_data))
    return checks

