"""TEE evidence formats behind one small registry: detect, parse, verify, validate, digest.

A :class:`TeeFormat` names the function of each layer for one kind of evidence (an AMD SEV-SNP
report, an Intel TDX quote, ...). :func:`cleanroom.attestation.evidence.verify_evidence` runs
any registered format through the same pipeline::

    detect -> parse (abi/) -> verify (verify/, trust/) -> policy.formats -> validate (validate/)

so adding a TEE type is one module per layer plus one :func:`register_format` call (the built-in
registrations are :mod:`cleanroom.attestation.formats.snp` and
:mod:`cleanroom.attestation.formats.tdx`; docs/attestation.md walks through adding one).

Detection is by the bytes alone, and must be unambiguous: bytes that two formats both claim are
refused rather than given to the first. :func:`canonical_evidence_digest` identifies a piece of
evidence independently of unsigned padding and signature encoding (see its docstring).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cleanroom.errors import UnsupportedFormatError

if TYPE_CHECKING:
    from cleanroom.attestation.abi.tdx_collateral import TdxCollateral
    from cleanroom.attestation.trust import AmdChain
    from cleanroom.attestation.validate.policy import Policy
    from cleanroom.attestation.verdict import Check, Claims

DIGEST_DOMAIN = b"cleanroom-fl/evidence-digest/v1\x00"


@dataclass(frozen=True)
class Endorsements:
    """What the verifier needs besides the evidence: the VCEK/VLEK (SNP), collateral (TDX).

    TDX collateral is given either parsed (``collateral``: a long-running verifier loads its
    folder once, see :class:`cleanroom.attestation.collateral_folder.CollateralFolder`) or as a
    folder read for this one verification (``collateral_dir``), not both.
    """

    key_certificate: bytes | None = None  # DER or PEM (bundle allowed) of VCEK/VLEK
    collateral_dir: Path | None = None
    collateral: TdxCollateral | None = None

    def __post_init__(self) -> None:
        if self.collateral is not None and self.collateral_dir is not None:
            raise ValueError("give TDX collateral either parsed or as a folder, not both")


@dataclass(frozen=True)
class VerifyContext:
    """Everything a format's verify step may use besides the parsed evidence."""

    policy: Policy
    endorsements: Endorsements
    at: dt.datetime  # verification time (certificate validity, collateral dates)
    amd_chains: tuple[AmdChain, ...] | None = None  # SEV-SNP: trusted chains; None = pinned


@dataclass(frozen=True)
class Verified:
    """What a format's verify step established.

    ``authentic`` is True only when the signatures and chain to a pinned root hold (then the
    policy runs); ``detail`` is the format's own verification result, handed to its validate and
    claims steps (e.g. the SNP product, the TDX TCB status).
    """

    checks: tuple[Check, ...]
    authentic: bool
    detail: Any = None


@dataclass(frozen=True)
class TeeFormat:
    """One kind of TEE evidence: the function of each layer (all pure but ``verify``'s loading
    of endorsements; every failure a :class:`cleanroom.errors.CleanroomError` or a failed check).

    * ``name``: the format's name in policies (``formats``), verdicts and claims;
    * ``description``: what the bytes look like, for "not a known format" messages;
    * ``detect(data) -> bool``: a cheap sniff of the bytes alone; never raises;
    * ``parse(data) -> evidence``: the abi layer (bytes -> typed structure, ``ParseError``);
    * ``summary(evidence) -> str``: the reason of the passed ``parse`` check;
    * ``canonical_bytes(evidence) -> bytes``: the evidence's canonical encoding: what it
      says and the signature values, without unsigned padding or encoding freedom;
    * ``verify(evidence, context) -> Verified``: signatures, chain to pinned roots, collateral;
    * ``validate(evidence, verified, policy) -> [Check]``: the policy checks of this format
      (the pipeline has already checked ``policy.formats``);
    * ``claims(evidence, verified) -> Claims``: what the evidence says, normalised.
    """

    name: str
    description: str
    detect: Callable[[bytes], bool]
    parse: Callable[[bytes], Any]
    summary: Callable[[Any], str]
    canonical_bytes: Callable[[Any], bytes]
    verify: Callable[[Any, VerifyContext], Verified]
    validate: Callable[[Any, Verified, Policy], list[Check]]
    claims: Callable[[Any, Verified], Claims]


_formats: dict[str, TeeFormat] = {}
_lock = threading.Lock()
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        from cleanroom.attestation.formats import snp, tdx

        for fmt in (snp.FORMAT, tdx.FORMAT):
            _formats.setdefault(fmt.name, fmt)
        _builtins_loaded = True


def register_format(fmt: TeeFormat) -> TeeFormat:
    """Add ``fmt`` to the registry (after the built-in formats); a taken name is refused."""
    if not isinstance(fmt, TeeFormat):
        raise TypeError(f"expected a TeeFormat, got {type(fmt).__name__}")
    if not fmt.name or fmt.name != fmt.name.strip():
        raise ValueError(f"format name {fmt.name!r} must be non-empty without spaces around")
    _load_builtins()
    with _lock:
        if fmt.name in _formats:
            raise ValueError(f"a format named {fmt.name!r} is already registered")
        _formats[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a format added with :func:`register_format` (built-in formats stay)."""
    _load_builtins()
    if name in ("sev-snp", "tdx"):
        raise ValueError(f"the built-in format {name!r} cannot be removed")
    with _lock:
        _formats.pop(name, None)


def formats() -> tuple[TeeFormat, ...]:
    """Every registered format, in registration order (built-ins first)."""
    _load_builtins()
    with _lock:
        return tuple(_formats.values())


def format_names() -> tuple[str, ...]:
    return tuple(fmt.name for fmt in formats())


def get_format(name: str) -> TeeFormat:
    _load_builtins()
    with _lock:
        fmt = _formats.get(name)
    if fmt is None:
        raise UnsupportedFormatError("format", f"{name!r} is not a registered evidence format "
                                               f"({', '.join(format_names())})")
    return fmt


def format_for(evidence: bytes) -> TeeFormat:
    """The one registered format whose ``detect`` claims ``evidence``.

    Raises :class:`UnsupportedFormatError` when none does, or when more than one does (bytes
    two formats both claim are ambiguous and refused, never given to the first).
    """
    known = formats()
    claimed = [fmt for fmt in known if _detects(fmt, evidence)]
    if len(claimed) == 1:
        return claimed[0]
    size = len(evidence) if isinstance(evidence, (bytes, bytearray, memoryview)) else "these"
    if not claimed:
        raise UnsupportedFormatError(
            "evidence", f"{size} bytes are neither "
            + " nor ".join(fmt.description for fmt in known))
    raise UnsupportedFormatError(
        "evidence", f"{size} bytes are claimed by more than one format "
        f"({', '.join(fmt.name for fmt in claimed)}): refused as ambiguous")


def _detects(fmt: TeeFormat, evidence: bytes) -> bool:
    try:
        return bool(fmt.detect(evidence))
    except Exception:  # noqa: BLE001 - a detector must never raise; one that does claims nothing
        return False


def digest_of(fmt: TeeFormat, parsed: Any) -> str:
    """SHA-256 (hex) of the domain tag, the format name and its canonical bytes of ``parsed``."""
    return hashlib.sha256(DIGEST_DOMAIN + fmt.name.encode() + b"\x00"
                          + fmt.canonical_bytes(parsed)).hexdigest()


def evidence_digest(evidence: bytes) -> str:
    """The digest to record for any evidence: canonical if it parses (both sides record the
    same value for one piece of evidence), else the SHA-256 of the bytes as they came."""
    from cleanroom.errors import CleanroomError

    try:
        return canonical_evidence_digest(evidence)
    except CleanroomError:
        return hashlib.sha256(evidence).hexdigest()


def canonical_evidence_digest(evidence: bytes) -> str:
    """One digest per piece of evidence, whatever unsigned bytes surround it.

    SHA-256 over ``"cleanroom-fl/evidence-digest/v1" NUL <format name> NUL`` and the format's
    canonical bytes: for SEV-SNP the 0x2A0 signed bytes and the signature's R and S (low-S
    form); for TDX the signed header and body, the quote and QE report signatures (low-S), the
    attestation key, the QE report, the QE auth data and the PCK certificates as DER. So padding
    after a quote, the reserved tail of an SNP signature field, PEM line breaks or NUL padding of
    the PCK chain, and the (r, n - s) twin of a signature do not change it; any signed byte
    does. Raises :class:`cleanroom.errors.ParseError` when ``evidence`` does not parse.
    """
    fmt = format_for(evidence)
    return digest_of(fmt, fmt.parse(evidence))
