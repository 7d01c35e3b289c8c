"""The attestation policy: what a verifier accepts, as one pydantic model loadable from TOML/JSON.

Every field says in one line what it checks and what happens when it is unset. Defaults are
strict where a permissive default would be dangerous (debug, migration agent, simulated roots)
and "not checked" only where no safe default exists (the measurement allow-list is deployment
specific; the coordinator refuses to start without one).

Parsing is strict (pydantic strict mode): values are never coerced, so ``allow_debug = "yes"``,
``"on"`` or ``1`` and ``vmpl = "0"`` are refused instead of silently becoming True and 0; unknown
keys are refused; ``formats`` must name registered evidence formats. The only conversions are
the documented ones: hex strings to bytes, RTMR indices written as strings (TOML/JSON keys are
strings), and paths written as strings.

Example (TOML)::

    name = "consortium-2026"
    measurements = ["4a1f...48 bytes hex..."]
    allow_debug = false
    [min_tcb.Milan]
    bootloader = 3
    snp = 8
    microcode = 115
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cleanroom.config import hex_bytes, load_model

ProductName = Literal["Milan", "Genoa", "Turin"]
TcbStatus = Literal["UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                    "ConfigurationAndSWHardeningNeeded", "OutOfDate",
                    "OutOfDateConfigurationNeeded", "Revoked", "TcbNotSupported"]
RTMR_COUNT = 4


def _index_from_key(value: Any) -> Any:
    """RTMR indices are table keys, which TOML and JSON always write as strings: "0".."3"."""
    if isinstance(value, str) and len(value) == 1 and value in "0123":
        return int(value)
    return value


RtmrIndex = Annotated[int, BeforeValidator(_index_from_key)]


def _registered(name: str) -> str:
    from cleanroom.attestation.registry import format_names

    known = format_names()
    if name not in known:
        raise ValueError(f"{name!r} is not a registered evidence format ({', '.join(known)})")
    return name


FormatName = Annotated[str, AfterValidator(_registered)]

Measurement = hex_bytes(48)
Hex16 = hex_bytes(16)
Hex32 = hex_bytes(32)
Hex48 = hex_bytes(48)
Hex64 = hex_bytes(64)

DEFAULT_MAX_EVIDENCE_BYTES = 64 * 1024
MAX_EVIDENCE_BYTES_LIMIT = 1024 * 1024  # the largest max_evidence_bytes a policy may set


class TcbFloor(BaseModel):
    """Minimum security patch levels; a report's REPORTED_TCB must meet each component."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    bootloader: int = Field(0, ge=0, le=255)
    tee: int = Field(0, ge=0, le=255)
    snp: int = Field(0, ge=0, le=255)
    microcode: int = Field(0, ge=0, le=255)
    fmc: int | None = Field(None, ge=0, le=255, description="Turin only")


class Policy(BaseModel):
    """Attestation policy. Unknown keys are refused so a typo never silently relaxes a check;
    values are never coerced (strict mode)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field("default", description="Shown in verdicts and the audit chain.")
    environment: Literal["production", "simulation"] = Field(
        "production", description="'production' policies can never trust a simulated root.")
    formats: list[FormatName] = Field(
        default_factory=lambda: ["sev-snp", "tdx"],
        description="Evidence formats accepted (names of registered formats).")
    measurements: list[Measurement] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Allowed SNP MEASUREMENT / TDX MRTD values. Not checked if empty. In a "
        "'simulation' policy these are site-agent launch digests: a simulated enclave is "
        "launched per task, and the coordinator expects each folded with the run's task "
        "digest (cleanroom.attestation.simulated.task_measurement).")
    tasks: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=list,
        description="Coordinator: the task digests ('cleanroom task digest FOLDER') this "
        "consortium runs; a run whose task is not listed does not start. Sites bind the "
        "task's digest into every attestation.")
    rtmrs: dict[RtmrIndex, list[Hex48]] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="TDX: allowed values per RTMR index 0..3. Indices not listed are not checked.")
    allow_debug: bool = Field(False, description="Accept debug enclaves (never in production).")
    allow_migration_agent: bool = Field(False, description="SNP: accept POLICY.MIGRATE_MA.")
    vmpl: int | None = Field(0, ge=0, le=3, description="SNP: required VMPL. Not checked if None.")
    products: list[ProductName] | None = Field(
        None, description="SNP: allowed products. Any if None.")
    signing_keys: list[Literal["vcek", "vlek"]] = Field(
        default_factory=lambda: ["vcek", "vlek"], description="SNP: allowed signing keys.")
    min_tcb: dict[ProductName, TcbFloor] = Field(
        default_factory=dict,
        description="SNP: REPORTED_TCB floor per product. No floor for products not listed.")
    min_guest_svn: int = Field(0, ge=0, description="SNP: minimum GUEST_SVN.")
    min_report_version: int = Field(2, ge=2, description="SNP: minimum report VERSION.")
    family_id: Hex16 | None = Field(None, description="SNP FAMILY_ID. Not checked if None.")  # type: ignore[valid-type]
    image_id: Hex16 | None = Field(None, description="SNP IMAGE_ID. Not checked if None.")  # type: ignore[valid-type]
    host_data: Hex32 | None = Field(None, description="SNP HOST_DATA. Not checked if None.")  # type: ignore[valid-type]
    config_id: Hex48 | None = Field(None, description="TDX MRCONFIGID. Not checked if None.")  # type: ignore[valid-type]
    mr_owner: Hex48 | None = Field(None, description="TDX MROWNER. Not checked if None.")  # type: ignore[valid-type]
    mr_seam: list[Hex48] = Field(  # type: ignore[valid-type]
        default_factory=list, description="TDX: allowed MRSEAM (TDX module). Not checked if empty.")
    min_tee_tcb_svn: Hex16 | None = Field(  # type: ignore[valid-type]
        None, description="TDX: per-byte floor of TEE_TCB_SVN. Not checked if None.")
    require_collateral: bool = Field(
        False, description="TDX: refuse quotes verified without TCB collateral (production "
        "policies written by `cleanroom provision` set it). Without collateral the QE is still "
        "checked against Intel's pinned QE identity.")
    accepted_tcb_statuses: list[TcbStatus] = Field(
        default_factory=lambda: ["UpToDate"],
        description="TDX with collateral: acceptable TCB statuses.")
    report_data: Hex64 | None = Field(  # type: ignore[valid-type]
        None, description="Expected REPORT_DATA (the binding). Not checked if None; "
        "the coordinator always sets it per challenge.")
    max_evidence_bytes: int = Field(DEFAULT_MAX_EVIDENCE_BYTES, gt=0, le=MAX_EVIDENCE_BYTES_LIMIT,
                                    description="Evidence larger than this is refused unread.")
    simulated_root: Path | None = Field(
        None, strict=False,
        description="Simulated ARK+ASK bundle to trust (simulation only). None = AMD only.")

    @field_validator("rtmrs")
    @classmethod
    def _rtmr_indices(cls, value: dict[int, list[bytes]]) -> dict[int, list[bytes]]:
        bad = [i for i in value if not 0 <= i < RTMR_COUNT]
        if bad:
            raise ValueError(f"RTMR indices must be 0..3, got {bad}")
        return value

    @field_validator("simulated_root")
    @classmethod
    def _resolve_root(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base = (info.context or {}).get("base_dir")
        if value is not None and base is not None and not value.is_absolute():
            return Path(base) / value
        return value

    @model_validator(mode="after")
    def _no_simulated_root_in_production(self) -> Policy:
        if self.simulated_root is not None and self.environment == "production":
            raise ValueError("simulated_root is set but environment is 'production': "
                             "production policies never trust a simulated root")
        return self

    def with_updates(self, **changes: object) -> Policy:
        """A validated copy with some fields changed (the model is frozen)."""
        data = self.model_dump()
        data.update(changes)
        return Policy.model_validate(data)


def load_policy(path: Path) -> Policy:
    """Load and validate a policy file (``.toml`` or ``.json``); raises ConfigError."""
    return load_model(Policy, Path(path))
