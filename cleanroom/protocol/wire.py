"""Wire schemas both sides agree on (pydantic v2), independent of the transport.

A Flower adapter (``cleanroom.protocol.flower``) puts these into message records; nothing here
imports Flower. Binary fields are hex in JSON; large binary payloads (evidence, ciphertexts)
travel beside the JSON header as raw bytes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cleanroom.config import hex_bytes

PROTOCOL_VERSION = 1

Hex32 = hex_bytes(32)
HexDigest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SiteName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
TaskName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
DatasetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DpPlan(_Wire):
    """What the coordinator asks for; each site still applies its own budget and caps."""

    enabled: bool = True
    epsilon: float = Field(1.0, gt=0, description="Target epsilon per site for the whole run.")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)


class TaskRef(_Wire):
    """The approved code a run executes at the sites, named by digest (cleanroom.task): a site
    checks it against its approvals before it loads anything, and binds it in every
    attestation."""

    name: TaskName
    digest: HexDigest = Field(description="task digest (docs/tasks.md): the task folder's "
                              "files, or the FAB Flower builds from it")
    architecture_digest: HexDigest = Field(description="of the model the task builds")
    dataset: DatasetName = Field(description="the dataset name sites serve this task from")
    fields: tuple[Annotated[str, StringConstraints(min_length=1, max_length=256)], ...] = Field(
        max_length=10_000, description="the dataset columns the task reads (features, then "
        "targets): a site refuses an identifying or missing one before it loads the task")


class TrainPlan(_Wire):
    """Training work for one run; lets a site check its budget before it attests."""

    rounds: int = Field(gt=0, le=100_000)
    local_steps: int = Field(gt=0, le=100_000, description="DP-SGD steps per round.")
    sample_rate: float = Field(gt=0, le=1, description="Poisson sampling rate per step.")
    lr: float = Field(gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    dp: DpPlan = DpPlan()
    task: TaskRef
    secure_aggregation: bool = Field(False, description="sites mask their updates (SecAgg "
                                     "with dropouts, docs/secure-aggregation.md): the "
                                     "aggregator learns only their weighted sum")
    central_clip: float | None = Field(None, gt=0, description="central DP inside the "
                                       "aggregator: each site's update delta is clipped to "
                                       "this L2 norm (by the site itself under secure "
                                       "aggregation, where weights are then 1)")
    max_update_norm: float | None = Field(
        None, gt=0, description="L2 bound on (update - global model). Under DP the coordinator "
        "derives each site's bound from this plan (cleanroom.bounds); a value here "
        "can only tighten it. Without DP it is the bound.")


class LedgerAnchor(_Wire):
    """A point of a site's privacy ledger the coordinator saw attested: the site must prove
    its ledger still passes through it (same head at that many records), i.e. was not forked
    from an older copy and then grown past the coordinator's count."""

    records: int = Field(ge=0, le=2**63 - 1)
    head: HexDigest


class AttestChallenge(_Wire):
    """Coordinator -> site, first message of every round."""

    protocol: Literal[1] = PROTOCOL_VERSION
    run_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=1)
    nonce: Hex32  # type: ignore[valid-type]
    coordinator_public_key: Hex32  # type: ignore[valid-type]
    model_digest: HexDigest
    plan: TrainPlan
    coordinator_id: str = Field(default="", max_length=128,
                                description="Fingerprint of the coordinator's signing key.")
    issued_at: float
    ledger_anchor: LedgerAnchor | None = None


class Refusal(_Wire):
    """A site's typed refusal (privacy budget, policy, approval...)."""

    code: str = Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")
    detail: str = Field(max_length=2000)


class AttestResponse(_Wire):
    """Site -> coordinator. Evidence and its endorsement travel as raw bytes beside this."""

    protocol: Literal[1] = PROTOCOL_VERSION
    site: SiteName
    run_id: str
    round: int
    nonce: Hex32  # type: ignore[valid-type]
    site_public_key: Hex32 | None = None  # type: ignore[valid-type]
    node_public_key: str = Field("", max_length=512, description="hex, deployment only")
    provider: str = ""
    refusal: Refusal | None = None
    ledger_records: int = Field(0, ge=0, le=2**63 - 1, description="records in the site's "
                                "sealed privacy ledger when it answered (bound in report_data)")
    ledger_head: HexDigest = Field(  # type: ignore[valid-type]
        "0" * 64, description="head hash of that ledger")
    ledger_anchor_head: HexDigest | None = Field(  # type: ignore[valid-type]
        None, description="the ledger's head at the challenge's anchor count (None: the ledger "
        "never held that many records)")
    task_digest: HexDigest | None = Field(  # type: ignore[valid-type]
        None, description="the task the site will run (must be the plan's; bound)")
    update_signer_key: Hex32 | None = Field(  # type: ignore[valid-type]
        None, description="the site's per-round Ed25519 key that signs its update and "
        "reports (bound)")
    dataset_digest: HexDigest | None = Field(  # type: ignore[valid-type]
        None, description="SHA-256 of the registered dataset the site serves the task from")
    dataset_rows: int = Field(0, ge=0, le=10**9, description="its training rows (bound: the "
                              "update bound and the reported sample count use it)")
    secagg_channel_key: Hex32 | None = Field(  # type: ignore[valid-type]
        None, description="secure aggregation: the site's X25519 channel key this round "
        "(bound, with the mask key, into report_data)")
    secagg_mask_key: Hex32 | None = Field(  # type: ignore[valid-type]
        None, description="secure aggregation: the site's X25519 mask key this round")
    aggregator_nonce: Hex32 | None = Field(  # type: ignore[valid-type]
        None, description="the site's own fresh challenge to the coordinator's aggregator "
        "enclave: the aggregator's evidence must bind it before the site releases an update")


# A node's answer to its challenge as the coordinator receives it: (response, evidence,
# endorsement), or why there is none (an error, an unreadable reply)
AttestAnswer = tuple[AttestResponse, bytes, bytes] | str


class EnvelopeHeader(_Wire):
    """Describes a ciphertext (model to a site, update back); the bytes travel beside it.
    ``ciphertext_sha256``: envelope v2's ciphertext id (SHA-256 over its header digest and
    chunk tags)."""

    protocol: Literal[2] = 2
    direction: Literal["model", "update", "evaluate", "metrics"]
    run_id: str
    round: int
    site: SiteName
    model_digest: HexDigest
    suite: str
    ciphertext_sha256: HexDigest
