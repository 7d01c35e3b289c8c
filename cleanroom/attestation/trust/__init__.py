"""What the verifier trusts, in one place.

The vendor roots are PEM files shipped inside this package (see ``PROVENANCE.md`` beside them):
AMD ARK and ASK (VCEK chain) and ASVK (VLEK chain) for Milan, Genoa and Turin, and the Intel SGX
Root CA that anchors TDX DCAP quotes. They are never fetched from the network and never taken
from the evidence. A simulated (consortium test) root is trusted only when a policy names it.

Also pinned here: the identity of Intel's TD Quoting Enclave (:func:`intel_td_qe_identity`),
checked against every TDX quote verified without collateral, so that an enclave the host
controls cannot pose as the quoting enclave (provenance in ``PROVENANCE.md``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cleanroom.attestation.abi.amd_cert import MAX_CERT_BYTES, load_certificates
from cleanroom.attestation.abi.snp import Product
from cleanroom.attestation.abi.tdx_collateral import QeIdentityValues
from cleanroom.config import read_bounded
from cleanroom.errors import CertificateError

log = logging.getLogger(__name__)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class AmdChain:
    """An AMD root (ARK) and the intermediate that signs VCEKs (ASK) or VLEKs (ASVK)."""

    name: str  # e.g. "amd-milan-vcek" or "simulated-<fingerprint prefix>"
    product: Product
    signing_key: str  # "vcek" | "vlek"
    ark: x509.Certificate
    intermediate: x509.Certificate
    simulated: bool = False


def _read_package_pem(filename: str) -> x509.Certificate:
    data = resources.files(__name__).joinpath(filename).read_bytes()
    certs = load_certificates(data)
    if len(certs) != 1:
        raise CertificateError(f"pinned root file {filename} must hold exactly one certificate")
    return certs[0]


@lru_cache(maxsize=1)
def amd_chains() -> tuple[AmdChain, ...]:
    """Every pinned AMD chain (ARK + ASK/ASVK) shipped in the package."""
    chains: list[AmdChain] = []
    for product in Product:
        stem = f"amd_{product.value.lower()}"
        if not resources.files(__name__).joinpath(f"{stem}_ark.pem").is_file():
            log.error("no pinned AMD ARK for %s: its evidence cannot verify", product.value)
            continue
        ark = _read_package_pem(f"{stem}_ark.pem")
        for key, inter in (("vcek", "ask"), ("vlek", "asvk")):
            filename = f"{stem}_{inter}.pem"
            if not resources.files(__name__).joinpath(filename).is_file():
                continue
            chains.append(AmdChain(name=f"amd-{product.value.lower()}-{key}", product=product,
                                   signing_key=key, ark=ark,
                                   intermediate=_read_package_pem(filename)))
    return tuple(chains)


@lru_cache(maxsize=1)
def intel_sgx_root() -> x509.Certificate:
    """The pinned Intel SGX Root CA (anchor of the PCK chain in TDX quotes)."""
    return _read_package_pem("intel_sgx_root_ca.pem")


# Intel's TD Quoting Enclave identity: the identity fields of Intel PCS "enclaveIdentity" id TD_QE,
# version 2 (tcbEvaluationDataNumber 17), as Intel signed them (see PROVENANCE.md). They name the
# enclave, not a TCB level, and have not changed across the PCS documents we have seen; a quote
# verified with collateral is checked against the collateral's signed identity instead.
INTEL_TD_QE_MRSIGNER = bytes.fromhex(
    "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
INTEL_TD_QE_ISVPRODID = 2
INTEL_TD_QE_MISCSELECT = bytes.fromhex("00000000")
INTEL_TD_QE_MISCSELECT_MASK = bytes.fromhex("ffffffff")
INTEL_TD_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
INTEL_TD_QE_ATTRIBUTES_MASK = bytes.fromhex("fbffffffffffffff0000000000000000")


def intel_td_qe_identity() -> QeIdentityValues:
    """Intel's TD Quoting Enclave identity, pinned (checked when a quote has no collateral)."""
    return QeIdentityValues(
        mrsigner=INTEL_TD_QE_MRSIGNER, isvprodid=INTEL_TD_QE_ISVPRODID,
        miscselect=INTEL_TD_QE_MISCSELECT, miscselect_mask=INTEL_TD_QE_MISCSELECT_MASK,
        attributes=INTEL_TD_QE_ATTRIBUTES, attributes_mask=INTEL_TD_QE_ATTRIBUTES_MASK,
        source="Intel's TD_QE identity pinned in this package")


def load_simulated_chain(path: Path) -> tuple[AmdChain, ...]:
    """Load a simulated ARK+ASK bundle written by ``cleanroom attest simulate-root``.

    The bundle holds the simulated ARK and ASK (PEM). It is named by the ARK's fingerprint so
    the verdict says exactly which simulated root anchored a chain.
    """
    data = read_bounded(Path(path), MAX_CERT_BYTES, what="simulated root",
                        error=CertificateError)
    certs = load_certificates(data)
    roots = [c for c in certs if c.issuer == c.subject]
    inters = [c for c in certs if c.issuer != c.subject]
    if len(roots) != 1 or len(inters) != 1:
        raise CertificateError(f"simulated root bundle {path} must hold one ARK and one ASK")
    ark, ask = roots[0], inters[0]
    product = Product.MILAN
    name = f"simulated-{fingerprint(ark)[:16]}"
    return (AmdChain(name=name, product=product, signing_key="vcek", ark=ark,
                     intermediate=ask, simulated=True),)


def validity_problem(cert: x509.Certificate, at: dt.datetime, what: str) -> str | None:
    """None when ``at`` is inside the certificate's validity window, else the reason."""
    if at < cert.not_valid_before_utc:
        return f"{what} is not valid before {cert.not_valid_before_utc.isoformat()} " \
               f"(verification time {at.isoformat()})"
    if at > cert.not_valid_after_utc:
        return f"{what} expired {cert.not_valid_after_utc.isoformat()} " \
               f"(verification time {at.isoformat()})"
    return None
