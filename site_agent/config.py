"""Site configuration (pydantic): what a hospital's IT team writes in ``site.toml``.

Every section documents its fields; unknown keys are refused so a typo never silently changes
behaviour. Paths are resolved relative to the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cleanroom.config import Section, load_model, paths
from cleanroom.protocol.wire import HexDigest, SiteName


class EnclaveConfig(Section):
    """The site's TEE evidence provider."""

    provider: Literal["simulated", "configfs-tsm"] = "simulated"
    tsm_root: Path = Field(Path("/sys/kernel/config/tsm/report"),
                           description="configfs-tsm report folder")
    privlevel: int | None = Field(None, ge=0, le=3, description="SNP VMPL to request")
    vcek_path: Path | None = Field(None, description="VCEK/VLEK PEM when the host provides "
                                   "no certificate table")
    sealing_secret_path: Path | None = Field(None, description="configfs-tsm: file holding "
                                             "the enclave-derived sealing secret")
    sev_guest_device: Path | None = Field(None, description="configfs-tsm on SEV-SNP: seal "
                                          "with the firmware's derived key from this device "
                                          "(usually /dev/sev-guest)")
    sealing_fields: list[Literal["policy", "image_id", "family_id", "measurement", "guest_svn",
                                 "tcb_version"]] = Field(
        default_factory=lambda: ["policy", "measurement"],
        description="guest fields the SNP derived key is bound to (measurement: a code update "
        "cannot read the old sealed state; use image_id/family_id to keep it across updates)")
    simulated_root: Path | None = Field(None, description="simulated: folder written by "
                                        "'cleanroom attest simulate-root'")

    _resolve_paths = paths("tsm_root", "vcek_path", "sealing_secret_path", "sev_guest_device",
                           "simulated_root")


class PrivacyConfig(Section):
    """The site's differential-privacy budget (its own; the coordinator cannot raise it)."""

    delta: float = Field(1e-5, gt=0, lt=1)
    lifetime_epsilon: float = Field(10.0, gt=0, description="Total epsilon over all runs.")
    max_epsilon_per_run: float = Field(1.0, gt=0, description="Cap on one run's epsilon.")
    allow_no_dp: bool = Field(False, description="Accept runs without DP (never for real "
                              "patient data).")


class ApprovedTask(Section):
    """A task (approved code) this site runs, by digest ('cleanroom task digest FOLDER')."""

    digest: HexDigest = Field(description="task digest (docs/tasks.md)")
    name: str = Field("", max_length=64, description="a label for people; not checked")
    coordinators: list[str] = Field(default_factory=list, description="coordinators it may "
                                    "run for (fingerprints); any allowed coordinator if empty")
    max_epsilon_per_run: float | None = Field(None, gt=0, description="a lower per-run "
                                              "epsilon cap for this task")


class SitePolicyConfig(Section):
    """Which work this site accepts (approved tasks, job approval and allow-lists)."""

    coordinators: list[str] = Field(default_factory=list, description="Allowed coordinator key "
                                    "fingerprints (hex). Any if empty.")
    models: list[str] = Field(default_factory=list, description="Allowed model architecture "
                              "digests. Any if empty.")
    tasks: list[ApprovedTask] = Field(default_factory=list, description="Tasks this site runs "
                                      "for any run. A task not listed runs only for a run "
                                      "approved with 'cleanroom site approve RUN --task DIGEST'.")
    task_dirs: list[Path] = Field(default_factory=list, description="Folders holding the code "
                                  "of approved tasks (each a task folder or a folder of them); "
                                  "installed tasks are found without it.")
    require_approval: bool = Field(False, description="Every run waits for 'cleanroom site "
                                   "approve RUN_ID --task DIGEST --epsilon E'.")
    share_metrics: bool = Field(False, description="Let the coordinator's operator see this "
                                "site's own evaluation metrics. If false they go only to an "
                                "attested aggregator, which releases averages over the sites; "
                                "an evaluation for a coordinator without one is refused.")

    _paths = paths("task_dirs")


class AggregatorTrust(Section):
    """The coordinator's aggregator enclave, as this site verifies it every round before it
    releases an update (docs/architecture.md, trust both ways)."""

    required: bool = Field(False, description="Release updates only to an aggregator whose "
                           "evidence verifies against 'policy' (refusal "
                           "'aggregator-unattested' otherwise).")
    policy: Path | None = Field(None, description="Attestation policy file (TOML) for the "
                                "aggregator's evidence: its allowed measurements, TCB floor, "
                                "debug off; in a simulation the simulated root. Evidence from "
                                "an aggregator is verified against it whenever it is set.")

    _paths = paths("policy")

    @model_validator(mode="after")
    def _policy_when_required(self) -> AggregatorTrust:
        if self.required and self.policy is None:
            raise ValueError("aggregator.required needs aggregator.policy (the policy its "
                             "evidence is verified against)")
        return self


class FlowerNodeSettings(Section):
    """How the site's SuperNode reaches the coordinator's SuperLink (deployments only)."""

    superlink: str = Field("127.0.0.1:9400", description="host:port of the SuperLink")
    root_certificates: Path = Field(description="CA certificate the SuperLink's TLS "
                                    "certificate must chain to")
    auth_key: Path = Field(description="SuperNode auth private key (OpenSSH, mode 0600)")
    port: int = Field(9500, ge=1, le=65535, description="local port of the SuperNode's "
                      "runtime API (loopback)")

    _paths = paths("root_certificates", "auth_key")


class ExecutorConfig(Section):
    """How the site's executor runs tasks (deployments; docs/hospital-it-guide.md)."""

    torch_threads: int = Field(0, ge=0, le=512, description="torch threads of a task (0: "
                               "torch's default, one per core; 1 when several sites share "
                               "a machine, as 'cleanroom deploy-local' does)")
    poll_seconds: float = Field(0.1, ge=0.01, le=5.0, description="how often the executor "
                                "asks the SuperNode for a task (a message waits at most this "
                                "long for it)")


class SiteApiSettings(Section):
    """The site daemon's local HTTP API."""

    host: str = Field("127.0.0.1", description="loopback by default")
    port: int = Field(9600, ge=1, le=65535)
    tokens: Path | None = Field(None, description="hashed API tokens (operator/auditor)")

    _paths = paths("tokens")


class SiteConfig(Section):
    """Everything one site agent needs."""

    site: SiteName
    state_dir: Path = Field(description="Sealed store: ledger, approvals, data room, enclave "
                            "state.")
    enclave: EnclaveConfig = EnclaveConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    policy: SitePolicyConfig = SitePolicyConfig()
    aggregator: AggregatorTrust = AggregatorTrust()
    node_public_key: Path | None = Field(None, description="Flower node auth public key "
                                         "(PEM SPKI, deployment): bound into every "
                                         "attestation.")
    flower: FlowerNodeSettings | None = None
    executor: ExecutorConfig = ExecutorConfig()
    api: SiteApiSettings = SiteApiSettings()
    seed: int = 0
    reproducible_noise: bool = Field(
        False, description="Derive DP noise from 'seed' (research reproducibility only: anyone "
        "who knows the seed can remove the noise). Default: noise from the OS CSPRNG.")

    _resolve_paths = paths("state_dir", "node_public_key")


def load_site_config(path: Path) -> SiteConfig:
    return load_model(SiteConfig, Path(path))
