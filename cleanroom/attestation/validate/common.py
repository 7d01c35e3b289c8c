"""Policy checks shared by the SEV-SNP and TDX validators."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from cleanroom.attestation.verdict import Check, Layer, failed, passed

_L = Layer.VALIDATE


def short(value: bytes, n: int = 16) -> str:
    text = value.hex()
    return text if len(text) <= n else text[:n] + "..."


def allow_list_check(name: str, field: str, value: bytes, allowed: Sequence[bytes]) -> Check:
    """``value`` must be one of ``allowed``; an empty allow-list means 'not checked'."""
    if not allowed:
        return passed(name, f"not checked: policy has no allow-list ({field} {short(value)})", _L)
    if any(hmac.compare_digest(value, a) for a in allowed):
        return passed(name, f"{field} {short(value)} is on the allow-list", _L)
    return failed(name, f"{field} {value.hex()} is not on the allow-list "
                  f"({len(allowed)} value(s))", _L)


def equal_check(name: str, field: str, value: bytes, expected: bytes) -> Check:
    if hmac.compare_digest(value, expected):
        return passed(name, f"{field} matches", _L)
    return failed(name, f"{field} is {value.hex()}, expect {expected.hex()}", _L)


def report_data_check(value: bytes, expected: bytes | None) -> Check:
    """REPORT_DATA must equal the binding the verifier computed itself (constant time)."""
    if expected is None:
        return passed("report_data", "not checked: no expected binding given", _L)
    if hmac.compare_digest(value, expected):
        return passed("report_data", "REPORT_DATA equals the expected binding", _L)
    return failed("report_data", f"REPORT_DATA {short(value, 32)} does not match the expected "
                  f"binding {short(expected, 32)} (stale nonce, replay or other key)", _L)
