"""A site's long-lived pieces, built once per process from its :class:`SiteConfig`.

The runtime owns the enclave provider, the sealed privacy ledger, the site policy and (lazily)
the site's data. Flower may start a fresh ClientApp per message; the runtime is cached per site
and process, and everything durable lives in the sealed store, not in memory.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from cleanroom.attestation.simulated import load_simulated_root, measure_code
from cleanroom.site_agent.activity import Activity
from cleanroom.site_agent.approvals import Approvals
from cleanroom.site_agent.config import SiteConfig
from cleanroom.site_agent.data import SiteData, load_heart_disease_site, synthetic_site
from cleanroom.site_agent.enclave import ConfigfsTsmProvider, EnclaveProvider, SimulatedProvider
from cleanroom.site_agent.ledger import PrivacyLedger

if TYPE_CHECKING:
    from cleanroom.site_agent.datasets import DataRoom

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.jsonl"


def site_code_roots() -> list[Path]:
    """Source folders of the code a site runs: what the simulated TEE measures."""
    import cleanroom
    import cleanroom.models
    import cleanroom.site_agent

    return [Path(m.__file__).resolve().parent
            for m in (cleanroom, cleanroom.site_agent, cleanroom.models)]


@lru_cache(maxsize=1)
def code_measurement() -> bytes:
    """The honest simulated launch digest of the installed site code."""
    return measure_code(site_code_roots())


def build_provider(config: SiteConfig) -> EnclaveProvider:
    enclave = config.enclave
    if enclave.provider == "configfs-tsm":
        return ConfigfsTsmProvider(enclave.tsm_root, privlevel=enclave.privlevel,
                                   vcek_path=enclave.vcek_path,
                                   sealing_secret_path=enclave.sealing_secret_path,
                                   sev_guest_device=enclave.sev_guest_device,
                                   sealing_fields=tuple(enclave.sealing_fields))
    root = load_simulated_root(enclave.simulated_root) if enclave.simulated_root else None
    return SimulatedProvider.launch(root, config.state_dir / "enclave", code_measurement())


@dataclass
class SiteRuntime:
    """Everything one site needs to answer the coordinator."""

    config: SiteConfig
    provider: EnclaveProvider
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def site(self) -> str:
        return self.config.site

    @cached_property
    def ledger(self) -> PrivacyLedger:
        p = self.config.privacy
        return PrivacyLedger(self.config.state_dir / LEDGER_FILE,
                             self.provider.sealing_key(b"privacy-ledger"),
                             delta=p.delta, lifetime_epsilon=p.lifetime_epsilon,
                             run_epsilon=p.max_epsilon_per_run)

    @cached_property
    def data(self) -> SiteData:
        d = self.config.data
        if d.kind == "heart-disease":
            return load_heart_disease_site(d.name, d.path)
        return synthetic_site(d.name, d.index, d.n_train, d.n_test, d.seed)

    @cached_property
    def activity(self) -> Activity:
        return Activity(self.config.state_dir, self.provider.sealing_key(b"activity"))

    @cached_property
    def datasets(self) -> DataRoom:
        """The site's data room (registered datasets, sealed like the approvals)."""
        from cleanroom.site_agent.datasets import DataRoom

        return DataRoom(self.config.state_dir, self.provider.sealing_key(b"datasets"))

    @cached_property
    def approvals(self) -> Approvals:
        return Approvals(self.config.state_dir, self.provider.sealing_key(b"approvals"))

    def session_key(self) -> bytes:
        return self.provider.sealing_key(b"session")

    @cached_property
    def node_public_key(self) -> bytes:
        """The Flower node auth key's identity bytes (bound into attestations; deployment)."""
        path = self.config.node_public_key
        if path is None:
            return b""
        from cleanroom.pki import NodePublicKey

        return NodePublicKey.load(path).identity


def build_runtime(config: SiteConfig, provider: EnclaveProvider | None = None) -> SiteRuntime:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return SiteRuntime(config=config, provider=provider or build_provider(config))
