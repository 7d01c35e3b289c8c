"""The TEE format registry: a toy format registered and run through ``verify_evidence``.

The toy format is what docs/attestation.md's "Adding a TEE type" describes, in one file: an abi
layer (fixed layout, ``ParseError`` naming the field), a verify layer (an Ed25519 signature by
a "vendor" key the test pins), a validate layer (measurement allow-list, debug, REPORT_DATA), and
one :func:`register_format`. It must be verified, refused and reported exactly like the built-in
formats, and it must not be able to take bytes away from them.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.attestation import registry
from cleanroom.attestation.evidence import verify_evidence
from cleanroom.attestation.registry import TeeFormat, Verified, VerifyContext
from cleanroom.attestation.validate.common import allow_list_check, report_data_check
from cleanroom.attestation.validate.policy import Policy, load_policy
from cleanroom.attestation.verdict import Check, Claims, Layer, failed, passed
from cleanroom.errors import ConfigError, ParseError, UnsupportedFormatError

AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

# ---------------------------------------------------------------- abi: the toy report layout
MAGIC = b"TOY1"
OFF_FLAGS, OFF_MEASUREMENT, OFF_REPORT_DATA, OFF_SIGNATURE = 4, 8, 40, 104
MEASUREMENT_SIZE, REPORT_DATA_SIZE, SIGNATURE_SIZE = 32, 64, 64
SIGNED_LENGTH = OFF_SIGNATURE
REPORT_SIZE = OFF_SIGNATURE + SIGNATURE_SIZE
FLAG_DEBUG = 1


@dataclass(frozen=True)
class ToyReport:
    raw: bytes
    debug: bool
    measurement: bytes
    report_data: bytes
    signature: bytes


def looks_like_toy(data: bytes) -> bool:
    return len(data) == REPORT_SIZE and data[:4] == MAGIC


def parse_toy(data: bytes) -> ToyReport:
    if len(data) != REPORT_SIZE:
        raise ParseError("toy", f"length is {len(data)}, expect {REPORT_SIZE}")
    (flags,) = struct.unpack_from("<I", data, OFF_FLAGS)
    if flags & ~FLAG_DEBUG:
        raise ParseError("FLAGS", f"is {flags:#x}, only bit 0 (debug) is defined")
    return ToyReport(raw=data, debug=bool(flags & FLAG_DEBUG),
                     measurement=data[OFF_MEASUREMENT:OFF_MEASUREMENT + MEASUREMENT_SIZE],
                     report_data=data[OFF_REPORT_DATA:OFF_REPORT_DATA + REPORT_DATA_SIZE],
                     signature=data[OFF_SIGNATURE:])


# ---------------------------------------------------------------- verify: a pinned vendor key
VENDOR_KEY = ed25519.Ed25519PrivateKey.generate()
PINNED_VENDOR = VENDOR_KEY.public_key()


def verify_toy(report: ToyReport, ctx: VerifyContext) -> Verified:
    try:
        PINNED_VENDOR.verify(report.signature, report.raw[:SIGNED_LENGTH])
    except InvalidSignature:
        return Verified((failed("signature", "does not verify with the pinned toy vendor key",
                                Layer.VERIFY),), False)
    return Verified((passed("signature", "toy vendor key", Layer.VERIFY),), True)


# ---------------------------------------------------------------- validate: the policy
def validate_toy(report: ToyReport, verified: Verified, policy: Policy) -> list[Check]:
    return [
        allow_list_check("measurement", "MEASUREMENT", report.measurement.ljust(48, b"\0"),
                         policy.measurements),
        failed("debug", "toy debug flag is set", Layer.VALIDATE)
        if report.debug and not policy.allow_debug else passed("debug", "ok", Layer.VALIDATE),
        report_data_check(report.report_data, policy.report_data),
    ]


# ---------------------------------------------------------------- the one registration
TOY = TeeFormat(
    name="toy", description="a toy report (168 bytes, magic TOY1)",
    detect=looks_like_toy, parse=parse_toy,
    summary=lambda report: "toy report",
    canonical_bytes=lambda report: report.raw[:SIGNED_LENGTH] + report.signature,
    verify=verify_toy, validate=validate_toy,
    claims=lambda report, verified: Claims(format="toy", measurement=report.measurement,
                                           report_data=report.report_data, debug=report.debug),
)


@pytest.fixture
def toy() -> Iterator[TeeFormat]:
    registry.register_format(TOY)
    yield TOY
    registry.unregister_format(TOY.name)


def make_toy(*, measurement: bytes = b"\x11" * 32, report_data: bytes = b"\x22" * 64,
             debug: bool = False, key: ed25519.Ed25519PrivateKey = VENDOR_KEY) -> bytes:
    body = MAGIC + struct.pack("<I", FLAG_DEBUG if debug else 0) + measurement + report_data
    return body + key.sign(body)


MEASUREMENT48 = (b"\x11" * 32).ljust(48, b"\0")


def names(checks: tuple[Check, ...], passed_: bool) -> list[str]:
    return [c.name for c in checks if c.passed is passed_]


def test_builtin_formats_are_registered_in_detection_order() -> None:
    assert registry.format_names()[:2] == ("sev-snp", "tdx")
    assert registry.get_format("tdx").description.startswith("a TDX quote")


def test_toy_format_runs_through_verify_evidence(toy: TeeFormat) -> None:
    policy = Policy(formats=["toy"], measurements=[MEASUREMENT48], report_data=b"\x22" * 64)
    verdict = verify_evidence(make_toy(), policy=policy, at=AT)
    assert verdict.accepted, verdict.reasons
    assert verdict.format == "toy" and verdict.claims is not None
    assert [c.name for c in verdict.checks] == ["parse", "signature", "format", "measurement",
                                                "debug", "report_data"]
    assert verdict.evidence_sha256 == registry.canonical_evidence_digest(make_toy())


def test_toy_format_refusals(toy: TeeFormat) -> None:
    policy = Policy(formats=["toy"], measurements=[MEASUREMENT48])
    forged = make_toy(key=ed25519.Ed25519PrivateKey.generate())
    verdict = verify_evidence(forged, policy=policy, at=AT)
    assert not verdict.accepted and not verdict.authentic and verdict.claims is None
    assert names(verdict.checks, False) == ["signature"]  # no policy check on forged evidence

    verdict = verify_evidence(make_toy(debug=True), policy=policy, at=AT)
    assert verdict.authentic and names(verdict.checks, False) == ["debug"]

    verdict = verify_evidence(make_toy(measurement=b"\x33" * 32), policy=policy, at=AT)
    assert names(verdict.checks, False) == ["measurement"]

    # The pipeline, not the format, enforces policy.formats: the default policy lists only
    # the built-ins, so the toy is refused by it although every toy check passes.
    verdict = verify_evidence(make_toy(), policy=Policy(measurements=[MEASUREMENT48]), at=AT)
    assert names(verdict.checks, False) == ["format"]
    assert "toy" not in verdict.checks[2].reason

    bad = bytearray(make_toy())
    bad[OFF_FLAGS] = 0x80
    verdict = verify_evidence(bytes(bad), policy=policy, at=AT)
    assert verdict.format == "toy" and names(verdict.checks, False) == ["parse"]
    assert "FLAGS" in verdict.checks[0].reason


def test_policy_formats_must_be_registered(toy: TeeFormat, tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('formats = ["toy", "tdx"]\n')
    assert load_policy(path).formats == ["toy", "tdx"]
    registry.unregister_format("toy")
    with pytest.raises(ConfigError, match=r"formats\.0.*'toy' is not a registered"):
        load_policy(path)
    registry.register_format(TOY)


def test_unknown_bytes_name_every_registered_format(toy: TeeFormat) -> None:
    verdict = verify_evidence(b"\x00" * 100, policy=Policy(), at=AT)
    reason = verdict.checks[0].reason
    assert verdict.checks[0].name == "format"
    assert "SEV-SNP report" in reason and "TDX quote" in reason and "toy report" in reason


def test_registration_is_checked(toy: TeeFormat) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register_format(TOY)
    with pytest.raises(ValueError, match="built-in"):
        registry.unregister_format("tdx")
    with pytest.raises(TypeError):
        registry.register_format("toy")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedFormatError, match="not a registered"):
        registry.get_format("nope")


def test_a_greedy_format_cannot_take_bytes_from_another(tmp_path: Path) -> None:
    """Bytes two formats both claim are refused, never handed to the first one."""
    from tests.attestation.test_tdx import DCAP_QVL, load_hex

    greedy = TeeFormat(
        name="greedy", description="anything", detect=lambda data: True, parse=parse_toy,
        summary=str, canonical_bytes=bytes, verify=verify_toy, validate=validate_toy,
        claims=TOY.claims)
    registry.register_format(greedy)
    try:
        quote = load_hex(DCAP_QVL / "quote-from-tappd.hex")
        verdict = verify_evidence(quote, policy=Policy(), at=AT)
        assert not verdict.accepted and verdict.checks[0].name == "format"
        assert "more than one format (tdx, greedy)" in verdict.checks[0].reason
    finally:
        registry.unregister_format("greedy")


def test_a_detector_that_raises_claims_nothing() -> None:
    def broken(data: bytes) -> bool:
        raise RuntimeError("bug")

    fmt = TeeFormat(name="broken", description="a broken format", detect=broken,
                    parse=parse_toy, summary=str, canonical_bytes=bytes, verify=verify_toy,
                    validate=validate_toy, claims=TOY.claims)
    registry.register_format(fmt)
    try:
        with pytest.raises(UnsupportedFormatError, match="neither"):
            registry.format_for(b"\x01" * 10)
    finally:
        registry.unregister_format("broken")
