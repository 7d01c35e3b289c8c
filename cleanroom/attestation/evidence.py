"""One entry point: evidence bytes + endorsements + policy -> :class:`Verdict`.

Order of work (cheap before expensive, authenticity before policy), the same for every
registered format (:mod:`cleanroom.attestation.registry`):
size limit -> format detection -> parse -> signatures and chain to a pinned root (and for TDX
collateral or the pinned QE identity) -> the policy's ``formats`` -> the format's policy checks.
Nothing raised by broken input escapes: every failure becomes a failed :class:`Check` in the
verdict, and an unexpected internal error fails closed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence

from cleanroom.attestation import trust
from cleanroom.attestation.formats.snp import trusted_amd_chains
from cleanroom.attestation.registry import (
    Endorsements,
    TeeFormat,
    VerifyContext,
    canonical_evidence_digest,
    digest_of,
    format_for,
)
from cleanroom.attestation.validate.policy import Policy
from cleanroom.attestation.verdict import Check, Layer, Verdict, failed, passed
from cleanroom.errors import CleanroomError, ParseError

__all__ = ["FORMAT_SNP", "FORMAT_TDX", "Endorsements", "canonical_evidence_digest",
           "detect_format", "trusted_amd_chains", "verify_evidence"]

log = logging.getLogger(__name__)

FORMAT_SNP = "sev-snp"
FORMAT_TDX = "tdx"


def detect_format(data: bytes) -> str:
    """The registered format's name ('sev-snp', 'tdx', ...) from the bytes alone;
    UnsupportedFormatError otherwise."""
    return format_for(data).name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _reject(checks: list[Check], fmt: str | None, digest: str | None) -> Verdict:
    return Verdict(checks=tuple(checks), claims=None, format=fmt, evidence_sha256=digest)


def verify_evidence(data: bytes, *, policy: Policy, endorsements: Endorsements | None = None,
                    at: dt.datetime | None = None,
                    amd_chains: Sequence[trust.AmdChain] | None = None) -> Verdict:
    """Verify ``data`` (any registered format) and validate it against ``policy``.

    ``Verdict.evidence_sha256`` is :func:`canonical_evidence_digest` of the evidence when it
    parses (the same for padded or re-encoded copies), else the SHA-256 of the bytes as given.
    """
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
        fmt = format_for(data)
    except ParseError as exc:
        return _reject([failed("format", str(exc), Layer.PARSE)], None, digest)
    context = VerifyContext(policy=policy, endorsements=endorsements, at=at,
                            amd_chains=tuple(amd_chains) if amd_chains is not None else None)
    try:
        try:
            evidence = fmt.parse(data)
        except ParseError as exc:
            return _reject([failed("parse", str(exc), Layer.PARSE)], fmt.name, digest)
        digest = digest_of(fmt, evidence)
        checks.append(passed("parse", fmt.summary(evidence), Layer.PARSE))
        return _verify_and_validate(fmt, evidence, digest, context, checks)
    except CleanroomError as exc:
        checks.append(failed(type(exc).__name__, str(exc), Layer.PARSE))
        return _reject(checks, fmt.name, digest)
    except Exception as exc:
        log.exception("internal error verifying evidence sha256=%s", digest)
        checks.append(failed("internal", f"verifier error {type(exc).__name__}: {exc}",
                             Layer.VERIFY))
        return _reject(checks, fmt.name, digest)


def _verify_and_validate(fmt: TeeFormat, evidence: object, digest: str,
                         context: VerifyContext, checks: list[Check]) -> Verdict:
    verified = fmt.verify(evidence, context)
    checks.extend(verified.checks)
    if not verified.authentic:
        return _reject(checks, fmt.name, digest)
    policy = context.policy
    checks.append(passed("format", f"{fmt.name} allowed", Layer.VALIDATE)
                  if fmt.name in policy.formats else
                  failed("format", f"policy accepts only {policy.formats}", Layer.VALIDATE))
    checks.extend(fmt.validate(evidence, verified, policy))
    return Verdict(checks=tuple(checks), claims=fmt.claims(evidence, verified), format=fmt.name,
                   evidence_sha256=digest)
