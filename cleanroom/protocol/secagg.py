"""Secure aggregation with dropouts (SecAgg / SecAgg+ after Bonawitz et al. 2017 and Bell et al.
2020): the aggregator learns the weighted sum of the surviving sites' updates and nothing else.

Two pure state machines, no I/O: :class:`SiteSecAgg` (one per site per round) and
:class:`AggregatorSecAgg` (one per round). The transport (the Flower round protocol) carries
their messages (:mod:`cleanroom.protocol.secagg_wire`) and decides who dropped (a site whose
reply does not come). Each site

1. advertises two fresh X25519 keys, a channel key and a mask key, bound into its attestation
   evidence (:meth:`SecAggAdvertisement.digest` goes into report_data);
2. Shamir-shares a fresh self-mask seed b and its mask private key s among its neighbourhood
   (threshold t), each share sealed to the holder with AES-GCM under a key from X25519 of the
   two sites' channel keys, bound to run, round, sender and receiver;
3. sends ``weight * q(update)`` and ``weight`` plus PRG(b) plus, for every neighbour j whose
   shares it received, +-PRG(X25519(s_i, S_j)), all modulo 2^m;
4. confirms the survivor set (whose masked inputs are in the sum) with a MAC to each
   neighbour, so that honest sites cannot be shown different survivor sets;
5. reveals, for each peer whose shares it holds, either the self-mask share (the peer survived)
   or the mask-key share (the peer dropped), never both.

The aggregator sums the survivors' vectors, removes their self masks and the pairwise masks
they shared with dropped sites, and gets sum(weight_i * q_i) and sum(weight_i). See
docs/secure-aggregation.md for the threshold, what it tolerates, and the wiring.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from pydantic import ValidationError

from cleanroom.errors import (
    SecAggConfigError,
    SecAggError,
    SecAggIntegrityError,
    SecAggMessageError,
    SecAggRefusal,
    SecAggStageError,
    SecAggThresholdError,
)
from cleanroom.protocol.secagg_primitives import (
    SHARE_SIZE,
    Graph,
    check_site_list,
    combine_shares,
    default_threshold,
    derive_key,
    digest,
    length_prefixed,
    mac,
    mac_ok,
    mask_dtype,
    mask_stream,
    open_shares,
    quantize,
    recommended_neighbours,
    round_context,
    seal_shares,
    split_secret,
)
from cleanroom.protocol.secagg_wire import (
    MAX_SITES,
    ConsistencyRequest,
    ConsistencyResponse,
    MaskedInput,
    MaskedInputRequest,
    PeerTag,
    RevealedShare,
    RosterEntry,
    SealedShares,
    SecAggParams,
    ShareCommitment,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)

log = logging.getLogger(__name__)

FULL_GRAPH_MAX_SITES = 100  # up to this many sites every pair shares masks (no graph to trust)
DEFAULT_LEVELS = 2**20
ADVERTISEMENT_TAG = b"cleanroom-fl/secagg-keys/v1"


# ----------------------------------------------------------------------------- parameters


def default_neighbours(n_sites: int) -> int:
    """Every pair up to FULL_GRAPH_MAX_SITES sites, else the ring of
    :func:`recommended_neighbours` (117 of 1000 sites)."""
    if n_sites <= FULL_GRAPH_MAX_SITES:
        return n_sites
    return recommended_neighbours(n_sites)


def check_params(params: SecAggParams, n_sites: int) -> None:
    """The rules both sides enforce; SecAggConfigError names the first one broken."""
    k, t = params.neighbours, params.threshold
    if not 2 <= n_sites <= MAX_SITES:
        raise SecAggConfigError(f"{n_sites} sites; secure aggregation needs 2..{MAX_SITES}")
    if k > n_sites or (k != n_sites and (k % 2 == 0 or k < 3)):
        raise SecAggConfigError(f"neighbours {k} of {n_sites} sites: must be all of them or "
                                "an odd number >= 3 below it")
    if not (2 * t > k and 2 <= t <= k):
        raise SecAggConfigError(f"threshold {t} of neighbourhood {k}: need k/2 < t <= k")
    top = 1 << (params.mod_bits - 1)
    worst = n_sites * params.max_weight * params.levels
    if worst >= top or n_sites * params.max_weight >= top:
        raise SecAggConfigError(
            f"modulus 2^{params.mod_bits} could wrap: {n_sites} sites x max_weight "
            f"{params.max_weight} x levels {params.levels} = {worst} >= 2^{params.mod_bits - 1}")


def make_params(run_id: str, round: int, *, n_sites: int, vector_length: int, clip: float,
                max_weight: int = 1, levels: int = DEFAULT_LEVELS,
                neighbours: int | None = None, threshold: int | None = None,
                mod_bits: int | None = None) -> SecAggParams:
    """Parameters for one round with safe defaults: neighbours = :func:`default_neighbours`,
    threshold = floor(2k/3) + 1, the smallest modulus (2^32 or 2^64) that cannot wrap.

    >>> p = make_params("run", 1, n_sites=4, vector_length=10, clip=1.0)
    >>> (p.neighbours, p.threshold, p.mod_bits)
    (4, 3, 32)
    """
    k = neighbours if neighbours is not None else default_neighbours(n_sites)
    t = threshold if threshold is not None else default_threshold(k)
    if mod_bits is None:
        worst = n_sites * max_weight * levels
        fits = [b for b in (32, 64) if worst < 1 << (b - 1)]
        if not fits:
            raise SecAggConfigError(f"{n_sites} sites x max_weight {max_weight} x levels "
                                    f"{levels} does not fit a 64-bit modulus")
        mod_bits = fits[0]
    try:
        params = SecAggParams(run_id=run_id, round=round, vector_length=vector_length,
                              clip=float(clip), levels=levels, max_weight=max_weight,
                              mod_bits=mod_bits, neighbours=k, threshold=t)  # type: ignore[arg-type]
    except ValidationError as exc:
        bad = ", ".join(str(e["loc"][0]) for e in exc.errors())
        raise SecAggConfigError(f"invalid secure-aggregation parameters ({bad})") from None
    check_params(params, n_sites)
    return params


def quantization_error_bound(params: SecAggParams, total_weight: int) -> float:
    """Largest possible |decoded weighted sum - sum(weight_i * clip(update_i))| per coordinate:
    stochastic rounding moves each site's value by less than one step of clip/levels."""
    return total_weight * params.clip / params.levels


# ----------------------------------------------------------------------------- keys


def _raw_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SecAggAdvertisement:
    """A site's two secagg public keys for one round; its attestation binds :meth:`digest`."""

    channel_key: bytes
    mask_key: bytes

    def digest(self) -> bytes:
        """32 bytes to bind into the site's report_data (next to its other round keys)."""
        return digest(ADVERTISEMENT_TAG, self.channel_key, self.mask_key)

    def roster_entry(self, site: str) -> RosterEntry:
        return RosterEntry(site=site, channel_key=self.channel_key, mask_key=self.mask_key)


@dataclass(frozen=True)
class SecAggKeys:
    """A site's ephemeral secagg key pairs: ``channel`` seals shares and tags site to site,
    ``mask`` makes pairwise masks and is the secret that gets Shamir-shared (so revealing it
    for a dropped site never opens the shares sent to or from it)."""

    channel: x25519.X25519PrivateKey
    mask: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> SecAggKeys:
        return cls(x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    @property
    def advertisement(self) -> SecAggAdvertisement:
        return SecAggAdvertisement(_raw_public(self.channel), _raw_public(self.mask))


def _exchange(private: x25519.X25519PrivateKey, public: bytes) -> bytes | None:
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: no shared secret with this key
        return None


# ----------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """Who shares masks with whom, computed by every participant from the same roster: the
    sites sorted by id (a holder's share x coordinate is its index + 1), their keys and the
    neighbour graph."""

    sites: tuple[str, ...]
    keys: Mapping[str, RosterEntry]
    x: Mapping[str, int]
    graph: Graph

    @classmethod
    def from_roster(cls, params: SecAggParams, roster: Sequence[RosterEntry]) -> Topology:
        names = [e.site for e in roster]
        check_site_list(names, "roster")
        keys = [e.channel_key for e in roster] + [e.mask_key for e in roster]
        if len(set(keys)) != len(keys):
            raise SecAggMessageError("roster repeats a public key", code="duplicate-key")
        check_params(params, len(roster))
        ordered = sorted(roster, key=lambda e: e.site)
        seed = digest(round_context(params.run_id, params.round), "graph",
                      *(part for e in ordered for part in (e.site, e.channel_key, e.mask_key)))
        sites = tuple(e.site for e in ordered)
        return cls(sites=sites, keys={e.site: e for e in ordered},
                   x={s: i + 1 for i, s in enumerate(sites)},
                   graph=Graph.build(sites, params.neighbours, seed))

    def neighbourhood(self, site: str) -> frozenset[str]:
        """The site and the neighbours it shares masks with."""
        return self.graph.neighbourhood(site)

    def peers(self, site: str) -> frozenset[str]:
        return self.graph.neighbourhood(site) - {site}


class _Round:
    """Domain separation: every derived key and commitment names the run, the round and what
    it is for."""

    def __init__(self, run_id: str, round: int) -> None:
        self.context = round_context(run_id, round)

    def info(self, purpose: str, *names: str) -> bytes:
        return length_prefixed(self.context, purpose, *names)

    def share_commitment(self, kind: str, owner: str, holder: str, share: bytes) -> bytes:
        return digest(self.context, "share", kind, owner, holder, share)

    def seed_commitment(self, owner: str, seed: bytes) -> bytes:
        return digest(self.context, "self-mask-seed", owner, seed)

    def survivors_digest(self, survivors: Sequence[str]) -> bytes:
        return digest(self.context, "survivors", *sorted(survivors))

    def self_mask_key(self, owner: str, seed: bytes) -> bytes:
        return derive_key(seed, self.info("self-mask", owner))

    def pair_mask_key(self, shared_secret: bytes, a: str, b: str) -> bytes:
        low, high = sorted((a, b))
        return derive_key(shared_secret, self.info("pair-mask", low, high))


def _check_header(message: Any, kind: type, run_id: str, round: int, what: str) -> None:
    if not isinstance(message, kind):
        raise SecAggMessageError(f"{what}: expected a {kind.__name__}, got "
                                 f"{type(message).__name__}")
    if (message.run_id, message.round) != (run_id, round):
        raise SecAggMessageError(f"{what}: message is for run {message.run_id!r} round "
                                 f"{message.round}, expected {run_id!r} round {round}",
                                 code="wrong-round")


def _unknown(names: Sequence[str] | frozenset[str], allowed: frozenset[str] | set[str],
             what: str) -> None:
    stray = sorted(set(names) - set(allowed))
    if stray:
        raise SecAggMessageError(f"{what} names sites it may not: {stray[:5]}",
                                 code="unknown-site")


# ----------------------------------------------------------------------------- site

F = TypeVar("F", bound=Callable[..., Any])


def _site_stage(expected: str) -> Callable[[F], F]:
    """Run a site step only in its stage; any error aborts the site's part in the round (it
    then behaves as a dropped site and answers nothing more)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(self: SiteSecAgg, *args: Any, **kwargs: Any) -> Any:
            if self._stage != expected:
                stage = self._stage
                self._abort()
                raise SecAggStageError(f"site {self.site}: {fn.__name__} in stage {stage}, "
                                       f"expected {expected}")
            try:
                return fn(self, *args, **kwargs)
            except BaseException:
                self._abort()
                raise

        return run  # type: ignore[return-value]

    return wrap


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts from the aggregator. ``min_neighbours``: smallest neighbourhood it
    masks in (None: :func:`default_neighbours` of the roster size, i.e. every pair up to 100
    sites). ``min_threshold``: smallest threshold (None: floor(2k/3) + 1)."""

    min_neighbours: int | None = None
    min_threshold: int | None = None


class SiteSecAgg:
    """One site's side of one round of secure aggregation.

    >>> site = SiteSecAgg("site-a", "run-1", 3)
    >>> site.advertisement.digest()  # bind into report_data  # doctest: +SKIP

    Then, in order and once each: :meth:`share_keys`, :meth:`masked_input`,
    :meth:`consistency`, :meth:`unmask`. Every refusal raises a SecAggError subclass and ends
    the site's part in the round.
    """

    def __init__(self, site: str, run_id: str, round: int, *, keys: SecAggKeys | None = None,
                 policy: SitePolicy = SitePolicy()) -> None:
        self.site = site
        self.run_id = run_id
        self.round = round
        self._keys = keys or SecAggKeys.generate()
        self._policy = policy
        self._ctx = _Round(run_id, round)
        self._stage = "share-keys"
        self._params: SecAggParams | None = None
        self._topology: Topology | None = None
        self._channel: dict[str, bytes] = {}  # peer -> X25519 of the channel keys
        self._pair_keys: dict[str, bytes] = {}  # peer -> pairwise mask key
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (self-mask, mask-key) share
        self._seed = b""
        self._mask_peers: frozenset[str] = frozenset()
        self._survivors: frozenset[str] = frozenset()

    @property
    def advertisement(self) -> SecAggAdvertisement:
        return self._keys.advertisement

    @property
    def stage(self) -> str:
        """Next step: share-keys, masked-input, consistency, unmask; then done or aborted."""
        return self._stage

    # --- between messages
    def export_state(self) -> bytes:
        """Everything this site holds for the round (its private keys and the shares it
        holds included), to keep between messages. Secret: only ever store it sealed."""
        def raw(key: x25519.X25519PrivateKey) -> str:
            return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()).hex()

        topology = self._topology
        state = {
            "v": 1, "site": self.site, "run_id": self.run_id, "round": self.round,
            "channel": raw(self._keys.channel), "mask": raw(self._keys.mask),
            "policy": [self._policy.min_neighbours, self._policy.min_threshold],
            "stage": self._stage,
            "params": self._params.model_dump_json() if self._params is not None else None,
            "roster": None if topology is None else [
                [s, topology.keys[s].channel_key.hex(), topology.keys[s].mask_key.hex()]
                for s in topology.sites],
            "channel_secrets": {p: v.hex() for p, v in self._channel.items()},
            "pair_keys": {p: v.hex() for p, v in self._pair_keys.items()},
            "held": {o: [a.hex(), b.hex()] for o, (a, b) in self._held.items()},
            "seed": self._seed.hex(), "mask_peers": sorted(self._mask_peers),
            "survivors": sorted(self._survivors)}
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def restore(cls, data: bytes) -> SiteSecAgg:
        """The site's round state from :meth:`export_state` (data this site sealed itself)."""
        try:
            state = json.loads(data)
            if state.get("v") != 1:
                raise ValueError("unknown state version")
            keys = SecAggKeys(
                x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(state["channel"])),
                x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask"])))
            site = cls(state["site"], state["run_id"], int(state["round"]), keys=keys,
                       policy=SitePolicy(*state["policy"]))
            site._stage = state["stage"]
            if state["params"] is not None:
                site._params = SecAggParams.model_validate_json(state["params"])
                roster = [RosterEntry(site=n, channel_key=bytes.fromhex(c),
                                      mask_key=bytes.fromhex(m)) for n, c, m in state["roster"]]
                site._topology = Topology.from_roster(site._params, roster)
            site._channel = {p: bytes.fromhex(v) for p, v in state["channel_secrets"].items()}
            site._pair_keys = {p: bytes.fromhex(v) for p, v in state["pair_keys"].items()}
            site._held = {o: (bytes.fromhex(a), bytes.fromhex(b))
                          for o, (a, b) in state["held"].items()}
            site._seed = bytes.fromhex(state["seed"])
            site._mask_peers = frozenset(state["mask_peers"])
            site._survivors = frozenset(state["survivors"])
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise SecAggMessageError(f"secure-aggregation state does not restore: {exc}",
                                     code="bad-state") from None
        return site

    def _abort(self) -> None:
        self._stage = "aborted"
        self._held.clear()
        self._pair_keys.clear()
        self._channel.clear()
        self._seed = b""

    def _request(self, message: Any, kind: type) -> None:
        _check_header(message, kind, self.run_id, self.round, f"site {self.site}")
        if getattr(message, "site", self.site) != self.site:
            raise SecAggMessageError(f"site {self.site}: request addressed to "
                                     f"{message.site!r}", code="wrong-site")

    @property
    def _p(self) -> SecAggParams:
        assert self._params is not None
        return self._params

    @property
    def _t(self) -> Topology:
        assert self._topology is not None
        return self._topology

    # --- stage 2
    @_site_stage("share-keys")
    def share_keys(self, request: ShareKeysRequest) -> ShareKeysResponse:
        """Check the parameters and the roster, then share the self-mask seed and the mask key
        with every neighbour (sealed to it)."""
        self._request(request, ShareKeysRequest)
        params = request.params
        if (params.run_id, params.round) != (self.run_id, self.round):
            raise SecAggMessageError("parameters name another run or round", code="wrong-round")
        topology = Topology.from_roster(params, request.roster)
        mine = topology.keys.get(self.site)
        advert = self.advertisement
        if mine is None or (mine.channel_key, mine.mask_key) != (advert.channel_key,
                                                                  advert.mask_key):
            raise SecAggMessageError(f"roster does not carry site {self.site}'s attested keys",
                                     code="roster-key-mismatch")
        n = len(topology.sites)
        want_k = min(n, self._policy.min_neighbours or default_neighbours(n))
        want_t = self._policy.min_threshold or default_threshold(params.neighbours)
        if params.neighbours < want_k or params.threshold < want_t:
            raise SecAggRefusal(f"neighbours {params.neighbours} / threshold {params.threshold}"
                                f" below this site's policy ({want_k} / {want_t})",
                                code="weak-parameters")
        self._params, self._topology = params, topology
        neighbourhood = sorted(topology.neighbourhood(self.site))
        xs = [topology.x[h] for h in neighbourhood]
        self._seed = os.urandom(32)
        mask_secret = self._keys.mask.private_bytes(serialization.Encoding.Raw,
                                                    serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption())
        seed_shares = split_secret(self._seed, params.threshold, xs)
        key_shares = split_secret(mask_secret, params.threshold, xs)
        sealed, commitments = [], []
        for holder in neighbourhood:
            pair = seed_shares[topology.x[holder]], key_shares[topology.x[holder]]
            if holder == self.site:
                self._held[holder] = pair
            else:
                entry = topology.keys[holder]
                channel = _exchange(self._keys.channel, entry.channel_key)
                masking = _exchange(self._keys.mask, entry.mask_key)
                if channel is None or masking is None:
                    log.warning("secagg %s: no shared secret with %s's keys; treating it as "
                                "dropped", self.site, holder)
                    continue
                self._channel[holder] = channel
                self._pair_keys[holder] = self._ctx.pair_mask_key(masking, self.site, holder)
                info = self._ctx.info("shares", self.site, holder)
                sealed.append(SealedShares(peer=holder, ciphertext=seal_shares(
                    derive_key(channel, info), pair[0] + pair[1], info)))
            commitments.append(ShareCommitment(
                holder=holder,
                self_mask_share=self._ctx.share_commitment("self-mask", self.site, holder,
                                                           pair[0]),
                mask_key_share=self._ctx.share_commitment("mask-key", self.site, holder,
                                                          pair[1])))
        self._stage = "masked-input"
        log.info("secagg %s: shared keys with %d of %d neighbours (threshold %d)", self.site,
                 len(sealed), len(neighbourhood) - 1, params.threshold)
        return ShareKeysResponse(run_id=self.run_id, round=self.round, site=self.site,
                                 sealed=sealed, commitments=commitments,
                                 self_mask_commitment=self._ctx.seed_commitment(self.site,
                                                                                self._seed))

    # --- stage 3
    @_site_stage("masked-input")
    def masked_input(self, request: MaskedInputRequest, update: np.ndarray, weight: int, *,
                     rng: np.random.Generator | None = None) -> MaskedInput:
        """Open the neighbours' shares (one that does not open: that neighbour counts as
        dropped), then mask ``weight * q(update)`` and ``weight``."""
        self._request(request, MaskedInputRequest)
        params, topology = self._p, self._t
        senders = [s.peer for s in request.sealed]
        check_site_list(senders, "masked-input request")
        _unknown(senders, topology.peers(self.site), "masked-input request")
        vector = self._check_update(update, weight)
        peers = set()
        for item in request.sealed:
            channel = self._channel.get(item.peer)
            info = self._ctx.info("shares", item.peer, self.site)
            plain = None if channel is None else open_shares(derive_key(channel, info),
                                                             item.ciphertext, info)
            if plain is None:
                log.warning("secagg %s: shares from %s do not open; treating it as dropped",
                            self.site, item.peer)
                continue
            self._held[item.peer] = plain[:SHARE_SIZE], plain[SHARE_SIZE:]
            peers.add(item.peer)
        if len(peers) + 1 < params.threshold:
            raise SecAggRefusal(f"site {self.site} got shares from {len(peers)} neighbours; "
                                f"masking with fewer than {params.threshold - 1} would expose "
                                "its update", code="too-few-peers")
        values = np.empty(params.vector_length + 1, dtype=np.int64)
        values[:-1] = quantize(vector, params.clip, params.levels,
                               rng or np.random.default_rng()) * int(weight)
        values[-1] = int(weight)
        dtype = mask_dtype(params.mod_bits)
        masked = values.astype(dtype)  # two's complement modulo 2^m
        masked += mask_stream(self._ctx.self_mask_key(self.site, self._seed), len(masked),
                              params.mod_bits)
        for peer in sorted(peers):
            stream = mask_stream(self._pair_keys[peer], len(masked), params.mod_bits)
            if self.site < peer:
                masked += stream
            else:
                masked -= stream
        for gone in set(self._pair_keys) - peers:
            del self._pair_keys[gone]
        self._mask_peers = frozenset(peers)
        self._stage = "consistency"
        log.info("secagg %s: masked input with %d neighbours (%d coordinates clipped)",
                 self.site, len(peers), int(np.count_nonzero(np.abs(vector) > params.clip)))
        return MaskedInput(run_id=self.run_id, round=self.round, site=self.site,
                           mask_peers=sorted(peers), vector=masked.tobytes())

    def _check_update(self, update: np.ndarray, weight: int) -> np.ndarray:
        params = self._p
        vector = np.asarray(update)
        if vector.shape != (params.vector_length,) or not (
                np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype,
                                                                         np.integer)):
            raise SecAggMessageError(f"update must be a flat real vector of "
                                     f"{params.vector_length}, got {vector.dtype} "
                                     f"{vector.shape}", code="bad-update")
        vector = vector.astype(np.float64)
        if not np.all(np.isfinite(vector)):
            raise SecAggMessageError("update has non-finite values", code="bad-update")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or not (
                0 <= int(weight) <= params.max_weight):
            raise SecAggMessageError(f"weight must be an integer in [0, {params.max_weight}]",
                                     code="bad-weight")
        return vector

    # --- stage 4
    @_site_stage("consistency")
    def consistency(self, request: ConsistencyRequest) -> ConsistencyResponse:
        """Tag the survivor set for each surviving neighbour, after checking that it keeps
        this site, drops no neighbour it masked with while keeping one it did not, and leaves
        at least t of its neighbourhood."""
        self._request(request, ConsistencyRequest)
        params, topology = self._p, self._t
        check_site_list(request.survivors, "survivor set")
        _unknown(request.survivors, set(topology.sites), "survivor set")
        survivors = frozenset(request.survivors)
        if self.site not in survivors:
            raise SecAggRefusal(f"survivor set leaves out {self.site} itself",
                                code="not-a-survivor")
        near = survivors & topology.neighbourhood(self.site)
        stray = near - self._mask_peers - {self.site}
        if stray:
            raise SecAggRefusal(f"survivor set keeps {sorted(stray)[:5]}, which {self.site} "
                                "did not mask with", code="inconsistent-survivors")
        if len(near) < params.threshold:
            raise SecAggRefusal(f"{len(near)} of {self.site}'s neighbourhood survive, below "
                                f"the threshold {params.threshold}", code="below-threshold")
        self._survivors = survivors
        agreed = self._ctx.survivors_digest(request.survivors)
        tags = [PeerTag(peer=peer, tag=mac(derive_key(
            self._channel[peer], self._ctx.info("consistency", self.site, peer)), agreed))
            for peer in sorted(near - {self.site})]
        self._stage = "unmask"
        return ConsistencyResponse(run_id=self.run_id, round=self.round, site=self.site,
                                   tags=tags)

    # --- stage 5
    @_site_stage("unmask")
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, per peer, the self-mask share (a survivor) or the mask-key share (a
        dropped site) once at least t of the neighbourhood confirmed the same survivor set.
        Asked for both shares of one peer, or for anything that contradicts the survivor set,
        the site refuses."""
        self._request(request, UnmaskRequest)
        params, topology = self._p, self._t
        senders = [t.peer for t in request.tags]
        check_site_list(senders, "unmask tags")
        _unknown(senders, topology.peers(self.site), "unmask tags")
        agreed = self._ctx.survivors_digest(sorted(self._survivors))
        confirmed = 1 + sum(
            1 for t in request.tags
            if t.peer in self._survivors and t.peer in self._channel and mac_ok(
                derive_key(self._channel[t.peer],
                           self._ctx.info("consistency", t.peer, self.site)), agreed, t.tag))
        if confirmed < params.threshold:
            raise SecAggRefusal(f"only {confirmed} of {self.site}'s neighbourhood confirmed "
                                f"the survivor set, need {params.threshold}",
                                code="unconfirmed-survivors")
        seeds, keys = request.reveal_self_mask, request.reveal_mask_key
        check_site_list(seeds, "self-mask reveal list")
        check_site_list(keys, "mask-key reveal list")
        both = sorted(set(seeds) & set(keys))
        if both:
            raise SecAggRefusal(f"asked for both shares of {both[:5]}: that would unmask an "
                                "individual update", code="double-reveal")
        _unknown(seeds + keys, set(self._held), "unmask request")
        if not set(seeds) <= self._survivors:
            raise SecAggRefusal("asked for self-mask shares of sites outside the agreed "
                                f"survivor set: {sorted(set(seeds) - self._survivors)[:5]}",
                                code="inconsistent-survivors")
        if set(keys) & self._survivors:
            raise SecAggRefusal("asked for mask-key shares of survivors: "
                                f"{sorted(set(keys) & self._survivors)[:5]}",
                                code="reveals-survivor-key")
        response = UnmaskResponse(
            run_id=self.run_id, round=self.round, site=self.site,
            self_mask_shares=[RevealedShare(owner=o, share=self._held[o][0]) for o in seeds],
            mask_key_shares=[RevealedShare(owner=o, share=self._held[o][1]) for o in keys])
        self._held.clear()
        self._pair_keys.clear()
        self._seed = b""
        self._stage = "done"
        return response


# ----------------------------------------------------------------------------- aggregator


@dataclass(frozen=True)
class AggregateResult:
    """What the aggregator learns: sum(weight_i * update_i) over the survivors (within
    :func:`quantization_error_bound`), sum(weight_i), and who is in it."""

    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def mean(self) -> np.ndarray:
        if self.total_weight <= 0:
            raise SecAggIntegrityError("total weight is zero: no mean", code="zero-weight")
        return self.weighted_sum / self.total_weight


class AggregatorSecAgg:
    """The aggregator's side of one round. Call, in order: :meth:`share_keys_request` (one
    message for every site), :meth:`receive_share_keys` per reply, :meth:`masked_input_requests`,
    :meth:`receive_masked_input` per reply, :meth:`consistency_requests`,
    :meth:`receive_consistency`, :meth:`unmask_requests`, :meth:`receive_unmask`, then
    :meth:`result`. A site whose reply never comes is a dropout; a reply that raises is
    discarded (the site counts as dropped). Closing a stage with too few sites left raises
    SecAggThresholdError: the round has no aggregate."""

    def __init__(self, params: SecAggParams, roster: Sequence[RosterEntry]) -> None:
        self.params = params
        self.topology = Topology.from_roster(params, roster)
        self._ctx = _Round(params.run_id, params.round)
        self._dtype = mask_dtype(params.mod_bits)
        self._stage = "share-keys"
        self._share_keys: dict[str, ShareKeysResponse] = {}
        self._commitments: dict[tuple[str, str], ShareCommitment] = {}
        self._forwarded: dict[str, frozenset[str]] = {}  # receiver -> senders forwarded
        self._inputs: dict[str, tuple[frozenset[str], np.ndarray]] = {}
        self._survivors: frozenset[str] = frozenset()
        self._tags: dict[str, dict[str, bytes]] = {}  # sender -> receiver -> tag
        self._requested: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._revealed: dict[str, UnmaskResponse] = {}
        self._points: dict[tuple[str, str], dict[int, bytes]] = {}  # (kind, owner) -> x -> share

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def survivors(self) -> tuple[str, ...]:
        """Sites whose masked inputs are in the sum (fixed when consistency requests go out)."""
        return tuple(sorted(self._survivors))

    def _expect(self, stage: str, what: str) -> None:
        if self._stage != stage:
            raise SecAggStageError(f"aggregator: {what} in stage {self._stage}, expected "
                                   f"{stage}")

    def _reply(self, message: Any, kind: type, allowed: Mapping[str, object] | frozenset[str],
               seen: Mapping[str, object], stage: str) -> None:
        self._expect(stage, f"{kind.__name__}")
        _check_header(message, kind, self.params.run_id, self.params.round, "aggregator")
        if message.site not in allowed:
            raise SecAggMessageError(f"{kind.__name__} from {message.site!r}, which is not "
                                     f"expected in stage {stage}", code="unknown-site")
        if message.site in seen:
            raise SecAggMessageError(f"second {kind.__name__} from {message.site}",
                                     code="duplicate-site")

    # --- stage 2
    def share_keys_request(self) -> ShareKeysRequest:
        self._expect("share-keys", "share_keys_request")
        return ShareKeysRequest(run_id=self.params.run_id, round=self.params.round,
                                params=self.params,
                                roster=[self.topology.keys[s] for s in self.topology.sites])

    def receive_share_keys(self, response: ShareKeysResponse) -> None:
        self._reply(response, ShareKeysResponse, self.topology.keys, self._share_keys,
                    "share-keys")
        site = response.site
        receivers = [s.peer for s in response.sealed]
        check_site_list(receivers, f"{site}'s shares")
        _unknown(receivers, self.topology.peers(site), f"{site}'s shares")
        holders = [c.holder for c in response.commitments]
        check_site_list(holders, f"{site}'s commitments")
        if set(holders) != set(receivers) | {site}:
            raise SecAggMessageError(f"{site}'s commitments name other holders than its "
                                     "shares", code="commitment-mismatch")
        self._share_keys[site] = response
        for c in response.commitments:
            self._commitments[(site, c.holder)] = c

    def masked_input_requests(self) -> dict[str, MaskedInputRequest]:
        """Close share-keys: keep every site whose shares reached at least t - 1 kept
        neighbours, and forward to each the shares sealed to it."""
        self._expect("share-keys", "masked_input_requests")
        t = self.params.threshold
        kept = set(self._share_keys)
        sent = {s: {x.peer for x in r.sealed} for s, r in self._share_keys.items()}
        while True:
            # a site masks only with kept neighbours that sealed shares to it, and its own
            # shares are useful only at kept neighbours
            inbound = Counter(peer for o in kept for peer in sent[o] if peer in kept)
            weak = {s for s in kept if len(sent[s] & kept) + 1 < t or inbound[s] + 1 < t}
            if not weak:
                break
            log.warning("secagg: dropping %s: too few neighbours exchanged shares", sorted(weak))
            kept -= weak
        if not kept:
            self._stage = "failed"
            raise SecAggThresholdError(f"no site kept at least {t - 1} neighbours after key "
                                       f"sharing ({len(self._share_keys)} answered)")
        inbox: dict[str, list[SealedShares]] = {s: [] for s in kept}
        for sender in sorted(kept):
            for x in self._share_keys[sender].sealed:
                if x.peer in kept:
                    # validated on receipt: built without validating again
                    inbox[x.peer].append(SealedShares.model_construct(
                        peer=sender, ciphertext=x.ciphertext))
        requests = {}
        for receiver in sorted(kept):
            items = inbox[receiver]
            self._forwarded[receiver] = frozenset(i.peer for i in items)
            requests[receiver] = MaskedInputRequest(run_id=self.params.run_id,
                                                    round=self.params.round, site=receiver,
                                                    sealed=items)
        self._stage = "masked-input"
        log.info("secagg: %d of %d sites shared keys", len(kept), len(self.topology.sites))
        return requests

    # --- stage 3
    def receive_masked_input(self, message: MaskedInput) -> None:
        self._reply(message, MaskedInput, self._forwarded, self._inputs, "masked-input")
        site = message.site
        check_site_list(message.mask_peers, f"{site}'s mask peers")
        _unknown(message.mask_peers, self._forwarded[site], f"{site}'s mask peers")
        expect = (self.params.vector_length + 1) * self._dtype.itemsize
        if len(message.vector) != expect:
            raise SecAggMessageError(f"{site}'s masked vector has {len(message.vector)} bytes, "
                                     f"expect {expect}", code="bad-vector")
        if len(message.mask_peers) + 1 < self.params.threshold:
            raise SecAggMessageError(f"{site} masked with {len(message.mask_peers)} "
                                     "neighbours, below the threshold", code="too-few-peers")
        vector = np.frombuffer(message.vector, dtype=self._dtype).copy()
        self._inputs[site] = frozenset(message.mask_peers), vector

    def _holders(self, among: frozenset[str] | set[str]) -> dict[str, set[str]]:
        """Owner -> the sites of ``among`` that hold its shares (each site holds its own)."""
        out: dict[str, set[str]] = {}
        for h in among:
            out.setdefault(h, set()).add(h)
            for owner in self._inputs[h][0]:
                out.setdefault(owner, set()).add(h)
        return out

    def consistency_requests(self) -> dict[str, ConsistencyRequest]:
        """Close masked-input: the survivor set is every site whose masked input came, minus
        one of each pair of neighbours that disagree on having masked with each other (the one
        left out, whose shares did not open). Raises SecAggThresholdError when some survivor's
        or some needed dropped site's secrets would have fewer than t holders."""
        self._expect("masked-input", "consistency_requests")
        survivors = set(self._inputs)
        changed = True
        while changed:
            changed = False
            for i in sorted(survivors):
                peers_i = self._inputs[i][0]
                for j in sorted(self.topology.peers(i) & survivors):
                    if (j in peers_i) != (i in self._inputs[j][0]):
                        out = j if j not in peers_i else i
                        log.warning("secagg: %s and %s disagree on their masks; %s leaves "
                                    "the survivor set", i, j, out)
                        survivors.discard(out)
                        changed = True
                        break
                if changed:
                    break
        self._check_holders(survivors, survivors, "after masking")
        self._survivors = frozenset(survivors)
        self._stage = "consistency"
        log.info("secagg: %d survivors (masked inputs kept), %d dropped", len(survivors),
                 len(self.topology.sites) - len(survivors))
        return {s: ConsistencyRequest(run_id=self.params.run_id, round=self.params.round,
                                      site=s, survivors=sorted(survivors))
                for s in sorted(survivors)}

    def _dead_needed(self, survivors: frozenset[str] | set[str]) -> set[str]:
        return {j for i in survivors for j in self._inputs[i][0]} - set(survivors)

    def _check_holders(self, survivors: set[str] | frozenset[str],
                       answering: set[str] | frozenset[str], when: str) -> None:
        t = self.params.threshold
        holders = self._holders(answering)
        short = [x for x in sorted(set(survivors) | self._dead_needed(survivors))
                 if len(holders.get(x, set())) < t]
        if not survivors or short:
            self._stage = "failed"
            raise SecAggThresholdError(
                f"{when}: {len(answering)} sites left; fewer than the threshold {t} hold the "
                f"shares of {short[:5] or 'anyone'}")

    # --- stage 4
    def receive_consistency(self, response: ConsistencyResponse) -> None:
        self._reply(response, ConsistencyResponse, self._survivors, self._tags, "consistency")
        receivers = [t.peer for t in response.tags]
        check_site_list(receivers, f"{response.site}'s tags")
        _unknown(receivers, self.topology.peers(response.site) & self._survivors,
                 f"{response.site}'s tags")
        self._tags[response.site] = {t.peer: t.tag for t in response.tags}

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """Close consistency: ask every site that confirmed (and got tags from at least t - 1
        neighbours) for the self-mask shares of survivors and the mask-key shares of dropped
        sites it holds."""
        self._expect("consistency", "unmask_requests")
        t = self.params.threshold
        confirmed = set(self._tags)
        inbox: dict[str, list[PeerTag]] = {h: [] for h in confirmed}
        for sender in sorted(confirmed):
            for receiver, tag in self._tags[sender].items():
                if receiver in inbox:
                    inbox[receiver].append(PeerTag.model_construct(peer=sender, tag=tag))
        ready = {h for h in confirmed if len(inbox[h]) + 1 >= t}
        self._check_holders(self._survivors, ready, "after consistency")
        requests = {}
        for h in sorted(ready):
            peers = self._inputs[h][0]
            seeds = frozenset(x for x in self._survivors if x == h or x in peers)
            keys = frozenset(peers - self._survivors)
            self._requested[h] = seeds, keys
            requests[h] = UnmaskRequest(run_id=self.params.run_id, round=self.params.round,
                                        site=h, tags=inbox[h], reveal_self_mask=sorted(seeds),
                                        reveal_mask_key=sorted(keys))
        self._stage = "unmask"
        return requests

    # --- stage 5
    def receive_unmask(self, response: UnmaskResponse) -> None:
        """Keep a site's revealed shares only if they are exactly those asked for and each
        matches the commitment its owner made (else SecAggIntegrityError: none are kept)."""
        self._reply(response, UnmaskResponse, self._requested, self._revealed, "unmask")
        site = response.site
        seeds, keys = self._requested[site]
        for shares, asked, kind in ((response.self_mask_shares, seeds, "self-mask"),
                                    (response.mask_key_shares, keys, "mask-key")):
            owners = [s.owner for s in shares]
            check_site_list(owners, f"{site}'s {kind} shares")
            if set(owners) != asked:
                raise SecAggMessageError(f"{site} revealed {kind} shares of other sites than "
                                         "asked", code="unknown-site")
            for share in shares:
                committed = self._commitments.get((share.owner, site))
                expect = None if committed is None else (
                    committed.self_mask_share if kind == "self-mask" else
                    committed.mask_key_share)
                if expect != self._ctx.share_commitment(kind, share.owner, site, share.share):
                    raise SecAggIntegrityError(f"{site}'s {kind} share of {share.owner} does "
                                               "not match its commitment", code="bad-share")
        self._revealed[site] = response
        x = self.topology.x[site]
        for share in response.self_mask_shares:
            self._points.setdefault(("self-mask", share.owner), {})[x] = share.share
        for share in response.mask_key_shares:
            self._points.setdefault(("mask-key", share.owner), {})[x] = share.share

    def result(self) -> AggregateResult:
        """Rebuild the survivors' self-mask seeds and the needed dropped sites' mask keys
        (each checked against its commitment / attested public key), remove every mask, and
        decode the sum."""
        self._expect("unmask", "result")
        try:
            out = self._unmask()
        except SecAggError:
            self._stage = "failed"
            raise
        self._stage = "done"
        return out

    def _collect(self, owner: str, kind: str) -> bytes:
        t = self.params.threshold
        points = self._points.get((kind, owner), {})
        if len(points) < t:
            raise SecAggThresholdError(f"{len(points)} {kind} shares of {owner} came back, "
                                       f"need {t}")
        return combine_shares(points, t)

    def _unmask(self) -> AggregateResult:
        params = self.params
        survivors = sorted(self._survivors)
        dead_keys: dict[str, x25519.X25519PrivateKey] = {}
        for owner in sorted(self._dead_needed(self._survivors)):
            secret = self._collect(owner, "mask-key")
            key = x25519.X25519PrivateKey.from_private_bytes(secret)
            if _raw_public(key) != self.topology.keys[owner].mask_key:
                raise SecAggIntegrityError(f"{owner}'s mask key rebuilt from its shares does not "
                                           "match its attested key", code="bad-reconstruction")
            dead_keys[owner] = key
        total = np.zeros(params.vector_length + 1, dtype=self._dtype)
        for site in survivors:
            seed = self._collect(site, "self-mask")
            if self._ctx.seed_commitment(site, seed) != \
                    self._share_keys[site].self_mask_commitment:
                raise SecAggIntegrityError(f"{site}'s self-mask seed rebuilt from its shares "
                                           "does not match its commitment",
                                           code="bad-reconstruction")
            peers, vector = self._inputs[site]
            total += vector
            total -= mask_stream(self._ctx.self_mask_key(site, seed), len(total),
                                 params.mod_bits)
            for gone in sorted(peers - self._survivors):
                shared = _exchange(dead_keys[gone], self.topology.keys[site].mask_key)
                if shared is None:
                    raise SecAggIntegrityError(f"no pairwise key between {gone} and {site}",
                                               code="bad-reconstruction")
                stream = mask_stream(self._ctx.pair_mask_key(shared, site, gone), len(total),
                                     params.mod_bits)
                if site < gone:
                    total -= stream
                else:
                    total += stream
        signed = total.view(f"<i{self._dtype.itemsize}").astype(np.int64)
        n = len(survivors)
        bound = n * params.max_weight * params.levels
        weight = int(signed[-1])
        if not 0 <= weight <= n * params.max_weight or (
                len(signed) > 1 and int(np.abs(signed[:-1]).max()) > bound):
            raise SecAggIntegrityError("the unmasked sum is out of range: a survivor sent an "
                                       "out-of-range masked input", code="sum-out-of-range")
        log.info("secagg: unmasked the sum of %d survivors (%d dropped after sharing keys)",
                 n, len(self._dead_needed(self._survivors)))
        return AggregateResult(
            weighted_sum=signed[:-1].astype(np.float64) * (params.clip / params.levels),
            total_weight=weight, survivors=tuple(survivors),
            dropped=tuple(s for s in self.topology.sites if s not in self._survivors))


# ----------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArrayLayout:
    """Names, shapes and dtypes of the arrays flattened into one secagg vector."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.entries)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        if vector.shape != (self.size,):
            raise SecAggMessageError(f"vector of {vector.shape} for a layout of {self.size}")
        out, pos = {}, 0
        for name, shape, dtype in self.entries:
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = vector[pos:pos + n].reshape(shape).astype(dtype)
            pos += n
        return out


def flatten_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ArrayLayout]:
    """One float64 vector of named arrays (an update) and the layout to undo it."""
    entries = tuple((name, tuple(np.shape(a)), np.asarray(a).dtype.name)
                    for name, a in arrays.items())
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()]
    return (np.concatenate(parts) if parts else np.zeros(0)), ArrayLayout(entries)
