"""Simulation scenarios: honest federations and the hostile sites we defend against.

Each hostile behaviour is a real attack on the protocol, not a flag the coordinator reads:

* ``tampered-site`` - the site runs modified code (a copy of ``site_agent`` whose DP noise is
  switched off); the simulated TEE measures that code, so its MEASUREMENT differs.
* ``replayed-evidence`` - the site re-sends evidence it recorded earlier (last round's, or a
  report captured before the run for round 1) instead of fresh evidence.
* ``forged-evidence`` - the site alters its report after the AMD-SP signed it (signature breaks).
* ``debug-enclave`` - the site's guest was launched with the DEBUG policy bit.
* ``over-budget`` - the site's lifetime privacy budget is tiny; it refuses and is quarantined.
* ``dropout-after-masking`` - secure aggregation: the site shares its masks, then goes offline
  before it sends its masked update; the others' sum is unmasked without it (its mask key is
  rebuilt from their shares) and the round completes with them.
* ``unattested-coordinator`` - the coordinator's aggregator enclave runs modified code (a copy
  that keeps every opened update); its measurement is not the one the sites pin, so every site
  refuses to release its update (typed ``aggregator-attestation`` refusals).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cleanroom.attestation.abi import snp as abi
from cleanroom.attestation.simulated import measure_code
from cleanroom.enclave import EnclaveProvider, Evidence
from cleanroom.site_agent.runtime import SiteRuntime

if TYPE_CHECKING:
    from cleanroom.protocol.wire import TaskRef
    from cleanroom.task import LoadedTask

SCENARIOS: dict[str, str] = {
    "honest": "all sites honest",
    "tampered-site": "one site runs modified code (different measurement)",
    "replayed-evidence": "one site re-sends last round's evidence",
    "forged-evidence": "one site alters its signed report (bad signature)",
    "debug-enclave": "one site's enclave has the debug policy bit set",
    "over-budget": "one site has a tiny privacy budget",
    "unattested-coordinator": "the coordinator's aggregator runs modified code (sites refuse)",
    "dropout-after-masking": "one site goes offline after sharing its masks (secure "
                             "aggregation)",
    "poisoned-update": "one attested site sends its update scaled 100x (its trainer replaced "
                       "by a test hook attestation cannot see); the update bound refuses it",
}
POISON_SCALE = 100.0
COORDINATOR_SCENARIOS = frozenset({"unattested-coordinator"})  # the hostile party: coordinator
OVER_BUDGET_EPSILON = 0.05
TAMPER_TARGET = "training.py"


class DropAfterMasking:
    """A client mod: the site at ``partition`` answers attestation and share-keys, then drops
    every train message (it went offline after its masks were shared)."""

    def __init__(self, partition: int) -> None:
        self.partition = partition

    def __call__(self, msg: Any, ctx: Any, call_next: Any) -> Any:
        if msg.metadata.message_type.split(".")[0] == "train" and \
                int(ctx.node_config.get("partition-id", -1)) == self.partition:
            raise ConnectionError("the site went offline after sharing its masks")
        return call_next(msg, ctx)


class PoisoningTrainer:
    """The trainer of a site whose attested code was replaced by a test hook: ``site``'s
    update is its honest delta scaled by ``scale`` (model poisoning by an attested site, what
    the coordinator's update bound is for); every other site trains honestly."""

    def __init__(self, inner: Any, site: str, scale: float = POISON_SCALE) -> None:
        self.inner, self.site, self.scale = inner, site, scale

    def train(self, runtime: Any, plan: Any, arrays: Any, settings: Any, seed: int,
              strategy_config: Any) -> Any:
        import dataclasses
        from collections import OrderedDict

        import numpy as np

        outcome = self.inner.train(runtime, plan, arrays, settings, seed, strategy_config)
        if runtime.site != self.site:
            return outcome
        poisoned = OrderedDict(
            (k, (np.asarray(arrays[k]) + self.scale * (np.asarray(v) - np.asarray(arrays[k])))
             .astype(np.asarray(v).dtype)) for k, v in outcome.parameters.items())
        return dataclasses.replace(outcome, parameters=poisoned)

    def evaluate(self, runtime: Any, plan: Any, arrays: Any) -> Any:
        return self.inner.evaluate(runtime, plan, arrays)


@dataclass(frozen=True)
class Fault:
    """The hostile behaviour of one site (``kind`` is a scenario name)."""

    kind: str


class ReplayingProvider:
    """Wraps an honest provider and answers every challenge with previously seen evidence."""

    def __init__(self, inner: EnclaveProvider) -> None:
        self.inner = inner
        self.name = inner.name
        # Evidence captured before the run (for a challenge that is not this run's).
        self._last: Evidence = inner.evidence(os.urandom(abi.REPORT_DATA_SIZE))

    def evidence(self, report_data: bytes) -> Evidence:
        replayed = self._last
        self._last = self.inner.evidence(report_data)  # keep "last round's" for the next one
        return replayed

    def sealing_key(self, label: bytes) -> bytes:
        return self.inner.sealing_key(label)

    def for_task(self, task_digest: str) -> EnclaveProvider:
        return type(self)(self.inner.for_task(task_digest))


class ForgingProvider:
    """Wraps an honest provider and edits the report after signing (e.g. a better TCB)."""

    def __init__(self, inner: EnclaveProvider) -> None:
        self.inner = inner
        self.name = inner.name

    def evidence(self, report_data: bytes) -> Evidence:
        honest = self.inner.evidence(report_data)
        forged = bytearray(honest.data)
        forged[abi.OFF_GUEST_SVN] ^= 0x01  # claim another guest SVN; the signature now fails
        return Evidence(honest.format, bytes(forged), honest.endorsement, honest.provider)

    def sealing_key(self, label: bytes) -> bytes:
        return self.inner.sealing_key(label)

    def for_task(self, task_digest: str) -> EnclaveProvider:
        return type(self)(self.inner.for_task(task_digest))


def tampered_code_measurement(code_roots: list[Path], target_name: str = TAMPER_TARGET,
                              patch: str = "\n# tampered build: exfiltrate updates without "
                              "noise\nNOISE_OVERRIDE = 0.0\n", extra: bytes = b"") -> bytes:
    """Measurement of a modified copy of the code: by default the site code with DP noise
    forced to zero."""
    with tempfile.TemporaryDirectory(prefix="cleanroom-tampered-") as tmp:
        roots = []
        for root in code_roots:
            dst = Path(tmp) / root.name
            shutil.copytree(root, dst, ignore=shutil.ignore_patterns("__pycache__"))
            roots.append(dst)
        target = next((r / target_name for r in roots if (r / target_name).exists()), None)
        if target is None:
            target = roots[0] / "tampered.py"
            target.write_text("")
        with open(target, "a") as fh:
            fh.write(patch)
        return measure_code(roots, extra=extra)


def tampered_aggregator_measurement() -> bytes:
    """Measurement of a modified aggregator: a copy whose core keeps every opened update."""
    import importlib.util

    from cleanroom.attestation.measure import AGGREGATOR_PACKAGES, AGGREGATOR_TAG

    roots = [Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))  # type: ignore[union-attr, arg-type]
             for name in AGGREGATOR_PACKAGES]
    return tampered_code_measurement(
        roots, "aggregator.py", "\n# curious build: keep every opened update\nKEEP = []\n",
        extra=AGGREGATOR_TAG)


@dataclass
class SimulatedRuntime(SiteRuntime):
    """A simulated site's runtime. The simulated sites of one process share the tasks they
    loaded, by digest (``shared_tasks``): each would load the same folder and find the same
    digest, so one load (digest over the folder's bytes, import, architecture digest) serves
    them all. A digest not in it is looked up as a deployed site would."""

    shared_tasks: dict[str, LoadedTask] = field(default_factory=dict, repr=False)

    def task(self, ref: TaskRef) -> LoadedTask:
        loaded = self.shared_tasks.get(ref.digest)
        return loaded if loaded is not None else super().task(ref)


class SimulatedSites:
    """Maps a Flower node (its ``partition-id``) to that site's runtime, per process.

    Picklable (only configurations travel to simulation workers); each worker process builds
    the runtimes it needs once: providers load the site's persistent simulated chip from its
    state folder, hostile sites get their faulty provider. The task folder is loaded once per
    process and digest (:class:`SimulatedRuntime`).
    """

    def __init__(self, configs: list, faults: dict[str, Fault], *,
                 task_folder: Path | None = None) -> None:
        self.configs = list(configs)
        self.faults = dict(faults)
        self.task_folder = task_folder
        self._cache: dict[int, object] = {}
        self._tasks: dict[str, LoadedTask] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {"configs": self.configs, "faults": self.faults, "task_folder": self.task_folder}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.configs = state["configs"]  # type: ignore[assignment]
        self.faults = state["faults"]  # type: ignore[assignment]
        self.task_folder = state.get("task_folder")  # type: ignore[assignment]
        self._cache = {}
        self._tasks = {}
        self._lock = threading.Lock()

    def _task(self, folder: Path, digest: str) -> LoadedTask:
        """The task in ``folder``, loaded once per process (refused unless its digest is
        ``digest``, before anything of it is imported)."""
        from cleanroom.task import load_task

        loaded = self._tasks.get(digest)
        if loaded is None:
            loaded = load_task(folder, expect_digest=digest)
            self._tasks[digest] = loaded
        return loaded

    def site_index(self, ctx: object) -> int:
        node_config = ctx.node_config  # type: ignore[attr-defined]
        return int(node_config["partition-id"])

    def __call__(self, ctx: object):  # -> SiteRuntime
        index = self.site_index(ctx)
        runtime = self._cache.get(index)
        if runtime is None:
            with self._lock:
                runtime = self._cache.get(index)
                if runtime is None:
                    runtime = self._build(index)
                    self._cache[index] = runtime
        return runtime

    def _build(self, index: int):  # -> SiteRuntime
        from cleanroom.attestation.simulated import load_simulated_root
        from cleanroom.enclave import SimulatedProvider
        from cleanroom.site_agent.runtime import code_measurement, site_code_roots

        config = self.configs[index]
        fault = self.faults.get(config.site)
        root = load_simulated_root(config.enclave.simulated_root)
        state = config.state_dir / "enclave"
        kind = fault.kind if fault else "honest"
        if kind == "tampered-site":
            measurement = tampered_code_measurement(site_code_roots())
        else:
            measurement = code_measurement()
        provider: EnclaveProvider = SimulatedProvider.launch(
            root, state, measurement, debug=(kind == "debug-enclave"))
        if kind == "replayed-evidence":
            provider = ReplayingProvider(provider)
        elif kind == "forged-evidence":
            provider = ForgingProvider(provider)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        runtime = SimulatedRuntime(config=config, provider=provider, shared_tasks=self._tasks)
        self._register_data(runtime, index)
        return runtime

    def _register_data(self, runtime: Any, index: int) -> None:
        """The simulated hospital's data: the task's simulate() for this site, registered in
        its data room as its IT team would register a real export."""
        policy = runtime.config.policy
        if not policy.tasks:
            return
        folder = self.task_folder or policy.task_dirs[0]
        loaded = self._task(folder, policy.tasks[0].digest)
        runtime.datasets.register_simulated(loaded.task, index, len(self.configs))
