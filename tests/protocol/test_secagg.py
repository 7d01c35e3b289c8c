"""Secure aggregation end to end (sites and aggregator, messages through their wire encoding):
the sum is right with and without dropouts, below the threshold there is no sum, a single
masked vector says nothing about its update, and every refusal a site or the aggregator owes
is shown refusing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.errors import (
    SecAggConfigError,
    SecAggError,
    SecAggIntegrityError,
    SecAggMessageError,
    SecAggRefusal,
    SecAggStageError,
    SecAggThresholdError,
)
from cleanroom.protocol import secagg as sa
from cleanroom.protocol import secagg_wire as w

STAGES = ("share-keys", "masked-input", "consistency", "unmask")


def _wire(message):
    if isinstance(message, w.MaskedInput):
        return w.masked_input_from_parts(*w.masked_input_parts(message))
    return w.decode(type(message), w.encode(message))


class Harness:
    """N sites and an aggregator; ``drop[stage]`` are the sites that go silent from that
    stage on (they answer nothing at it or after)."""

    def __init__(self, n: int, d: int = 8, *, neighbours: int | None = None,
                 max_weight: int = 1, seed: int = 0, clip: float = 1.0,
                 levels: int = sa.DEFAULT_LEVELS, policy: sa.SitePolicy | None = None,
                 threshold: int | None = None) -> None:
        self.names = [f"site-{i:02d}" for i in range(n)]
        policy = policy or sa.SitePolicy(min_neighbours=neighbours)
        self.sites = {s: sa.SiteSecAgg(s, "run-1", 7, policy=policy) for s in self.names}
        self.params = sa.make_params("run-1", 7, n_sites=n, vector_length=d, clip=clip,
                                     max_weight=max_weight, neighbours=neighbours,
                                     levels=levels, threshold=threshold)
        roster = [self.sites[s].advertisement.roster_entry(s) for s in self.names]
        self.agg = sa.AggregatorSecAgg(self.params, roster)
        rng = np.random.default_rng(seed)
        self.updates = {s: rng.uniform(-clip, clip, d) for s in self.names}
        self.weights = {s: int(rng.integers(0 if max_weight > 1 else 1, max_weight + 1))
                        for s in self.names}
        self.silent: set[str] = set()

    def share_keys(self, drop=()):
        self.silent |= set(drop)
        request = self.agg.share_keys_request()
        for s in self.names:
            if s not in self.silent:
                self.agg.receive_share_keys(_wire(self.sites[s].share_keys(_wire(request))))
        return self.agg.masked_input_requests()

    def masked(self, requests, drop=()):
        self.silent |= set(drop)
        for s, request in requests.items():
            if s not in self.silent:
                reply = self.sites[s].masked_input(_wire(request), self.updates[s],
                                                   self.weights[s])
                self.agg.receive_masked_input(_wire(reply))
        return self.agg.consistency_requests()

    def consistency(self, requests, drop=()):
        self.silent |= set(drop)
        for s, request in requests.items():
            if s not in self.silent:
                self.agg.receive_consistency(_wire(self.sites[s].consistency(_wire(request))))
        return self.agg.unmask_requests()

    def unmask(self, requests, drop=()):
        self.silent |= set(drop)
        for s, request in requests.items():
            if s not in self.silent:
                self.agg.receive_unmask(_wire(self.sites[s].unmask(_wire(request))))
        return self.agg.result()

    def run(self, **drop):
        requests = self.share_keys(drop.get("share_keys", ()))
        requests = self.masked(requests, drop.get("masked", ()))
        requests = self.consistency(requests, drop.get("consistency", ()))
        return self.unmask(requests, drop.get("unmask", ()))

    def expected(self, survivors):
        return (sum(self.weights[s] * self.updates[s] for s in survivors),
                sum(self.weights[s] for s in survivors))

    def check(self, result, survivors):
        want, weight = self.expected(survivors)
        assert result.survivors == tuple(sorted(survivors))
        assert result.total_weight == weight
        bound = sa.quantization_error_bound(self.params, weight)
        assert np.all(np.abs(result.weighted_sum - want) <= bound), "beyond the stated bound"


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("n", [2, 3, 4, 20])
def test_sum_without_dropouts(n):
    h = Harness(n, max_weight=1000)
    h.check(h.run(), h.names)


@pytest.mark.parametrize("n,dropped", [(4, 1), (20, 1), (20, 3), (20, 6)])
def test_dropouts_after_masking_up_to_n_minus_t(n, dropped):
    """Sites that sent their masked input then went silent: their self masks are rebuilt from
    the others' shares and their inputs stay in the sum. n - t of them is exactly the
    threshold (t sites answer the unmask stage)."""
    h = Harness(n, max_weight=50)
    gone = h.names[1:1 + dropped]
    assert dropped <= n - h.params.threshold
    result = h.run(consistency=gone)
    h.check(result, h.names)
    assert result.dropped == ()


def test_exactly_at_threshold_succeeds_and_one_below_fails_typed():
    h = Harness(20)
    t = h.params.threshold
    at = h.run(unmask=h.names[: 20 - t])  # t sites reveal shares
    h.check(at, h.names)
    below = Harness(20)
    requests = below.masked(below.share_keys())
    requests = below.consistency(requests)
    with pytest.raises(SecAggThresholdError):
        below.unmask(requests, drop=below.names[: 20 - t + 1])
    assert below.agg.stage == "failed"


def test_too_few_confirmations_fail_before_anyone_reveals():
    h = Harness(4)
    requests = h.masked(h.share_keys())
    with pytest.raises(SecAggThresholdError):
        h.consistency(requests, drop=h.names[:2])


@pytest.mark.parametrize("n,stage", [(4, "share_keys"), (4, "masked"), (20, "masked"),
                                     (20, "share_keys")])
def test_dropouts_before_masking_leave_them_out_of_the_sum(n, stage):
    h = Harness(n)
    gone = h.names[-(n - h.params.threshold):]
    result = h.run(**{stage: gone})
    survivors = [s for s in h.names if s not in gone]
    h.check(result, survivors)
    assert result.dropped == tuple(sorted(gone))


def test_dropouts_at_every_stage_in_one_round():
    h = Harness(20, max_weight=7)
    result = h.run(share_keys=["site-00"], masked=["site-01", "site-02"],
                   consistency=["site-03"], unmask=["site-04"])
    h.check(result, [s for s in h.names if s not in ("site-00", "site-01", "site-02")])


@pytest.mark.parametrize("n,k,drops", [(20, 7, 1), (30, 11, 2), (41, 9, 0)])
def test_ring_topology(n, k, drops):
    h = Harness(n, neighbours=k)
    assert all(len(h.agg.topology.neighbourhood(s)) == k for s in h.names)
    # drop sites that are far apart on the ring so no neighbourhood loses more than k - t
    gone = h.names[:: n // max(drops, 1)][:drops]
    result = h.run(consistency=gone, masked=())
    h.check(result, h.names)


def test_ring_dropout_before_masking():
    h = Harness(20, neighbours=7)
    result = h.run(masked=["site-05"])
    h.check(result, [s for s in h.names if s != "site-05"])


def test_a_site_sharing_with_too_few_neighbours_is_left_out():
    """site-05 seals its shares to only 3 of its 6 ring neighbours (t = 5): its secrets could
    not be rebuilt, so the aggregator leaves it out before anyone masks with it."""
    h = Harness(20, neighbours=7)
    request = h.agg.share_keys_request()
    for s in h.names:
        reply = h.sites[s].share_keys(request)
        if s == "site-05":
            few = reply.sealed[:3]
            keep = {x.peer for x in few} | {s}
            reply = reply.model_copy(update={
                "sealed": few, "commitments": [c for c in reply.commitments if c.holder in keep]})
        h.agg.receive_share_keys(reply)
    requests = h.agg.masked_input_requests()
    assert "site-05" not in requests
    assert all(x.peer != "site-05" for r in requests.values() for x in r.sealed)
    result = h.unmask(h.consistency(h.masked(requests)))
    h.check(result, [s for s in h.names if s != "site-05"])


def test_too_few_sites_sharing_keys_fails_typed():
    h = Harness(4)
    with pytest.raises(SecAggThresholdError):
        h.share_keys(drop=["site-02", "site-03"])
    assert h.agg.stage == "failed"
    with pytest.raises(SecAggStageError):
        h.agg.consistency_requests()


def test_sixty_four_bit_modulus_and_clipping():
    h = Harness(20, max_weight=100_000, clip=0.5)
    assert h.params.mod_bits == 64
    h.updates["site-00"] = np.full(8, 3.0)  # clipped to 0.5
    h.updates["site-01"] = np.full(8, -3.0)
    result = h.run()
    h.updates["site-00"], h.updates["site-01"] = np.full(8, 0.5), np.full(8, -0.5)
    h.check(result, h.names)


def test_zero_weights_and_the_mean():
    h = Harness(3, max_weight=10)
    h.weights = {s: 0 for s in h.names}
    result = h.run()
    assert result.total_weight == 0 and np.allclose(result.weighted_sum, 0)
    with pytest.raises(SecAggIntegrityError):
        result.mean()
    h2 = Harness(3, max_weight=10)
    result = h2.run()
    want, weight = h2.expected(h2.names)
    assert np.allclose(result.mean(), want / weight, atol=h2.params.clip / h2.params.levels)


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.integers(0, n - 1), max_size=n - sa.default_threshold(n)))),
    st.integers(0, 2**31), st.integers(1, 2**16))
def test_property_sum_matches_for_any_dropout_set(n_gone, seed, max_weight):
    n, gone_idx = n_gone
    h = Harness(n, d=5, seed=seed, max_weight=max_weight)
    gone = [h.names[i] for i in sorted(gone_idx)]
    h.check(h.run(consistency=gone), h.names)


# ----------------------------------------------------------------------------- privacy


def _masked_vector(update, seed=0):
    h = Harness(4, d=len(update), seed=seed)
    h.updates["site-00"] = update
    requests = h.share_keys()
    reply = h.sites["site-00"].masked_input(requests["site-00"], update, 1)
    return np.frombuffer(reply.vector, dtype="<u4")


def test_a_masked_vector_is_uniform_whatever_the_update():
    for update in (np.zeros(40_000), np.full(40_000, 1.0), np.full(40_000, -1.0)):
        values = _masked_vector(update)
        counts = np.bincount(values >> 28, minlength=16)
        expected = len(values) / 16
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_masked_vectors_do_not_reveal_update_differences():
    a, b = np.zeros(1000), np.full(1000, 0.5)
    ya, yb = _masked_vector(a).astype(np.int64), _masked_vector(b).astype(np.int64)
    step = 0.5 * sa.DEFAULT_LEVELS  # what q(b) - q(a) would be in clear
    diff = (yb - ya) % 2**32
    assert np.count_nonzero(diff == step) < 5
    assert len(np.unique(diff)) > 990  # not a constant offset either


def test_the_aggregator_view_of_one_site_without_its_self_mask_is_still_masked():
    """Even the pairwise masks alone hide the update: subtracting nothing from one vector
    leaves it far from the quantized update."""
    update = np.full(1000, 0.25)
    y = _masked_vector(update)
    q = int(0.25 * sa.DEFAULT_LEVELS)
    assert np.count_nonzero(np.abs(y.astype(np.int64) - q) < 2) < 5


# ----------------------------------------------------------------------------- site refusals


def _at_unmask(n=4):
    h = Harness(n)
    requests = h.consistency(h.masked(h.share_keys()))
    return h, requests


def test_site_refuses_to_reveal_both_shares_of_one_peer():
    h, requests = _at_unmask()
    request = requests["site-01"]
    greedy = request.model_copy(update={"reveal_mask_key": ["site-02"]})
    with pytest.raises(SecAggRefusal) as err:
        h.sites["site-01"].unmask(greedy)
    assert err.value.code == "double-reveal"
    assert h.sites["site-01"].stage == "aborted"
    with pytest.raises(SecAggStageError):  # and it answers nothing more this round
        h.sites["site-01"].unmask(request)


def test_site_refuses_the_mask_key_of_a_survivor_or_the_seed_of_a_dropped_site():
    h, requests = _at_unmask()
    request = requests["site-01"]
    with pytest.raises(SecAggRefusal) as err:
        h.sites["site-01"].unmask(request.model_copy(update={
            "reveal_self_mask": ["site-00", "site-01", "site-03"],
            "reveal_mask_key": ["site-02"]}))
    assert err.value.code == "reveals-survivor-key"
    h, requests = _at_unmask()
    with pytest.raises(SecAggRefusal) as err:  # a site outside the survivor set
        h2 = Harness(4)
        reqs = h2.masked(h2.share_keys(), drop=["site-03"])
        reqs = h2.consistency(reqs)
        h2.sites["site-01"].unmask(reqs["site-01"].model_copy(update={
            "reveal_self_mask": ["site-00", "site-01", "site-03"], "reveal_mask_key": []}))
    assert err.value.code == "inconsistent-survivors"


def test_site_refuses_unmask_without_enough_confirmations():
    h, requests = _at_unmask()
    request = requests["site-01"]
    forged = [w.PeerTag(peer=t.peer, tag=bytes(32)) for t in request.tags]
    with pytest.raises(SecAggRefusal) as err:
        h.sites["site-01"].unmask(request.model_copy(update={"tags": forged}))
    assert err.value.code == "unconfirmed-survivors"
    h, requests = _at_unmask()
    with pytest.raises(SecAggRefusal):
        h.sites["site-01"].unmask(requests["site-01"].model_copy(update={"tags": []}))


def test_equivocating_survivor_sets_are_caught_by_the_tags():
    """The aggregator shows one half of the sites a survivor set without site-03 and the other
    half a set without site-02 (hoping to get site-03's mask key from the first group and its
    self-mask seed from the second): the tags of the other group do not verify."""
    h = Harness(6)  # t = 5
    requests = h.masked(h.share_keys())
    everyone = sorted(requests)
    views = {s: [x for x in everyone if x != ("site-03" if s < "site-03" else "site-02")]
             for s in everyone}
    replies = {}
    for s in everyone:
        if s in views[s]:
            replies[s] = h.sites[s].consistency(requests[s].model_copy(
                update={"survivors": views[s]}))
    for s, reply in replies.items():
        h.agg._tags[s] = {t.peer: t.tag for t in reply.tags}  # a dishonest relay
    agg_requests = {s: w.UnmaskRequest(
        run_id="run-1", round=7, site=s,
        tags=[w.PeerTag(peer=o, tag=h.agg._tags[o][s]) for o in replies
              if o != s and s in h.agg._tags[o]],
        reveal_self_mask=[], reveal_mask_key=[]) for s in replies}
    refused = 0
    for s, request in agg_requests.items():
        try:
            h.sites[s].unmask(request)
        except SecAggRefusal as err:
            assert err.code == "unconfirmed-survivors"
            refused += 1
    assert refused == len(agg_requests)


@pytest.mark.parametrize("survivors,code", [
    (["site-00", "site-02", "site-03"], "not-a-survivor"),
    (["site-01", "site-02"], "below-threshold"),
])
def test_site_refuses_a_survivor_set_that_would_expose_it(survivors, code):
    h = Harness(4)
    requests = h.masked(h.share_keys())
    with pytest.raises(SecAggRefusal) as err:
        h.sites["site-01"].consistency(requests["site-01"].model_copy(
            update={"survivors": survivors}))
    assert err.value.code == code


def test_site_refuses_a_survivor_it_did_not_mask_with():
    h = Harness(4)
    requests = h.share_keys()
    # site-01 gets no shares from site-03, so it does not mask with it ...
    trimmed = requests["site-01"].model_copy(update={
        "sealed": [x for x in requests["site-01"].sealed if x.peer != "site-03"]})
    h.sites["site-01"].masked_input(trimmed, h.updates["site-01"], 1)
    with pytest.raises(SecAggRefusal) as err:  # ... and must not be told it survived
        h.sites["site-01"].consistency(w.ConsistencyRequest(
            run_id="run-1", round=7, site="site-01", survivors=h.names))
    assert err.value.code == "inconsistent-survivors"


def test_site_refuses_to_mask_with_too_few_peers():
    h = Harness(4)
    requests = h.share_keys()
    alone = requests["site-00"].model_copy(update={"sealed": requests["site-00"].sealed[:1]})
    with pytest.raises(SecAggRefusal) as err:
        h.sites["site-00"].masked_input(alone, h.updates["site-00"], 1)
    assert err.value.code == "too-few-peers"


@pytest.mark.parametrize("policy,kwargs", [
    (sa.SitePolicy(), {"neighbours": 7}),  # a ring at 20 sites: below the default
    (sa.SitePolicy(min_neighbours=7), {"neighbours": 7, "threshold": 4}),  # t < floor(2k/3)+1
])
def test_site_refuses_weak_parameters(policy, kwargs):
    names = [f"s{i}" for i in range(20)]
    sites = {s: sa.SiteSecAgg(s, "r", 1, policy=policy) for s in names}
    params = sa.make_params("r", 1, n_sites=20, vector_length=3, clip=1.0, **kwargs)
    agg = sa.AggregatorSecAgg(params, [sites[s].advertisement.roster_entry(s) for s in names])
    with pytest.raises(SecAggRefusal) as err:
        sites["s0"].share_keys(agg.share_keys_request())
    assert err.value.code == "weak-parameters"


def test_site_refuses_params_the_aggregator_forged():
    h = Harness(4)
    request = h.agg.share_keys_request()
    weak = request.params.model_copy(update={"threshold": 2})
    with pytest.raises(SecAggConfigError):
        h.sites["site-00"].share_keys(request.model_copy(update={"params": weak}))


# ----------------------------------------------------------------------------- malformed input


def _request(h):
    return h.agg.share_keys_request()


def test_roster_with_duplicate_sites_or_keys_is_refused():
    h = Harness(3)
    request = _request(h)
    roster = list(request.roster)
    dup = request.model_copy(update={"roster": [*roster, roster[0]]})
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].share_keys(dup)
    assert err.value.code == "duplicate-site"
    h = Harness(3)
    roster = list(_request(h).roster)
    same_key = roster[2].model_copy(update={"mask_key": roster[1].mask_key})
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].share_keys(_request(h).model_copy(
            update={"roster": [*roster[:2], same_key]}))
    assert err.value.code == "duplicate-key"
    with pytest.raises(SecAggMessageError):  # and the aggregator refuses to start with it
        sa.AggregatorSecAgg(h.params, [*roster, roster[0]])


def test_roster_that_swaps_a_sites_keys_is_refused():
    h = Harness(3)
    request = _request(h)
    other = sa.SecAggKeys.generate().advertisement.roster_entry("site-00")
    swapped = [other if e.site == "site-00" else e for e in request.roster]
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].share_keys(request.model_copy(update={"roster": swapped}))
    assert err.value.code == "roster-key-mismatch"
    h = Harness(3)
    renamed = [e.model_copy(update={"site": "site-99"}) if e.site == "site-00" else e
               for e in _request(h).roster]
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].share_keys(_request(h).model_copy(update={"roster": renamed}))
    assert err.value.code == "roster-key-mismatch"


def test_messages_for_another_run_round_or_site_are_refused():
    h = Harness(3)
    request = _request(h)
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].share_keys(request.model_copy(update={"round": 8}))
    assert err.value.code == "wrong-round"
    h = Harness(3)
    requests = h.share_keys()
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].masked_input(requests["site-01"], h.updates["site-00"], 1)
    assert err.value.code == "wrong-site"
    h = Harness(3)
    reply = h.sites["site-00"].share_keys(_request(h))
    with pytest.raises(SecAggMessageError):
        h.agg.receive_share_keys(reply.model_copy(update={"run_id": "run-2"}))
    with pytest.raises(SecAggMessageError):
        h.agg.receive_share_keys(w.MaskedInputRequest(run_id="run-1", round=7, site="site-00",
                                                      sealed=[]))  # type: ignore[arg-type]


def test_wrong_stage_order_is_refused_on_both_sides():
    h = Harness(3)
    with pytest.raises(SecAggStageError):
        h.sites["site-00"].unmask(w.UnmaskRequest(run_id="run-1", round=7, site="site-00",
                                                  tags=[], reveal_self_mask=[],
                                                  reveal_mask_key=[]))
    assert h.sites["site-00"].stage == "aborted"
    h = Harness(3)
    request = _request(h)
    h.sites["site-00"].share_keys(request)
    with pytest.raises(SecAggStageError):  # the same stage twice
        h.sites["site-00"].share_keys(request)
    for call in (h.agg.consistency_requests, h.agg.unmask_requests, h.agg.result):
        with pytest.raises(SecAggStageError):
            call()
    with pytest.raises(SecAggStageError):
        h.agg.receive_consistency(w.ConsistencyResponse(run_id="run-1", round=7,
                                                        site="site-00", tags=[]))


def test_duplicate_and_unexpected_replies_are_refused():
    h = Harness(3)
    request = _request(h)
    reply = h.sites["site-00"].share_keys(request)
    h.agg.receive_share_keys(reply)
    with pytest.raises(SecAggMessageError) as err:
        h.agg.receive_share_keys(reply)
    assert err.value.code == "duplicate-site"
    stranger = reply.model_copy(update={"site": "site-99"})
    with pytest.raises(SecAggMessageError) as err:
        h.agg.receive_share_keys(stranger)
    assert err.value.code == "unknown-site"


def test_shares_for_unknown_sites_are_refused():
    h = Harness(3)
    request = _request(h)
    reply = h.sites["site-00"].share_keys(request)
    stray = w.SealedShares(peer="site-99", ciphertext=reply.sealed[0].ciphertext)
    with pytest.raises(SecAggMessageError) as err:
        h.agg.receive_share_keys(reply.model_copy(update={"sealed": [*reply.sealed, stray]}))
    assert err.value.code == "unknown-site"
    with pytest.raises(SecAggMessageError) as err:  # commitments for other holders
        h.agg.receive_share_keys(reply.model_copy(update={"commitments": reply.commitments[:1]}))
    assert err.value.code == "commitment-mismatch"
    with pytest.raises(SecAggMessageError):  # shares sealed to itself
        h.agg.receive_share_keys(reply.model_copy(update={"sealed": [
            w.SealedShares(peer="site-00", ciphertext=reply.sealed[0].ciphertext)]}))
    h = Harness(3)
    requests = h.share_keys()
    bad = requests["site-00"].model_copy(update={"sealed": [
        *requests["site-00"].sealed,
        w.SealedShares(peer="site-77", ciphertext=requests["site-00"].sealed[0].ciphertext)]})
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].masked_input(bad, h.updates["site-00"], 1)
    assert err.value.code == "unknown-site"
    h, requests = _at_unmask()
    with pytest.raises(SecAggMessageError) as err:  # asked for shares it never got
        h.sites["site-01"].unmask(requests["site-01"].model_copy(
            update={"reveal_self_mask": [*requests["site-01"].reveal_self_mask, "site-77"]}))
    assert err.value.code == "unknown-site"


def test_duplicated_entries_in_requests_are_refused():
    h = Harness(3)
    requests = h.share_keys()
    r = requests["site-00"]
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].masked_input(r.model_copy(update={"sealed": [*r.sealed, r.sealed[0]]}),
                                        h.updates["site-00"], 1)
    assert err.value.code == "duplicate-site"
    h, requests = _at_unmask()
    r = requests["site-01"]
    with pytest.raises(SecAggMessageError):
        h.sites["site-01"].unmask(r.model_copy(update={"tags": [*r.tags, r.tags[0]]}))


def test_aggregator_refuses_bad_masked_inputs():
    h = Harness(3)
    requests = h.share_keys()
    reply = h.sites["site-00"].masked_input(requests["site-00"], h.updates["site-00"], 1)
    for bad, code in [
        (reply.model_copy(update={"vector": reply.vector[:-1]}), "bad-vector"),
        (reply.model_copy(update={"mask_peers": ["site-01", "site-77"]}), "unknown-site"),
        (reply.model_copy(update={"mask_peers": ["site-01", "site-01"]}), "duplicate-site"),
        (reply.model_copy(update={"mask_peers": []}), "too-few-peers"),
    ]:
        with pytest.raises(SecAggMessageError) as err:
            h.agg.receive_masked_input(bad)
        assert err.value.code == code
    h.agg.receive_masked_input(reply)


@pytest.mark.parametrize("update,weight,code", [
    (np.array([np.nan] * 8), 1, "bad-update"),
    (np.zeros(7), 1, "bad-update"),
    (np.zeros((2, 4)), 1, "bad-update"),
    (np.array(["a"] * 8), 1, "bad-update"),
    (np.zeros(8), 2, "bad-weight"),
    (np.zeros(8), -1, "bad-weight"),
    (np.zeros(8), True, "bad-weight"),
    (np.zeros(8), 1.0, "bad-weight"),
])
def test_site_refuses_a_bad_update_or_weight(update, weight, code):
    h = Harness(3)
    requests = h.share_keys()
    with pytest.raises(SecAggMessageError) as err:
        h.sites["site-00"].masked_input(requests["site-00"], update, weight)
    assert err.value.code == code


# ----------------------------------------------------------------------------- tampering


def test_shares_that_do_not_open_count_as_a_dropout():
    """The relay flips a byte of site-02's shares to site-00: site-00 does not mask with
    site-02, the aggregator drops site-02 from the survivors, and the round completes
    without it (site-02's mask key is rebuilt from the five other holders: t = 5)."""
    h = Harness(7)
    requests = h.share_keys()
    r = requests["site-00"]
    sealed = []
    for x in r.sealed:
        if x.peer == "site-02":
            flipped = bytearray(x.ciphertext)
            flipped[30] ^= 1
            x = w.SealedShares(peer=x.peer, ciphertext=bytes(flipped))
        sealed.append(x)
    requests["site-00"] = r.model_copy(update={"sealed": sealed})
    result = h.unmask(h.consistency(h.masked(requests)))
    h.check(result, [s for s in h.names if s != "site-02"])
    assert result.dropped == ("site-02",)


@pytest.mark.parametrize("attack", ["relabelled", "other-round"])
def test_redirected_or_replayed_shares_do_not_open(attack):
    """The relay passes site-02's shares off as site-03's, or replays site-03's shares from
    another round: the AEAD context (run, round, sender, receiver) does not match, so site-00
    treats site-03 as dropped and the round completes without it."""
    h = Harness(7)
    requests = h.share_keys()
    r = requests["site-00"]
    if attack == "relabelled":
        from_02 = next(x.ciphertext for x in r.sealed if x.peer == "site-02")
        fake = from_02
    else:
        # the same keys in round 6 (keys are per round; this isolates the round binding)
        old = {s: sa.SiteSecAgg(s, "run-1", 6, keys=h.sites[s]._keys) for s in h.names}
        params = h.params.model_copy(update={"round": 6})
        old_agg = sa.AggregatorSecAgg(params, [old[s].advertisement.roster_entry(s)
                                               for s in h.names])
        reply = old["site-03"].share_keys(old_agg.share_keys_request())
        fake = next(x.ciphertext for x in reply.sealed if x.peer == "site-00")
    sealed = [w.SealedShares(peer=x.peer, ciphertext=fake) if x.peer == "site-03" else x
              for x in r.sealed]
    requests["site-00"] = r.model_copy(update={"sealed": sealed})
    result = h.unmask(h.consistency(h.masked(requests)))
    assert result.dropped == ("site-03",)
    h.check(result, [s for s in h.names if s != "site-03"])


def test_a_corrupted_revealed_share_is_refused_and_the_others_suffice():
    h = Harness(5)
    requests = h.consistency(h.masked(h.share_keys()))
    first = True
    for s, request in requests.items():
        reply = h.sites[s].unmask(request)
        if first:
            bad = w.RevealedShare(owner=reply.self_mask_shares[0].owner, share=bytes(66))
            with pytest.raises(SecAggIntegrityError) as err:
                h.agg.receive_unmask(reply.model_copy(update={
                    "self_mask_shares": [bad, *reply.self_mask_shares[1:]]}))
            assert err.value.code == "bad-share"
            first = False
            continue
        h.agg.receive_unmask(reply)
    h.check(h.agg.result(), h.names)


def test_revealing_other_shares_than_asked_is_refused():
    h, requests = _at_unmask()
    reply = h.sites["site-01"].unmask(requests["site-01"])
    with pytest.raises(SecAggMessageError):
        h.agg.receive_unmask(reply.model_copy(update={
            "self_mask_shares": reply.self_mask_shares[:-1]}))
    with pytest.raises(SecAggMessageError):
        h.agg.receive_unmask(reply.model_copy(update={
            "mask_key_shares": reply.self_mask_shares[:1]}))


def test_a_dishonest_dealer_gives_a_typed_failure_not_a_wrong_sum(monkeypatch):
    """site-03 deals its self-mask seed inconsistently (one holder's share is off the
    polynomial, with a matching commitment): the rebuilt seed fails its commitment."""
    h = Harness(4)
    real = sa.split_secret
    calls = []

    def crooked(secret, threshold, xs):
        shares = real(secret, threshold, xs)
        calls.append(1)
        if len(calls) == 7:  # site-03's seed (two secrets per site, sites in order)
            shares[min(xs)] = (12345).to_bytes(66, "big")
        return shares

    monkeypatch.setattr(sa, "split_secret", crooked)
    requests = h.consistency(h.masked(h.share_keys()))
    with pytest.raises(SecAggIntegrityError) as err:
        h.unmask(requests)
    assert err.value.code == "bad-reconstruction"
    assert h.agg.stage == "failed"


def test_an_out_of_range_masked_input_gives_a_typed_failure():
    h = Harness(4, d=16)
    requests = h.share_keys()
    for s, request in requests.items():
        reply = h.sites[s].masked_input(request, h.updates[s], 1)
        if s == "site-02":
            garbage = np.random.default_rng(5).integers(0, 2**32, 17, dtype=np.uint64)
            reply = reply.model_copy(update={"vector": garbage.astype("<u4").tobytes()})
        h.agg.receive_masked_input(reply)
    requests = h.consistency(h.agg.consistency_requests())
    with pytest.raises(SecAggIntegrityError) as err:
        h.unmask(requests)
    assert err.value.code == "sum-out-of-range"


def test_errors_are_typed_cleanroom_errors():
    from cleanroom.errors import CleanroomError, ProtocolError

    for cls in (SecAggConfigError, SecAggStageError, SecAggMessageError, SecAggRefusal,
                SecAggThresholdError, SecAggIntegrityError):
        assert issubclass(cls, SecAggError) and issubclass(cls, ProtocolError)
        assert issubclass(cls, CleanroomError)
        assert cls("x").code.startswith("secagg")


# ----------------------------------------------------------------------------- keys, arrays


def test_advertisement_digest_binds_both_keys():
    keys = sa.SecAggKeys.generate()
    advert = keys.advertisement
    assert len(advert.digest()) == 32
    other = dataclasses.replace(advert, mask_key=sa.SecAggKeys.generate().advertisement.mask_key)
    assert other.digest() != advert.digest()
    assert advert.channel_key != advert.mask_key


def test_flatten_and_unflatten_arrays():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}
    vector, layout = sa.flatten_arrays(arrays)
    assert vector.shape == (8,) and layout.size == 8
    back = layout.unflatten(vector)
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], arrays["w"])
    with pytest.raises(SecAggMessageError):
        layout.unflatten(np.zeros(7))
