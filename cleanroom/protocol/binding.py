"""The report_data binding: what a site's evidence must commit to, computed by both sides.

``report_data = SHA-512(tag || run || round || site || nonce || site key || model digest ||
node key || ledger state || ledger head at the anchor || task digest || dataset digest and rows ||
update-signing key)``
with every field length-prefixed, so no two different tuples hash the same input.
The coordinator recomputes it from *its own* challenge and compares it to the hardware
report_data (constant time); a stale nonce, a replayed report, another site's key or another
model all change it. The ledger state (records in the site's sealed privacy ledger and its head
hash) comes from inside the enclave too, so the coordinator can refuse a site whose ledger went
backwards (a restored old copy: see ``coordinator.watermarks``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

DOMAIN_TAG = b"cleanroom-fl/attestation-binding/v3"
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64


def _field(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


@dataclass(frozen=True)
class Binding:
    """Everything the evidence binds for one (run, round, site) challenge."""

    run_id: str
    round: int
    site: str
    nonce: bytes
    site_public_key: bytes  # raw HPKE public key of the site's ephemeral key pair
    model_digest: str  # hex SHA-256 of the global model the site is about to receive
    node_public_key: bytes = b""  # Flower node identity key (deployment), empty in simulation
    ledger_records: int = 0  # records in the site's sealed privacy ledger
    ledger_head: str = "0" * 64  # hex SHA-256 head of that ledger's hash chain
    ledger_anchor_head: str = ""  # its head at the coordinator's anchor count ("" if none)
    task_digest: str = ""  # the task the site will run (hex), "" if none
    dataset_digest: str = ""  # the registered dataset it serves the task from (hex), "" if none
    dataset_rows: int = 0  # that dataset's training rows
    update_signer: bytes = b""  # raw Ed25519 key that signs the site's update and reports
    secagg_keys: bytes = b""  # SecAggAdvertisement.digest() of its secure-aggregation keys

    def report_data(self) -> bytes:
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        h = hashlib.sha512(_field(DOMAIN_TAG))
        for part in (self.run_id.encode(), struct.pack("<Q", self.round), self.site.encode(),
                     self.nonce, self.site_public_key, bytes.fromhex(self.model_digest),
                     self.node_public_key,
                     struct.pack("<Q", self.ledger_records) + bytes.fromhex(self.ledger_head),
                     bytes.fromhex(self.ledger_anchor_head), bytes.fromhex(self.task_digest),
                     bytes.fromhex(self.dataset_digest) + struct.pack("<Q", self.dataset_rows),
                     self.update_signer, self.secagg_keys):
            h.update(_field(part))
        digest = h.digest()
        assert len(digest) == REPORT_DATA_SIZE
        return digest


AGGREGATOR_TAG = b"cleanroom-fl/aggregator-binding/v1"


@dataclass(frozen=True)
class AggregatorBinding:
    """What the aggregator's evidence binds for one site and round: the site's own fresh
    nonce (its challenge to the aggregator), the round key the site will seal its update to,
    and the model it is about to train. The site recomputes it and compares."""

    run_id: str
    round: int
    site: str
    site_nonce: bytes
    aggregator_public_key: bytes
    model_digest: str

    def report_data(self) -> bytes:
        if len(self.site_nonce) != NONCE_SIZE:
            raise ValueError(f"site nonce must be {NONCE_SIZE} bytes")
        h = hashlib.sha512(_field(AGGREGATOR_TAG))
        for part in (self.run_id.encode(), struct.pack("<Q", self.round), self.site.encode(),
                     self.site_nonce, self.aggregator_public_key,
                     bytes.fromhex(self.model_digest)):
            h.update(_field(part))
        return h.digest()
