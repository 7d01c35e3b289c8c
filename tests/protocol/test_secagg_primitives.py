"""Secure-aggregation building blocks: Shamir, masks, quantization, the graph, the parameters."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.errors import SecAggConfigError, SecAggIntegrityError, SecAggMessageError
from cleanroom.protocol import secagg_primitives as prim
from cleanroom.protocol.secagg import check_params, default_neighbours, make_params

# ----------------------------------------------------------------------------- Shamir


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
       st.binary(min_size=32, max_size=32), st.randoms(use_true_random=False))
def test_any_threshold_shares_rebuild_the_secret(n_t, secret, rnd):
    n, t = n_t
    xs = rnd.sample(range(1, 1001), n)
    shares = prim.split_secret(secret, t, xs)
    subset = dict(rnd.sample(sorted(shares.items()), t))
    assert prim.combine_shares(subset, t) == secret


def test_fewer_than_threshold_shares_are_refused():
    shares = prim.split_secret(os.urandom(32), 3, [1, 2, 3, 4])
    with pytest.raises(SecAggIntegrityError):
        prim.combine_shares({1: shares[1], 2: shares[2]}, 3)


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32])
def test_fewer_than_threshold_shares_look_uniform_whatever_the_secret(secret):
    """With t = 2 one share is secret + a*x for a uniform a: its distribution must not depend
    on the secret (top four bits of 3000 shares, chi-square over 16 buckets)."""
    tops = [int.from_bytes(prim.split_secret(secret, 2, [1, 2])[1], "big") >> 517
            for _ in range(3000)]
    counts = np.bincount(tops, minlength=16)
    chi2 = float(((counts - 3000 / 16) ** 2 / (3000 / 16)).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_a_corrupted_share_never_rebuilds_the_secret():
    secret = os.urandom(32)
    shares = prim.split_secret(secret, 3, [1, 2, 3, 4])
    bad = bytearray(shares[2])
    bad[-1] ^= 1
    with contextlib.suppress(SecAggIntegrityError):  # or it is not even a 32-byte value
        assert prim.combine_shares({1: shares[1], 2: bytes(bad), 3: shares[3]}, 3) != secret


@pytest.mark.parametrize("share", [b"\x00" * 65, b"\xff" * 66])
def test_malformed_shares_are_refused(share):
    shares = prim.split_secret(os.urandom(32), 2, [1, 2])
    with pytest.raises(SecAggIntegrityError):
        prim.combine_shares({1: shares[1], 2: share}, 2)


@pytest.mark.parametrize("secret,t,xs", [(b"x" * 31, 2, [1, 2]), (b"x" * 32, 3, [1, 2]),
                                         (b"x" * 32, 2, [1, 1]), (b"x" * 32, 2, [0, 1]),
                                         (b"x" * 32, 0, [1, 2])])
def test_split_refuses_bad_arguments(secret, t, xs):
    with pytest.raises(SecAggConfigError):
        prim.split_secret(secret, t, xs)


# ----------------------------------------------------------------------------- masks, channels


def test_mask_streams_are_deterministic_per_key_and_distinct_across_keys():
    key = os.urandom(32)
    a = prim.mask_stream(key, 1000, 64)
    assert a.dtype == np.dtype("<u8") and a.shape == (1000,)
    assert np.array_equal(a, prim.mask_stream(key, 1000, 64))
    assert not np.array_equal(a, prim.mask_stream(os.urandom(32), 1000, 64))
    assert prim.mask_stream(key, 10, 32).dtype == np.dtype("<u4")
    with pytest.raises(SecAggConfigError):
        prim.mask_stream(key, 10, 16)


def test_mask_stream_is_uniform():
    values = prim.mask_stream(os.urandom(32), 64_000, 32)
    counts = np.bincount(values >> 28, minlength=16)  # top four bits: 16 buckets
    expected = len(values) / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_sealed_shares_open_only_in_their_context():
    key, info = os.urandom(32), b"ctx"
    sealed = prim.seal_shares(key, b"secret shares", info)
    assert prim.open_shares(key, sealed, info) == b"secret shares"
    assert prim.open_shares(key, sealed, b"other ctx") is None
    assert prim.open_shares(os.urandom(32), sealed, info) is None
    tampered = bytearray(sealed)
    tampered[20] ^= 1
    assert prim.open_shares(key, bytes(tampered), info) is None
    assert prim.open_shares(key, sealed[:10], info) is None


def test_tags_verify_only_for_the_same_message_and_key():
    key = os.urandom(32)
    tag = prim.mac(key, b"survivors")
    assert prim.mac_ok(key, b"survivors", tag)
    assert not prim.mac_ok(key, b"survivors'", tag)
    assert not prim.mac_ok(os.urandom(32), b"survivors", tag)


def test_length_prefixing_is_unambiguous():
    assert prim.length_prefixed("ab", "c") != prim.length_prefixed("a", "bc")
    assert prim.digest("ab", "c") != prim.digest("a", "bc")
    assert prim.round_context("run", 1) != prim.round_context("run", 2)


# ----------------------------------------------------------------------------- quantization


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=50), st.floats(0.01, 5),
       st.integers(1, 2**24), st.integers(0, 2**32 - 1))
def test_quantization_error_is_below_one_step(values, clip, levels, seed):
    update = np.array(values)
    q = prim.quantize(update, clip, levels, np.random.default_rng(seed))
    assert q.dtype == np.int64 and np.all(np.abs(q) <= levels)
    err = np.abs(prim.dequantize(q, clip, levels) - np.clip(update, -clip, clip))
    assert np.all(err <= clip / levels * (1 + 1e-9))


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    update = np.full(200_000, 0.3)
    q = prim.quantize(update, 1.0, 4, rng)  # 0.3 * 4 = 1.2 steps: 1 or 2
    assert set(np.unique(q)) == {1, 2}
    assert abs(prim.dequantize(q, 1.0, 4).mean() - 0.3) < 0.002


# ----------------------------------------------------------------------------- graph, threshold


def test_full_graph_and_ring():
    sites = [f"s{i}" for i in range(11)]
    full = prim.neighbourhoods(sites, 11, b"seed")
    assert all(v == frozenset(sites) for v in full.values())
    ring = prim.neighbourhoods(sites, 5, b"seed")
    assert all(len(v) == 5 and s in v for s, v in ring.items())
    assert all((a in ring[b]) == (b in ring[a]) for a in sites for b in sites)  # symmetric
    assert ring != prim.neighbourhoods(sites, 5, b"other seed")
    for bad in (4, 1, 12, 11 + 2):
        with pytest.raises(SecAggConfigError):
            prim.neighbourhoods(sites, bad, b"seed")


def test_threshold_and_neighbourhood_defaults():
    assert [prim.default_threshold(k) for k in (2, 3, 4, 5, 20, 117)] == [2, 3, 3, 4, 14, 79]
    assert [default_neighbours(n) for n in (2, 4, 20, 100)] == [2, 4, 20, 100]
    assert default_neighbours(1000) == prim.recommended_neighbours(1000) == 117
    assert prim.recommended_neighbours(4) == 4
    with pytest.raises(SecAggMessageError):
        prim.check_site_list(["a", "b", "a"], "roster")


def test_make_params_picks_the_modulus_and_refuses_wrapping():
    assert make_params("r", 1, n_sites=4, vector_length=5, clip=1.0).mod_bits == 32
    big = make_params("r", 1, n_sites=1000, vector_length=5, clip=1.0, max_weight=1000)
    assert (big.mod_bits, big.neighbours, big.threshold) == (64, 117, 79)
    with pytest.raises(SecAggConfigError, match="64-bit"):
        make_params("r", 1, n_sites=20, vector_length=5, clip=1.0, max_weight=2**32,
                    levels=2**30)
    with pytest.raises(SecAggConfigError, match="wrap"):
        make_params("r", 1, n_sites=20, vector_length=5, clip=1.0, max_weight=2**20,
                    mod_bits=32)


@pytest.mark.parametrize("kwargs", [
    {"threshold": 2}, {"threshold": 5}, {"neighbours": 5}, {"neighbours": 6},
    {"clip": float("nan")}, {"clip": -1.0}, {"vector_length": 0}, {"levels": 0},
])
def test_make_params_refuses_unsafe_settings(kwargs):
    base = {"n_sites": 4, "vector_length": 5, "clip": 1.0}
    with pytest.raises(SecAggConfigError):
        make_params("r", 1, **{**base, **kwargs})


def test_check_params_refuses_too_many_or_too_few_sites():
    params = make_params("r", 1, n_sites=2, vector_length=5, clip=1.0)
    with pytest.raises(SecAggConfigError):
        check_params(params, 1)
    with pytest.raises(SecAggConfigError):
        check_params(params, 1001)
