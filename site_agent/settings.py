"""What this site will do in a round, decided by the site alone from its policy and budget.

:func:`decide_settings` applies the site's policy (allowed coordinators and models, job
approval, whether DP may be off) and its own privacy caps to the coordinator's plan, and
calibrates the noise for the whole run from the site's own epsilon cap. It raises
:class:`~cleanroom.errors.SiteRefusal` with a typed code; nothing in it talks to Flower.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from cleanroom.errors import SiteRefusal
from cleanroom.protocol.wire import AttestChallenge

if TYPE_CHECKING:
    from cleanroom.site_agent.ledger import EpsilonMemo
    from cleanroom.site_agent.runtime import SiteRuntime


@dataclass(frozen=True)
class RoundSettings:
    """What this site will do this round."""

    noise_multiplier: float | None  # None: no DP (only if the site allows it)
    sample_rate: float
    local_steps: int
    epsilon_target: float | None
    delta: float
    dataset_digest: str = ""  # the registered dataset the task is served from
    dataset_rows: int = 0  # its training rows

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None


def round_seed(site_seed: int, round: int) -> int:
    """The per-site, per-round seed of batch sampling (and of noise, if the site opted into
    reproducible noise): the same formula for the confidential and the plaintext path."""
    return (site_seed * 1_000_003 + round) % (2**31)


@lru_cache(maxsize=256)
def noise_for(epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    from cleanroom.site_agent.training import calibrate_noise

    return float(calibrate_noise(epsilon, delta, sample_rate, total_steps))


def _cached(memo: EpsilonMemo | None, key: str, compute: Callable[[], object]) -> object:
    """A value kept in the node's Flower context across messages (each message may run in a
    fresh process: this spares the attestation query importing torch and Opacus). The context
    is outside the enclave's control: entries are MACed (see EpsilonMemo), a bad one is
    recomputed."""
    if memo is not None:
        text = memo.get_text(key)
        if text is not None:
            return json.loads(text)
    value = compute()
    if memo is not None:
        memo.put_text(key, json.dumps(value))
    return value


def _approved_epsilon(runtime: SiteRuntime, challenge: AttestChallenge) -> float | None:
    """The task must be approved for this coordinator (site policy) or for this run (an
    approval); returns the approval's epsilon cap, if any. Raises SiteRefusal. Looks at
    digests only: nothing of the task is loaded."""
    plan, policy = challenge.plan, runtime.config.policy
    ref = plan.task
    approval = runtime.approvals.for_run(challenge.run_id)
    by_run = approval is not None and approval.task_digest == ref.digest
    listed = [t for t in policy.tasks if t.digest == ref.digest
              and (not t.coordinators or challenge.coordinator_id in t.coordinators)]
    how = (f"approve it with 'cleanroom site approve {challenge.run_id} --task {ref.digest} "
           "--epsilon E'")
    if policy.require_approval and not by_run:
        raise SiteRefusal("approval-required", f"run {challenge.run_id} is not approved by site "
                          f"{runtime.site} for task {ref.name} ({ref.digest[:16]}...): {how}")
    if not listed and not by_run:
        raise SiteRefusal("task-not-approved", f"task {ref.name} (digest {ref.digest[:16]}...) "
                          f"is not approved at site {runtime.site}: {how}, or list it in "
                          "[[policy.tasks]]; nothing of it was loaded")
    caps = [t.max_epsilon_per_run for t in listed if t.max_epsilon_per_run is not None]
    if by_run:
        caps.append(approval.epsilon)  # type: ignore[union-attr]
    return min(caps) if caps else None


def _dataset(runtime: SiteRuntime, challenge: AttestChallenge) -> tuple[str, int]:
    """(digest, training rows) of the dataset the task is served from; refuses (typed) a
    missing dataset or a field the task would read that is missing or marked identifying."""
    from cleanroom.errors import DatasetError

    ref = challenge.plan.task
    record = runtime.datasets.get(ref.dataset)
    problems = []
    for name in ref.fields:
        column = record.column(name)
        if column is None:
            problems.append(("field-missing", f"column {name!r} is missing"))
        elif column.identifying:
            problems.append(("field-identifying", f"column {name!r} is marked identifying"))
    if problems:
        raise DatasetError(problems[0][0], f"task {ref.name} asks dataset {record.name!r} for "
                           f"fields this site will not serve: "
                           f"{'; '.join(p[1] for p in problems)}")
    return record.digest, record.train_rows


def decide_settings(runtime: SiteRuntime, challenge: AttestChallenge,
                    memo: EpsilonMemo | None = None) -> RoundSettings:
    """Apply the site's policy and budget to the coordinator's plan (raises SiteRefusal);
    ``memo`` keeps the costly answers across messages."""
    plan, privacy, policy = challenge.plan, runtime.config.privacy, runtime.config.policy
    if policy.coordinators and challenge.coordinator_id not in policy.coordinators:
        raise SiteRefusal("coordinator-not-allowed", f"coordinator {challenge.coordinator_id[:16]}"
                          "... is not in this site's policy")
    if policy.models and plan.task.architecture_digest not in policy.models:
        raise SiteRefusal("model-not-allowed", f"the model of task {plan.task.name} "
                          f"(architecture {plan.task.architecture_digest[:16]}...) is not "
                          "allowed by this site's policy")
    approved_epsilon = _approved_epsilon(runtime, challenge)
    dataset_digest, rows = _dataset(runtime, challenge)
    if not plan.dp.enabled:
        if not privacy.allow_no_dp:
            raise SiteRefusal("dp-required", "this site only trains with differential privacy")
        return RoundSettings(None, plan.sample_rate, plan.local_steps, None, privacy.delta,
                             dataset_digest, rows)
    epsilon = min(plan.dp.epsilon, privacy.max_epsilon_per_run,
                  approved_epsilon if approved_epsilon is not None else math.inf)
    steps = plan.rounds * plan.local_steps
    sigma = float(_cached(memo, f"sigma:{epsilon!r}:{privacy.delta!r}:{plan.sample_rate!r}:"  # type: ignore[arg-type]
                          f"{steps}", lambda: noise_for(epsilon, privacy.delta,
                                                        plan.sample_rate, steps)))
    return RoundSettings(sigma, plan.sample_rate, plan.local_steps, epsilon, privacy.delta,
                         dataset_digest, rows)
