"""The attested aggregator: the part of the coordinator that may see sites' updates.

It runs in its own enclave (a separate process here, :mod:`cleanroom.coordinator.enclave`;
a confidential VM in production) with its own measurement, which every site's policy pins.
The operator's process never holds a round's private key: it relays ciphertexts and receives
only what the aggregator releases.

Per round (:class:`AggregatorCore`):

1. :meth:`~AggregatorCore.begin_round`: a fresh X25519 round key, generated inside; the
   global model (to validate updates against) and how to aggregate;
2. :meth:`~AggregatorCore.attest`: evidence whose REPORT_DATA binds the site's own fresh
   nonce, the run, the round, the site, the round key and the model digest
   (:class:`cleanroom.protocol.binding.AggregatorBinding`): the site verifies it before it
   releases an update sealed to that key;
3. :meth:`~AggregatorCore.submit_update`: open (the site's attested signing key must have
   signed it), check the report against the plan and the attested rows, bound the norm
   (:mod:`cleanroom.bounds`), then fold it into a running weighted sum
   (``mean`` mode: O(model) memory whatever the number of sites) or keep it (``collect``
   mode, for robust strategies that need every update: they run in here);
4. :meth:`~AggregatorCore.aggregate`: the only thing released: the weighted mean (with central
   DP: the unweighted mean of clipped deltas plus calibrated Gaussian noise, accounted here),
   or the robust strategy's output;
5. :meth:`~AggregatorCore.submit_metrics` / :meth:`~AggregatorCore.release_metrics`: a site's
   evaluation leaves per site only when the site's report says its policy allows it;
   otherwise only the client average is released.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from cleanroom.bounds import update_bound
from cleanroom.coordinator.validation import (
    add_scaled,
    check_train_report,
    chunks,
    scaled,
    site_update_bound,
    update_norm,
    validate_update,
)
from cleanroom.errors import CleanroomError, UpdateRejected
from cleanroom.protocol.binding import AggregatorBinding
from cleanroom.protocol.envelope import EnvelopeContext, KeyPair
from cleanroom.protocol.payload import Sealed, open_metrics, open_update
from cleanroom.protocol.reports import EvaluateReport, TrainReport, metric_means
from cleanroom.protocol.wire import TrainPlan

log = logging.getLogger(__name__)

Mode = Literal["mean", "collect", "secagg"]


class EvidenceSource(Protocol):
    """The aggregator enclave's evidence provider (simulated or configfs-tsm)."""

    name: str

    def evidence(self, report_data: bytes) -> Any: ...


@dataclass(frozen=True)
class CentralDp:
    """User-level DP added inside the aggregator: each site's delta clipped to ``clip``, the
    unweighted mean of the clipped deltas plus N(0, (sigma * clip / n)^2)."""

    noise_multiplier: float
    clip: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("central DP noise multiplier must be > 0")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError("central DP clip must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError("central DP delta must be in (0, 1)")

    @classmethod
    def calibrated(cls, epsilon: float, delta: float, rounds: int, clip: float) -> CentralDp:
        """The noise for (``epsilon``, ``delta``) user-level DP over ``rounds`` rounds in which
        every site takes part (RDP, sampling rate 1)."""
        from cleanroom.privacy import calibrate_noise

        return cls(calibrate_noise(epsilon, delta, 1.0, rounds), clip, delta)


MIN_RELEASE = 2  # fewest accepted updates an aggregate is released from (measured code)

@dataclass(frozen=True)
class SiteSlot:
    """What the operator's side tells the aggregator about an admitted site."""

    site: str
    update_signer: bytes | None
    dataset_rows: int


@dataclass(frozen=True)
class Verdict:
    """The aggregator's decision about one update or report (digests and reasons only)."""

    accepted: bool
    reason: str = ""
    norm: float | None = None
    report: TrainReport | None = None
    ciphertext_sha256: str | None = None


@dataclass(frozen=True)
class Aggregate:
    """What leaves the aggregator after a round's training."""

    arrays: OrderedDict[str, np.ndarray] | None
    total_examples: int
    sites: tuple[str, ...]
    central_epsilon: float | None = None  # cumulative, when central DP is on
    train_loss: float | None = None  # example-weighted mean of the reported losses (no DP)
    dropped: tuple[str, ...] = ()  # secure aggregation: sites whose input is not in the sum
    failure: str | None = None  # why there is no aggregate (e.g. too few secagg survivors)
    secagg: dict[str, Any] | None = None  # the round's secure-aggregation parameters


@dataclass(frozen=True)
class ReleasedMetrics:
    per_site: dict[str, EvaluateReport]  # only sites whose policy shares their metrics
    mean: dict[str, float]  # the client average over every site (each site counts once)
    weighted: dict[str, float]  # the example-weighted average (what Flower's strategies give)
    num_examples: int
    sites: tuple[str, ...]


@dataclass
class _RoundState:
    run_id: str
    round: int
    keys: KeyPair
    model: OrderedDict[str, np.ndarray]
    model_digest: str
    eval_digest: str = ""
    mode: Mode = "mean"
    slots: dict[str, SiteSlot] = field(default_factory=dict)
    total: dict[str, np.ndarray] = field(default_factory=dict)
    weight: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    loss_weight: int = 0
    clipped: dict[str, np.ndarray] = field(default_factory=dict)
    collected: list[tuple[str, OrderedDict[str, np.ndarray], TrainReport]] = field(
        default_factory=list)
    accepted: list[str] = field(default_factory=list)
    metrics: dict[str, EvaluateReport] = field(default_factory=dict)
    secagg: Any = None  # AggregatorSecAgg of the round
    reports: dict[str, TrainReport] = field(default_factory=dict)
    layout: Any = None  # how the flat secagg vector maps back to named arrays
    clip: float = 0.0
    failure: str | None = None
    released: bool = False  # the running sums were consumed by the release


class AggregatorCore:
    """One run's aggregator (inside its enclave). Not thread-safe: one call at a time."""

    def __init__(self, provider: EvidenceSource, plan: TrainPlan, *,
                 central_dp: CentralDp | None = None, robust: Any = None) -> None:
        """``robust``: a Flower strategy that needs every update (Krum, FedMedian...): it
        aggregates in here and only its output leaves."""
        self.provider = provider
        self.plan = plan
        self.central_dp = central_dp
        self.robust = robust
        self._rounds: dict[int, _RoundState] = {}  # at most two: one evaluating, one ahead
        self._central_steps = 0
        self._sigma: float | None = None  # the plan's DP noise (secure aggregation's clip)

    # ------------------------------------------------------------------ keys and evidence
    def begin_round(self, run_id: str, round: int, model: Mapping[str, np.ndarray],
                    model_digest: str, slots: Mapping[str, SiteSlot] | None = None) -> bytes:
        """Start a round: a fresh key (its private half never leaves), the global model;
        returns the round's public key."""
        if len(self._rounds) >= 2 and round not in self._rounds:
            raise CleanroomError("the aggregator keeps at most two rounds open")
        self._rounds[round] = _RoundState(
            run_id, round, KeyPair.generate(),
            OrderedDict((k, np.asarray(v)) for k, v in model.items()), model_digest,
            mode="collect" if self.robust else "mean", slots=dict(slots or {}))
        return self._rounds[round].keys.public_bytes

    def _state(self, round: int) -> _RoundState:
        state = self._rounds.get(round)
        if state is None:
            raise CleanroomError(f"the aggregator has no round {round} open")
        return state

    def admit(self, round: int, slot: SiteSlot) -> None:
        """An admitted site: its attested update-signing key and rows."""
        self._state(round).slots[slot.site] = slot

    def attest(self, round: int, site: str, site_nonce: bytes) -> tuple[bytes, bytes]:
        """Evidence for ``site`` binding its nonce to this round's key and model."""
        state = self._state(round)
        binding = AggregatorBinding(run_id=state.run_id, round=state.round, site=site,
                                    site_nonce=site_nonce,
                                    aggregator_public_key=state.keys.public_bytes,
                                    model_digest=state.model_digest)
        evidence = self.provider.evidence(binding.report_data())
        return evidence.data, evidence.endorsement

    def attest_sites(self, round: int, nonces: Mapping[str, bytes],
                     ) -> dict[str, tuple[bytes, bytes]]:
        """:meth:`attest` for many sites in one call (one pipe round trip)."""
        return {site: self.attest(round, site, nonce) for site, nonce in nonces.items()}

    # ------------------------------------------------------------------ updates
    def submit_update(self, round: int, site: str, sealed: Sealed) -> Verdict:
        """Open, check and fold one site's update; never raises for a bad update."""
        state = self._state(round)
        slot = state.slots.get(site)
        if slot is None:
            return Verdict(False, f"update rejected: {site} was not admitted this round")
        if site in state.accepted:
            return Verdict(False, f"update rejected: {site} already sent its update")
        if state.released:
            return Verdict(False, f"update rejected: round {round}'s aggregate was released")
        context = EnvelopeContext("update", state.run_id, state.round, site, state.model_digest)
        if state.mode == "secagg":
            return self._submit_masked(state, slot, sealed, context)
        try:
            update, report = open_update(sealed, state.keys, context, slot.update_signer)
            check_train_report(report, self.plan, slot.dataset_rows)
            bound = site_update_bound(self.plan, report, state.model)
            norm = validate_update(update, state.model, max_norm=bound)
        except CleanroomError as exc:
            return Verdict(False, f"update rejected: {exc}", ciphertext_sha256=sealed.sha256)
        self._fold(state, site, update, report)
        state.accepted.append(site)
        return Verdict(True, "aggregated", norm, report, sealed.sha256)

    def _submit_masked(self, state: _RoundState, slot: SiteSlot, sealed: Sealed,
                       context: EnvelopeContext) -> Verdict:
        """Secure aggregation: open the envelope (the site's signature, its report), hand the
        masked input to the protocol; the update itself stays masked."""
        from cleanroom.protocol.payload import open_masked_update

        try:
            if state.failure is not None:
                raise UpdateRejected(f"secure aggregation failed: {state.failure}")
            masked, report = open_masked_update(sealed, state.keys, context, slot.update_signer)
            check_train_report(report, self.plan, slot.dataset_rows)
            if masked.site != slot.site:
                raise UpdateRejected(f"the masked input names site {masked.site!r}")
            state.secagg.receive_masked_input(masked)
        except CleanroomError as exc:
            return Verdict(False, f"update rejected: {exc}", ciphertext_sha256=sealed.sha256)
        state.reports[slot.site] = report
        state.accepted.append(slot.site)
        return Verdict(True, "masked input received", None, report, sealed.sha256)

    # ------------------------------------------------------------------ secure aggregation
    def secagg_begin(self, round: int, roster: Mapping[str, tuple[bytes, bytes]]) -> bytes:
        """Secure aggregation for the round's admitted sites (their attested channel and mask
        keys): the parameters (coordinate clip from the plan's update bound, weights up to the
        largest attested row count, or 1 under central DP) and the share-keys request every
        site gets. The round then releases only the unmasked sum's mean."""
        from cleanroom.protocol.secagg import AggregatorSecAgg, make_params
        from cleanroom.protocol.secagg_wire import RosterEntry, encode

        state = self._state(round)
        if self.robust is not None:
            raise CleanroomError("secure aggregation gives only the sum; the strategy needs "
                                 "every update")
        unknown = set(roster) - set(state.slots)
        if unknown:
            raise CleanroomError(f"secure-aggregation roster names unadmitted sites "
                                 f"{sorted(unknown)[:5]}")
        entries = [RosterEntry(site=s, channel_key=c, mask_key=m)
                   for s, (c, m) in sorted(roster.items())]
        n_params = sum(int(v.size) for v in state.model.values())
        rows = [state.slots[s].dataset_rows for s in roster]
        state.clip = self._secagg_clip(rows, n_params)
        central = self.plan.central_clip is not None
        params = make_params(state.run_id, round, n_sites=len(entries), vector_length=n_params,
                             clip=state.clip, max_weight=1 if central else max(1, *rows))
        state.secagg = AggregatorSecAgg(params, entries)
        state.mode = "secagg"
        return encode(state.secagg.share_keys_request())

    def _secagg_clip(self, rows: list[int], n_params: int) -> float:
        """A coordinate range no honest site's delta leaves: the central clip, else the
        largest update bound of the roster (at the plan's own noise: a site with a smaller
        budget adds more noise, then a coordinate may clip, which it logs)."""
        plan = self.plan
        if plan.central_clip is not None:
            return plan.central_clip
        if not plan.dp.enabled:
            return plan.max_update_norm or 1.0
        if self._sigma is None:
            from cleanroom.privacy import calibrate_noise

            self._sigma = calibrate_noise(plan.dp.epsilon, plan.dp.delta, plan.sample_rate,
                                          plan.rounds * plan.local_steps)
        return max(update_bound(plan, noise_multiplier=self._sigma, n_examples=max(1, n),
                                n_params=n_params) for n in rows)

    def secagg_receive(self, round: int, site: str, stage: str, message: bytes) -> Verdict:
        """A site's share-keys, consistency or unmask reply (a bad one: the site drops)."""
        from cleanroom.protocol import secagg_wire as wire

        state = self._state(round)
        kinds = {"share-keys": (wire.ShareKeysResponse, "receive_share_keys"),
                 "consistency": (wire.ConsistencyResponse, "receive_consistency"),
                 "unmask": (wire.UnmaskResponse, "receive_unmask")}
        if state.secagg is None or stage not in kinds:
            return Verdict(False, f"secure aggregation: no stage {stage!r} this round")
        kind, method = kinds[stage]
        try:
            reply = wire.decode(kind, message)
            if reply.site != site:
                raise UpdateRejected(f"a {stage} reply for site {reply.site!r}")
            getattr(state.secagg, method)(reply)
        except CleanroomError as exc:
            return Verdict(False, f"secure aggregation ({stage}): {exc}")
        return Verdict(True, stage)

    def secagg_requests(self, round: int, stage: str) -> dict[str, bytes]:
        """Close the previous stage and ask the next of the sites still in: ``masked-input``,
        ``consistency`` or ``unmask``. Too few sites left: no requests, and the round will
        release no aggregate (its failure says why)."""
        from cleanroom.errors import SecAggError
        from cleanroom.protocol.secagg_wire import encode

        state = self._state(round)
        makers = {"masked-input": "masked_input_requests",
                  "consistency": "consistency_requests", "unmask": "unmask_requests"}
        if state.secagg is None or stage not in makers or state.failure is not None:
            return {}
        try:
            requests = getattr(state.secagg, makers[stage])()
        except SecAggError as exc:
            state.failure = f"{type(exc).__name__}: {exc}"
            log.error("round %d: secure aggregation failed at %s: %s", round, stage, exc)
            return {}
        return {site: encode(request) for site, request in requests.items()}

    def _secagg_result(self, state: _RoundState) -> Aggregate:
        """Unmask the sum; release model + mean delta (checked against the bound on the sum;
        with central DP, noised here)."""
        from cleanroom.errors import SecAggError
        from cleanroom.protocol.secagg import flatten_arrays

        info = {"threshold": state.secagg.params.threshold,
                "neighbours": state.secagg.params.neighbours,
                "clip": state.clip, "mod_bits": state.secagg.params.mod_bits}
        if state.failure is not None:
            return Aggregate(None, 0, (), failure=state.failure, secagg=info,
                             dropped=tuple(state.secagg.topology.sites))
        try:
            result = state.secagg.result()
        except SecAggError as exc:
            state.failure = f"{type(exc).__name__}: {exc}"
            return Aggregate(None, 0, (), failure=state.failure, secagg=info,
                             dropped=tuple(state.secagg.topology.sites))
        _, layout = flatten_arrays(state.model)
        n = len(result.survivors)
        if self.central_dp is not None:
            rng = np.random.default_rng()  # OS entropy
            noise = rng.normal(0.0, self.central_dp.noise_multiplier * self.central_dp.clip,
                               size=result.weighted_sum.shape)
            mean = (result.weighted_sum + noise) / max(1, n)
            self._central_steps += 1
        else:
            mean = result.mean()
        delta = layout.unflatten(mean)
        arrays = OrderedDict((k, (base + delta[k]).astype(base.dtype))
                             for k, base in state.model.items())
        if self.central_dp is None:
            try:  # the only check left on masked updates: on their mean
                validate_update(arrays, state.model, max_norm=state.clip * (1 + 1e-6))
            except CleanroomError as exc:
                state.failure = f"the unmasked mean fails validation: {exc}"
                return Aggregate(None, 0, (), failure=state.failure, secagg=info)
        reports = [state.reports[s] for s in result.survivors if s in state.reports]
        losses = [(r.train_loss, r.num_examples) for r in reports if r.train_loss is not None]
        weight = sum(w for _, w in losses)
        return Aggregate(arrays, sum(r.num_examples for r in reports), result.survivors,
                         central_epsilon=self.central_epsilon(),
                         train_loss=sum(v * w for v, w in losses) / weight if weight else None,
                         dropped=result.dropped, secagg=info)


    def _fold(self, state: _RoundState, site: str, update: Mapping[str, np.ndarray],
              report: TrainReport) -> None:
        state.examples += report.num_examples
        if report.train_loss is not None:
            state.loss_sum += report.train_loss * report.num_examples
            state.loss_weight += report.num_examples
        if state.mode == "collect":
            state.collected.append((site, OrderedDict((k, np.array(v)) for k, v in
                                                      update.items()), report))
            return
        if self.central_dp is not None:  # clip the delta (user-level sensitivity)
            norm = update_norm(update, state.model)
            scale = min(1.0, self.central_dp.clip / norm) if norm > 0 else 1.0
            for k, base in state.model.items():
                acc = state.clipped.setdefault(k, np.zeros(base.shape, np.float64))
                add_scaled(acc, update[k], scale)
                add_scaled(acc, base, -scale)
            state.weight += 1
            return
        weight = report.num_examples
        for name, value in update.items():  # chunked: no parameter-sized float64 temporary
            acc = state.total.setdefault(name, np.zeros(np.shape(value), np.float64))
            add_scaled(acc, value, weight)
        state.weight += weight

    def aggregate(self, round: int) -> Aggregate:
        """Release the round's aggregate: None if fewer than :data:`MIN_RELEASE` updates were
        accepted (one site's update alone never leaves the enclave: the operator's process
        could otherwise get it by passing on that site's update only)."""
        state = self._state(round)
        if state.mode == "secagg":
            return self._secagg_result(state)
        sites = tuple(state.accepted)
        if len(sites) < MIN_RELEASE:
            return Aggregate(None, 0, (), failure=(
                f"{len(sites)} update(s) accepted; the aggregator releases an aggregate of "
                f"at least {MIN_RELEASE}") if sites else None)
        if state.mode == "collect":
            return self._robust(state)
        if state.released:
            raise CleanroomError(f"the aggregate of round {round} was already released")
        state.released = True  # the sums are freed as the release is written
        if self.central_dp is not None:
            return self._central(state)
        arrays = OrderedDict((k, scaled(state.total.pop(k), 1.0 / max(1, state.weight),
                                        state.model[k].dtype)) for k in state.model)
        return Aggregate(arrays, state.examples, sites, train_loss=self._loss(state))

    @staticmethod
    def _loss(state: _RoundState) -> float | None:
        return state.loss_sum / state.loss_weight if state.loss_weight else None

    def _central(self, state: _RoundState) -> Aggregate:
        dp = self.central_dp
        assert dp is not None
        n = state.weight
        rng = np.random.default_rng()  # OS entropy: the noise must be unpredictable
        arrays = OrderedDict()
        for k, base in state.model.items():
            clipped = state.clipped.pop(k).reshape(-1)
            out = np.empty(base.shape, base.dtype)
            flat, src = out.reshape(-1), base.reshape(-1)
            for part in chunks(flat.size):  # chunked: no parameter-sized temporaries
                noise = rng.normal(0.0, dp.noise_multiplier * dp.clip,
                                   size=part.stop - part.start)
                flat[part] = src[part] + (clipped[part] + noise) / n
            arrays[k] = out
        self._central_steps += 1
        return Aggregate(arrays, state.examples, tuple(state.accepted),
                         central_epsilon=self.central_epsilon(), train_loss=self._loss(state))

    def _robust(self, state: _RoundState) -> Aggregate:
        """Run the robust strategy's aggregation on the plaintext updates, in here."""
        from cleanroom.protocol.flower import arrays_to_numpy, plain_train_reply, synthetic_reply

        replies = [synthetic_reply(plain_train_reply(update, report), "train", node + 1)
                   for node, (_site, update, report) in enumerate(state.collected)]
        arrays, _ = self.robust.aggregate_train(state.round, replies)

        out = None if arrays is None else OrderedDict(
            (k, np.asarray(v).astype(state.model[k].dtype))
            for k, v in arrays_to_numpy(arrays).items())
        return Aggregate(out, state.examples, tuple(state.accepted),
                         train_loss=self._loss(state))

    def central_epsilon(self) -> float | None:
        """User-level epsilon spent by the central noise so far (RDP, all sites each round)."""
        if self.central_dp is None or self._central_steps == 0:
            return None
        from cleanroom.privacy import epsilon_spent

        return epsilon_spent([(self.central_dp.noise_multiplier, 1.0, self._central_steps)],
                             self.central_dp.delta)

    # ------------------------------------------------------------------ evaluation
    def begin_evaluation(self, round: int, eval_digest: str) -> None:
        self._state(round).eval_digest = eval_digest

    def submit_metrics(self, round: int, site: str, sealed: Sealed) -> Verdict:
        state = self._state(round)
        slot = state.slots.get(site)
        if slot is None:
            return Verdict(False, f"evaluation refused: {site} was not admitted this round")
        context = EnvelopeContext("metrics", state.run_id, state.round, site, state.eval_digest)
        try:
            report = open_metrics(sealed, state.keys, context, slot.update_signer)
        except CleanroomError as exc:
            return Verdict(False, f"evaluation refused: {exc}")
        state.metrics[site] = report
        return Verdict(True, "evaluated")

    def release_metrics(self, round: int) -> ReleasedMetrics:
        """Per-site reports of the sites that share them; the weighted mean of all."""
        state = self._state(round)
        reports = state.metrics
        total = sum(r.num_examples for r in reports.values())
        ordered = [reports[site] for site in sorted(reports)]  # sums independent of arrival
        mean = metric_means(ordered, weighted=False)
        weighted = metric_means(ordered, weighted=True)
        return ReleasedMetrics({s: r for s, r in reports.items() if r.share},
                               mean, weighted, total, tuple(sorted(reports)))

    def end_round(self, round: int) -> None:
        """Forget the round: its key, the model, the sums."""
        self._rounds.pop(round, None)

    def public_key(self, round: int) -> bytes:
        return self._state(round).keys.public_bytes
