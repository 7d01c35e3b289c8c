"""A site's long-lived pieces, built once per process from its :class:`SiteConfig`.

The runtime owns the enclave provider, the sealed privacy ledger, the approvals, the data room
and the site policy, and finds the code of an approved task by its digest (:meth:`task`).
Flower may start a fresh ClientApp per message; the runtime is cached per site and process,
and everything durable lives in the sealed store, not in memory.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from cleanroom.attestation.measure import code_measurement, site_code_roots  # noqa: F401
from cleanroom.attestation.simulated import load_simulated_root
from cleanroom.enclave import ConfigfsTsmProvider, EnclaveProvider, SimulatedProvider
from cleanroom.site_agent.activity import Activity
from cleanroom.site_agent.approvals import Approvals
from cleanroom.site_agent.config import SiteConfig
from cleanroom.site_agent.ledger import PrivacyLedger

if TYPE_CHECKING:
    from cleanroom.attestation.validate.policy import Policy
    from cleanroom.protocol.wire import TaskRef
    from cleanroom.site_agent.datasets import DataRoom, TaskData
    from cleanroom.task import LoadedTask

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.jsonl"


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
    task_sources: tuple[Path, ...] = ()  # task folders besides policy.task_dirs (a FAB's app)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _tasks: dict[str, LoadedTask] = field(default_factory=dict, repr=False)
    _data: dict[tuple[str, str], TaskData] = field(default_factory=dict, repr=False)

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

    def _task_folders(self, name: str | None) -> list[Path]:
        """Folders that may hold task ``name`` (every known task folder for ``None``)."""
        from cleanroom.task import installed_folder, installed_tasks, is_task_folder

        folders: list[Path] = []
        installed = installed_tasks()
        for task in ([name] if name is not None else sorted(installed)):
            if task in installed:
                folders.append(installed_folder(task))
        for root in (*self.task_sources, *self.config.policy.task_dirs):
            root = Path(root)
            if is_task_folder(root):
                folders.append(root)
            elif root.is_dir():
                folders += [c for c in sorted(root.iterdir()) if is_task_folder(c)]
        return folders

    def task(self, ref: TaskRef) -> LoadedTask:
        """The approved task ``ref`` names, loaded from the first folder whose digest is
        ``ref.digest`` (installed tasks, ``task_sources``, ``policy.task_dirs``). A folder
        with another digest is never imported (see :func:`cleanroom.task.load_task`).
        Raises :class:`~cleanroom.errors.SiteRefusal` ``task-not-found``."""
        from cleanroom.errors import SiteRefusal
        from cleanroom.task import TaskError, load_task

        with self._lock:
            cached = self._tasks.get(ref.digest)
            if cached is not None:
                return cached
            for folder in self._task_folders(ref.name):
                try:
                    loaded = load_task(folder, expect_digest=ref.digest)
                except TaskError as exc:
                    if exc.code == "task-not-approved":
                        continue  # another version of the task: not imported
                    raise
                self._tasks[ref.digest] = loaded
                return loaded
        raise SiteRefusal("task-not-found", f"site {self.site} holds no code of task "
                          f"{ref.name} with digest {ref.digest[:16]}... (installed tasks and "
                          "policy.task_dirs were searched)")

    def preload(self, digests: list[str]) -> list[str]:
        """Load the tasks with these digests (the site policy's approved tasks) and their
        registered data once, so that every message finds them in memory (the warm executor
        calls this before it forks per message). Only folders whose digest is one of
        ``digests`` are imported. Returns the digests loaded."""
        from cleanroom.errors import CleanroomError
        from cleanroom.task import load_task, task_digest

        wanted = set(digests) - set(self._tasks)
        for folder in self._task_folders(None):
            if not wanted:
                break
            try:
                digest = task_digest(folder)
                if digest not in wanted:
                    continue
                loaded = load_task(folder, expect_digest=digest)
            except CleanroomError as exc:
                log.warning("task folder %s not preloaded: %s", folder, exc)
                continue
            with self._lock:
                self._tasks[digest] = loaded
            wanted.discard(digest)
            try:
                self.task_data(loaded, loaded.task.dataset_name)
            except CleanroomError as exc:  # not registered yet: served when a message asks
                log.info("task %s: data not preloaded: %s", loaded.name, exc)
        return [d for d in digests if d in self._tasks]

    def task_data(self, loaded: LoadedTask, dataset: str) -> TaskData:
        """The task's fields of registered ``dataset``, read once per registration."""
        record = self.datasets.get(dataset)
        key = (loaded.digest, record.digest)
        with self._lock:
            data = self._data.get(key)
            if data is None:
                data = self.datasets.serve(loaded.task, dataset)
                self._data = {key: data}  # keep one: the current task and registration
            return data

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

    @cached_property
    def aggregator_policy(self) -> Policy | None:
        """The policy the coordinator's aggregator evidence is verified against (or None)."""
        path = self.config.aggregator.policy
        if path is None:
            return None
        from cleanroom.attestation.validate.policy import load_policy

        return load_policy(path)

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
