"""The one verdict type of the attestation core.

Each layer (parse, verify, validate) contributes :class:`Check` results; a :class:`Verdict`
collects them all, so a security team sees every reason at once, not only the first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Layer(enum.Enum):
    PARSE = "parse"
    VERIFY = "verify"
    VALIDATE = "validate"


@dataclass(frozen=True)
class Check:
    """One named check: ``passed`` plus a human reason (what was found, what was expected)."""

    name: str
    passed: bool
    reason: str
    layer: Layer

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "passed": self.passed, "reason": self.reason,
                "layer": self.layer.value}


def passed(name: str, reason: str, layer: Layer) -> Check:
    return Check(name=name, passed=True, reason=reason, layer=layer)


def failed(name: str, reason: str, layer: Layer) -> Check:
    return Check(name=name, passed=False, reason=reason, layer=layer)


@dataclass(frozen=True)
class Claims:
    """What the evidence says about the enclave, normalised across SEV-SNP and TDX.

    Only meaningful when the evidence is authentic (``Verdict.authentic``).
    """

    format: str  # "sev-snp" | "tdx"
    measurement: bytes  # SNP MEASUREMENT or TDX MRTD
    report_data: bytes
    debug: bool
    product: str | None = None  # SNP: Milan/Genoa/Turin
    signing_key: str | None = None  # SNP: vcek/vlek
    version: int | None = None  # report / quote version
    tcb: dict[str, int] = field(default_factory=dict)
    tcb_status: str | None = None  # TDX with collateral
    root: str | None = None  # which pinned root anchored the chain
    simulated: bool = False  # anchored in a simulated (consortium test) root
    chip_id: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format, "measurement": self.measurement.hex(),
            "report_data": self.report_data.hex(), "debug": self.debug,
            "version": self.version, "tcb": dict(self.tcb), "root": self.root,
            "simulated": self.simulated,
        }
        if self.product is not None:
            out["product"] = self.product
        if self.signing_key is not None:
            out["signing_key"] = self.signing_key
        if self.tcb_status is not None:
            out["tcb_status"] = self.tcb_status
        if self.chip_id is not None:
            out["chip_id"] = self.chip_id.hex()
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one piece of evidence against a policy."""

    checks: tuple[Check, ...]
    claims: Claims | None
    format: str | None
    evidence_sha256: str | None = None

    @property
    def accepted(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) \
            and self.claims is not None

    @property
    def authentic(self) -> bool:
        """True when every parse and verify check passed (the claims can be believed)."""
        return self.claims is not None and all(
            c.passed for c in self.checks if c.layer in (Layer.PARSE, Layer.VERIFY))

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def reasons(self) -> list[str]:
        """Failure reasons when rejected; every check's reason when accepted."""
        chosen = self.failures if not self.accepted else self.checks
        return [f"{c.name}: {c.reason}" for c in chosen]

    @property
    def summary(self) -> str:
        """One line: 'accepted' or the first failure (used as a quarantine reason)."""
        if self.accepted:
            return "accepted"
        first = self.failures[0] if self.failures else None
        more = len(self.failures) - 1
        text = f"{first.name}: {first.reason}" if first else "no checks ran"
        return text + (f" (+{more} more)" if more > 0 else "")

    def to_dict(self) -> dict[str, Any]:
        claims = self.claims.to_dict() if self.claims else {}
        out: dict[str, Any] = {
            "verdict": "accepted" if self.accepted else "rejected",
            "format": self.format,
            "reasons": self.reasons,
            "checks": [c.to_dict() for c in self.checks],
            "measurement": claims.get("measurement"),
            "report_data": claims.get("report_data"),
            "debug": claims.get("debug"),
            "evidence_sha256": self.evidence_sha256,
        }
        for key in ("product", "signing_key", "version", "tcb", "tcb_status", "root",
                    "simulated", "chip_id"):
            if key in claims:
                out[key] = claims[key]
        for key, value in claims.items():
            out.setdefault(key, value)
        return out
