"""End-to-end encryption of models and updates: HPKE (RFC 9180) from ``cryptography``.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, single-shot base mode. The HPKE
``info`` carries the full context (direction, run, round, site, model digest), so a ciphertext
opened in any other context fails authentication: a model for site A cannot be decrypted as a
model for site B, an update from round 3 cannot be replayed as round 4, and an update computed
from another global model is refused.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from cleanroom.errors import EnvelopeError

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
SUITE_NAME = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/AES-256-GCM"
INFO_TAG = b"cleanroom-fl/envelope/v1"
PUBLIC_KEY_SIZE = 32
MAX_CIPHERTEXT = 512 * 1024 * 1024

Direction = Literal["model", "update", "evaluate", "metrics"]


@dataclass(frozen=True)
class EnvelopeContext:
    """What a ciphertext is bound to."""

    direction: Direction
    run_id: str
    round: int
    site: str
    model_digest: str  # hex SHA-256 of the global model of this round

    def info(self) -> bytes:
        parts = (INFO_TAG, self.direction.encode(), self.run_id.encode(),
                 struct.pack("<Q", self.round), self.site.encode(),
                 bytes.fromhex(self.model_digest))
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class KeyPair:
    """An ephemeral X25519 key pair (one per site per round, one per coordinator round)."""

    private_key: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        try:
            return cls(x25519.X25519PrivateKey.from_private_bytes(raw))
        except ValueError:
            raise EnvelopeError("not a 32-byte X25519 private key") from None

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        """Raw private key, for sealing into the site's store only; never log or send this."""
        return self.private_key.private_bytes(serialization.Encoding.Raw,
                                              serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())


def load_public_key(raw: bytes) -> x25519.X25519PublicKey:
    if len(raw) != PUBLIC_KEY_SIZE:
        raise EnvelopeError(f"public key is {len(raw)} bytes, expect {PUBLIC_KEY_SIZE}")
    try:
        return x25519.X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise EnvelopeError("not an X25519 public key") from None


def seal(plaintext: bytes, recipient_public_key: bytes, context: EnvelopeContext) -> bytes:
    """Encrypt to the recipient's raw X25519 public key, bound to ``context``."""
    return SUITE.encrypt(plaintext, load_public_key(recipient_public_key), info=context.info())


def open_sealed(ciphertext: bytes, recipient: KeyPair, context: EnvelopeContext) -> bytes:
    """Decrypt; EnvelopeError if the key, the context or any byte is wrong."""
    if len(ciphertext) > MAX_CIPHERTEXT:
        raise EnvelopeError(f"ciphertext of {len(ciphertext)} bytes exceeds the limit")
    try:
        return SUITE.decrypt(ciphertext, recipient.private_key, info=context.info())
    except (InvalidTag, ValueError):
        raise EnvelopeError(f"cannot open {context.direction} envelope for site "
                            f"{context.site!r} round {context.round}: wrong key, wrong context "
                            "or tampered ciphertext") from None


def ciphertext_digest(ciphertext: bytes) -> str:
    """What the audit chain records about a ciphertext: its SHA-256, never its bytes."""
    return hashlib.sha256(ciphertext).hexdigest()
