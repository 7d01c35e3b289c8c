"""What this site will do in a round, decided by the site alone from its policy and budget.

:func:`decide_settings` applies the site's policy (allowed coordinators and models, job
approval, whether DP may be off) and its own privacy caps to the coordinator's plan, and
calibrates the noise for the whole run from the site's own epsilon cap. It raises
:class:`~cleanroom.errors.SiteRefusal` with a typed code; nothing in it talks to Flower.
"""

from __future__ import annotations

import json
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


@lru_cache(maxsize=16)
def _architecture_digest(model: str) -> str:
    from cleanroom.models import architecture_digest

    return architecture_digest(model)


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


def decide_settings(runtime: SiteRuntime, challenge: AttestChallenge,
                    memo: EpsilonMemo | None = None) -> RoundSettings:
    """Apply the site's policy and budget to the coordinator's plan (raises SiteRefusal);
    ``memo`` keeps the costly answers across messages."""
    plan, privacy, policy = challenge.plan, runtime.config.privacy, runtime.config.policy
    if policy.coordinators and challenge.coordinator_id not in policy.coordinators:
        raise SiteRefusal("coordinator-not-allowed", f"coordinator {challenge.coordinator_id[:16]}"
                          "... is not in this site's policy")
    if policy.models and plan.model_architecture_digest not in policy.models:
        raise SiteRefusal("model-not-allowed", f"model {plan.model} (architecture "
                          f"{plan.model_architecture_digest[:16]}...) is not allowed by this "
                          "site's policy")
    if policy.require_approval and not runtime.approvals.is_approved(challenge.run_id):
        raise SiteRefusal("approval-required", f"run {challenge.run_id} is not approved by "
                          f"site {runtime.site}: approve it with 'cleanroom site approve "
                          f"{challenge.run_id}'")
    digest = _cached(memo, f"arch:{plan.model}", lambda: _architecture_digest(plan.model))
    if digest != plan.model_architecture_digest:
        raise SiteRefusal("model-mismatch", f"plan names model {plan.model} but its digest "
                          "differs from this site's definition")
    if not plan.dp.enabled:
        if not privacy.allow_no_dp:
            raise SiteRefusal("dp-required", "this site only trains with differential privacy")
        return RoundSettings(None, plan.sample_rate, plan.local_steps, None, privacy.delta)
    epsilon = min(plan.dp.epsilon, privacy.max_epsilon_per_run)
    steps = plan.rounds * plan.local_steps
    sigma = float(_cached(memo, f"sigma:{epsilon!r}:{privacy.delta!r}:{plan.sample_rate!r}:"  # type: ignore[arg-type]
                          f"{steps}", lambda: noise_for(epsilon, privacy.delta,
                                                        plan.sample_rate, steps)))
    return RoundSettings(sigma, plan.sample_rate, plan.local_steps, epsilon, privacy.delta)
