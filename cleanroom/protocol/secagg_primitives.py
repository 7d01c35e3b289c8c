"""The building blocks of secure aggregation, each a pure function with its own tests.

* Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1). A share's x
  coordinate is the holder's index in the round's roster plus one, so it never travels.
* Masks: AES-256-CTR keystreams (``cryptography``) read as unsigned integers modulo 2^m, with
  a fresh key per (round, seed), so every keystream is used exactly once.
* Keys: X25519 between two attested keys, then HKDF-SHA256 with an ``info`` naming the run,
  the round, the purpose and the two sites; AES-256-GCM for shares sent site to site; HMAC for
  the consistency tags; SHA-256 commitments to shares and self-mask seeds.
* Quantization: clip to [-c, c], scale to integer steps of c/levels, stochastic rounding
  (unbiased, error under one step).
* The neighbour graph: a ring over a hash-derived order of the sites (SecAgg+), or every pair.

Flower's ``flwr.common.secure_aggregation`` was read for the protocol but not called: its
Shamir (pycryptodome, GF(2^128)) takes 1.6 s to combine one secret from 67 shares (measured,
``python -m benchmarks secagg``), its mask generator seeds numpy's Mersenne Twister with 32 bits
folded from the seed, and its share encryption (Fernet) binds no context.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cleanroom.errors import SecAggConfigError, SecAggIntegrityError, SecAggMessageError

FIELD_PRIME = 2**521 - 1  # a Mersenne prime: every 32-byte secret is a field element
SECRET_SIZE = 32
SHARE_SIZE = 66  # big-endian field element
KEY_SIZE = 32
TAG_SIZE = 32
DIGEST_SIZE = 32
NONCE_SIZE = 12
AEAD_OVERHEAD = NONCE_SIZE + 16
DOMAIN = b"cleanroom-fl/secagg/v1"


def length_prefixed(*parts: bytes | str | int) -> bytes:
    """Unambiguous encoding of a tuple: every part length-prefixed (ints as 8 bytes)."""
    chunks = []
    for part in parts:
        if isinstance(part, str):
            raw = part.encode()
        elif isinstance(part, int):
            raw = part.to_bytes(8, "little")
        else:
            raw = bytes(part)
        chunks.append(len(raw).to_bytes(4, "little"))
        chunks.append(raw)
    return b"".join(chunks)


def round_context(run_id: str, round: int) -> bytes:
    """What every key, commitment and tag of one round is bound to."""
    return length_prefixed(DOMAIN, run_id, round)


# ----------------------------------------------------------------------------- Shamir


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, >= 1); any ``threshold`` of them
    give the secret back, fewer give no information about it."""
    if len(secret) != SECRET_SIZE:
        raise SecAggConfigError(f"secret is {len(secret)} bytes, expect {SECRET_SIZE}")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or min(xs) < 1:
        raise SecAggConfigError(f"cannot split into {len(xs)} shares with threshold "
                                f"{threshold}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    coefficients.reverse()  # Horner: highest degree first
    shares = {}
    for x in xs:
        y = 0
        for c in coefficients:
            y = (y * x + c) % FIELD_PRIME
        shares[x] = y.to_bytes(SHARE_SIZE, "big")
    return shares


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients for f(0) from f at ``xs`` (cached: in the full graph every secret
    is rebuilt from the same holders). lambda_j = prod(x_m) / (x_j * prod_{m != j}(x_m - x_j)):
    the denominators are exact products of small integers, inverted together with one
    modular inversion (Montgomery's trick)."""
    numerator = 1
    for x in xs:
        numerator *= x
    numerator %= FIELD_PRIME
    denominators = []
    for j, xj in enumerate(xs):
        d = xj
        for m, xm in enumerate(xs):
            if m != j:
                d *= xm - xj
        denominators.append(d % FIELD_PRIME)
    prefix = [1]
    for d in denominators:
        prefix.append(prefix[-1] * d % FIELD_PRIME)
    inverse = pow(prefix[-1], -1, FIELD_PRIME)
    out = [0] * len(xs)
    for j in range(len(xs) - 1, -1, -1):
        out[j] = numerator * inverse * prefix[j] % FIELD_PRIME  # inverse of denominators[j]
        inverse = inverse * denominators[j] % FIELD_PRIME
    return tuple(out)


def combine_shares(points: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the ``threshold`` lowest x are used).

    SecAggIntegrityError when the result is not a 32-byte secret, i.e. the shares do not lie
    on one polynomial of degree threshold - 1 (a corrupted share or a dishonest dealer).
    """
    if len(points) < threshold:
        raise SecAggIntegrityError(f"{len(points)} shares, need {threshold}")
    chosen = sorted(points.items())[:threshold]
    xs = tuple(x for x, _ in chosen)
    ys = []
    for x, raw in chosen:
        if len(raw) != SHARE_SIZE or x < 1:
            raise SecAggIntegrityError(f"share at x={x} is malformed")
        y = int.from_bytes(raw, "big")
        if y >= FIELD_PRIME:
            raise SecAggIntegrityError(f"share at x={x} is not a field element")
        ys.append(y)
    value = sum(y * c for y, c in zip(ys, _lagrange_at_zero(xs), strict=True)) % FIELD_PRIME
    if value >= 1 << (8 * SECRET_SIZE):
        raise SecAggIntegrityError("shares do not reconstruct a 32-byte secret",
                                   code="bad-reconstruction")
    return value.to_bytes(SECRET_SIZE, "big")


# ----------------------------------------------------------------------------- keys, AEAD, tags


def derive_key(shared_secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of an X25519 shared secret (or a seed) to a 32-byte key for one purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                info=info).derive(shared_secret)


def seal_shares(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; ``key`` is used for this one message (fresh per sender, receiver, round)."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_shares(key: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext does not authenticate under key and aad."""
    if len(ciphertext) < AEAD_OVERHEAD:
        return None
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:], aad)
    except InvalidTag:
        return None


def mac(key: bytes, message: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


def mac_ok(key: bytes, message: bytes, tag: bytes) -> bool:
    return std_hmac.compare_digest(mac(key, message), tag)


def digest(*parts: bytes | str | int) -> bytes:
    """SHA-256 of the length-prefixed parts: commitments to shares, seeds and survivor sets."""
    return hashlib.sha256(length_prefixed(*parts)).digest()


# ----------------------------------------------------------------------------- masks


def mask_dtype(mod_bits: int) -> np.dtype:
    if mod_bits not in (32, 64):
        raise SecAggConfigError(f"mod_bits must be 32 or 64, not {mod_bits}")
    return np.dtype(f"<u{mod_bits // 8}")


def mask_stream(key: bytes, length: int, mod_bits: int) -> np.ndarray:
    """``length`` uniform integers modulo 2^mod_bits: the AES-256-CTR keystream of ``key``."""
    dtype = mask_dtype(mod_bits)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    buffer = bytearray(length * dtype.itemsize)
    encryptor.update_into(bytes(len(buffer)), buffer)
    return np.frombuffer(buffer, dtype=dtype)


# ----------------------------------------------------------------------------- quantization


def quantize(update: np.ndarray, clip: float, levels: int,
             rng: np.random.Generator) -> np.ndarray:
    """Integers in [-levels, levels]: ``clip(update, -c, c) * levels / c`` stochastically
    rounded (E[q] = the scaled value, |q - scaled| < 1)."""
    scaled = np.clip(np.asarray(update, dtype=np.float64), -clip, clip) * (levels / clip)
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return (low + up).astype(np.int64)


def dequantize(values: np.ndarray, clip: float, levels: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) * (clip / levels)


# ----------------------------------------------------------------------------- graph and threshold


def default_threshold(neighbours: int) -> int:
    """floor(2k/3) + 1 of a neighbourhood of k sites (itself included): a strict 2/3 majority,
    so any two sets of t holders share more than k/3 of them."""
    return (2 * neighbours) // 3 + 1


def _tail_at_least(population: int, marked: int, draws: int, at_least: int) -> tuple[int, int]:
    """P[X >= at_least] for X hypergeometric, as an exact fraction (numerator, denominator)."""
    top = sum(math.comb(marked, x) * math.comb(population - marked, draws - x)
              for x in range(max(0, at_least), min(marked, draws) + 1))
    return top, math.comb(population, draws)


@lru_cache(maxsize=256)
def recommended_neighbours(n_sites: int, *, colluding_fraction: float = 0.1,
                           dropout_fraction: float = 0.1, security_bits: int = 40,
                           liveness_bits: int = 20) -> int:
    """Smallest odd neighbourhood size k (self included) of the random ring such that, with a
    fraction ``colluding_fraction`` of colluding sites and ``dropout_fraction`` of dropouts
    placed independently of the ring (each count rounded up), the chance that *some*
    neighbourhood holds 2t - k or more colluders is below 2^-security_bits and the chance that
    some neighbourhood loses more than k - t sites is below 2^-liveness_bits (union bound over
    the n neighbourhoods). Returns ``n_sites`` (every pair) when no smaller k qualifies.
    """
    population = n_sites - 1
    colluders = math.ceil(colluding_fraction * n_sites)
    dropouts = math.ceil(dropout_fraction * n_sites)
    for k in range(3, n_sites, 2):
        t = default_threshold(k)
        top, bottom = _tail_at_least(population, colluders, k - 1, 2 * t - k)
        if n_sites * top * 2**security_bits > bottom:
            continue
        top, bottom = _tail_at_least(population, dropouts, k - 1, k - t + 1)
        if n_sites * top * 2**liveness_bits > bottom:
            continue
        return k
    return n_sites


@dataclass(frozen=True)
class Graph:
    """Who shares masks with whom. ``neighbours == len(sites)``: every pair; otherwise the
    sites sit on a ring in the order of SHA-256(seed || site) and each one's neighbourhood is
    itself and the (k - 1) / 2 sites on either side (a Harary graph, as in SecAgg+)."""

    order: tuple[str, ...]
    neighbours: int
    position: Mapping[str, int]
    _cache: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, sites: Sequence[str], neighbours: int, seed: bytes) -> Graph:
        n = len(sites)
        if neighbours == n:
            order = tuple(sites)
        elif neighbours % 2 == 0 or not 3 <= neighbours < n:
            raise SecAggConfigError(f"a ring neighbourhood must be odd and in [3, {n}), "
                                    f"not {neighbours}")
        else:
            order = tuple(sorted(sites, key=lambda s: hashlib.sha256(seed + s.encode()).digest()))
        return cls(order, neighbours, {s: i for i, s in enumerate(order)})

    def neighbourhood(self, site: str) -> frozenset[str]:
        """The site's neighbourhood, itself included (KeyError for a site not in the graph)."""
        found = self._cache.get(site)
        if found is None:
            n, pos = len(self.order), self.position[site]
            if self.neighbours == n:
                found = self._cache.setdefault("", frozenset(self.order))
            else:
                half = self.neighbours // 2
                found = frozenset(self.order[(pos + o) % n] for o in range(-half, half + 1))
            self._cache[site] = found
        return found


def neighbourhoods(sites: Sequence[str], neighbours: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Every site's neighbourhood (see :class:`Graph`)."""
    graph = Graph.build(sites, neighbours, seed)
    return {s: graph.neighbourhood(s) for s in sites}


def check_site_list(sites: Sequence[str], what: str) -> None:
    if len(set(sites)) != len(sites):
        dupes = sorted({s for s in sites if sites.count(s) > 1})
        raise SecAggMessageError(f"{what} names sites more than once: {dupes[:5]}",
                                 code="duplicate-site")
