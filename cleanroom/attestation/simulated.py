"""A simulated SEV-SNP platform: a consortium-local test chain and a software AMD-SP.

The simulated TEE emits *real* SEV-SNP-layout attestation reports (1184 bytes, ECDSA P-384,
little-endian R/S) signed by a VCEK whose certificate carries AMD's extensions, issued by an
ASK, issued by an ARK, all RSA-PSS/SHA-384 like AMD's. Simulation and production therefore run
the same parser and verifier; only the trusted root differs, and a policy trusts the simulated
root only when it names it (``Policy.simulated_root``, simulation environment only).

The measurement is honest: :func:`measure_code` digests the installed source of the code the
site runs (``site_agent``, the shared ``cleanroom`` package, ``models``), so a site running
modified code produces a different MEASUREMENT and is refused by the allow-list.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from cleanroom.attestation.abi import snp as abi
from cleanroom.attestation.abi.amd_cert import (
    OID_BL_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_STRUCT_VERSION,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    load_certificates,
)
from cleanroom.errors import CertificateError
from cleanroom.fsutil import write_private

SIMULATED_PRODUCT_NAME = "Milan-B0"
ROOT_BUNDLE = "root_chain.pem"  # ARK + ASK certificates (what policies trust)
ARK_KEY = "ark_key.pem"
ASK_KEY = "ask_key.pem"
RSA_BITS = 4096
CERT_LIFETIME = dt.timedelta(days=25 * 365)
VCEK_LIFETIME = dt.timedelta(days=7 * 365)
# Milan CPUID: family 0x19, model 0x01, stepping 0x01
SIM_CPUID = (0x19, 0x01, 0x01)
SIM_FIRMWARE = (1, 55, 21)  # major, minor, build
DEFAULT_GUEST_POLICY = (1 << abi.POLICY_RESERVED_ONE_BIT) | (1 << abi.POLICY_SMT_BIT)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cleanroom FL simulated AMD"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _ca_cert(subject: str, key: rsa.RSAPrivateKey, issuer: str,
             issuer_key: rsa.RSAPrivateKey, now: dt.datetime) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(issuer_key, hashes.SHA384(), rsa_padding=_PSS))


@dataclass(frozen=True)
class SimulatedRoot:
    """The simulated vendor: ARK and ASK with their private keys (kept by the consortium)."""

    ark: x509.Certificate
    ask: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    bundle_path: Path | None = None

    @property
    def bundle_pem(self) -> bytes:
        return self.ark.public_bytes(serialization.Encoding.PEM) + \
            self.ask.public_bytes(serialization.Encoding.PEM)


def create_simulated_root(out_dir: Path, *, rsa_bits: int = RSA_BITS) -> SimulatedRoot:
    """Generate a simulated ARK -> ASK chain into ``out_dir`` (keys mode 0600)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    ark = _ca_cert("ARK-Simulated", ark_key, "ARK-Simulated", ark_key, now)
    ask = _ca_cert("SEV-Simulated", ask_key, "ARK-Simulated", ark_key, now)
    root = SimulatedRoot(ark=ark, ask=ask, ask_key=ask_key, bundle_path=out_dir / ROOT_BUNDLE)
    (out_dir / ROOT_BUNDLE).write_bytes(root.bundle_pem)
    write_private(out_dir / ARK_KEY, _pem(ark_key))
    write_private(out_dir / ASK_KEY, _pem(ask_key))
    return root


def load_simulated_root(out_dir: Path) -> SimulatedRoot:
    """Load a root written by :func:`create_simulated_root` (cached per process and folder)."""
    out_dir = Path(out_dir).resolve()
    try:
        stamp = (out_dir / ASK_KEY).stat().st_mtime_ns
    except OSError:
        stamp = 0
    return _load_simulated_root(out_dir, stamp)


@lru_cache(maxsize=8)
def _load_simulated_root(out_dir: Path, _stamp: int) -> SimulatedRoot:
    try:
        certs = load_certificates((out_dir / ROOT_BUNDLE).read_bytes())
        ask_key = serialization.load_pem_private_key((out_dir / ASK_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot load simulated root from {out_dir}: {exc}") from None
    if not isinstance(ask_key, rsa.RSAPrivateKey) or len(certs) != 2:
        raise CertificateError(f"{out_dir} does not hold a simulated ARK+ASK")
    ark, ask = (certs[0], certs[1]) if certs[0].subject == certs[0].issuer else (certs[1], certs[0])
    return SimulatedRoot(ark=ark, ask=ask, ask_key=ask_key, bundle_path=out_dir / ROOT_BUNDLE)


def ensure_simulated_root(out_dir: Path) -> SimulatedRoot:
    """The simulated root in ``out_dir``, created on first use (under a file lock: several
    processes of one simulation may ask at once)."""
    from cleanroom.fsutil import exclusive_lock

    out_dir = Path(out_dir)
    with exclusive_lock(out_dir / ".create"):
        if (out_dir / ROOT_BUNDLE).exists() and (out_dir / ASK_KEY).exists():
            return load_simulated_root(out_dir)
        return create_simulated_root(out_dir)


# ----------------------------------------------------------------------------- chips


@dataclass(frozen=True)
class SimulatedTcb:
    bootloader: int = 4
    tee: int = 0
    snp: int = 22
    microcode: int = 213

    def encode(self) -> int:
        """Milan/Genoa TCB_VERSION encoding (bytes 0, 1, 6, 7)."""
        b = bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])
        return int.from_bytes(b, "little")


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return bytes([0x02, len(body)]) + body


def _der_ia5(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes([0x16, len(raw)]) + raw


def issue_vcek(root: SimulatedRoot, chip_id: bytes, tcb: SimulatedTcb,
               key: ec.EllipticCurvePrivateKey | None = None,
               ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a simulated VCEK for one chip, carrying AMD's TCB and hwID extensions."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)

    def ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
        return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)

    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SEV-VCEK")]))
               .issuer_name(root.ask.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + VCEK_LIFETIME))
    for oid, value in ((OID_STRUCT_VERSION, _der_int(1)),
                       (OID_PRODUCT_NAME, _der_ia5(SIMULATED_PRODUCT_NAME)),
                       (OID_BL_SPL, _der_int(tcb.bootloader)), (OID_TEE_SPL, _der_int(tcb.tee)),
                       (OID_SNP_SPL, _der_int(tcb.snp)), (OID_UCODE_SPL, _der_int(tcb.microcode)),
                       (OID_HWID, chip_id)):
        builder = builder.add_extension(ext(oid, value), critical=False)
    cert = builder.sign(root.ask_key, hashes.SHA384(), rsa_padding=_PSS)
    return key, cert


TASK_MEASUREMENT_TAG = b"cleanroom-fl/simulated-task-launch/v1\0"


def task_measurement(launch: bytes, task_digest: str) -> bytes:
    """The MEASUREMENT of a simulated enclave launched to run one task: the site agent's launch
    digest folded with the task's digest (as a confidential VM whose image holds both). The
    coordinator derives the same value from its policy's agent digests and the run's task."""
    return hashlib.sha384(TASK_MEASUREMENT_TAG + launch + bytes.fromhex(task_digest)).digest()


def measure_code(roots: Iterable[Path], extra: bytes = b"") -> bytes:
    """48-byte launch digest of the code a site runs: SHA-384 over every ``.py`` file.

    The digest covers each file's path relative to its package root and its SHA-256, in sorted
    order, so it is stable across machines and changes when any byte of the code changes.
    """
    h = hashlib.sha384(b"cleanroom-fl/simulated-launch-digest/v1\0")
    entries: list[tuple[str, bytes]] = []
    for root in roots:
        root = Path(root)
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = f"{root.name}/{path.relative_to(root).as_posix()}"
            entries.append((rel, hashlib.sha256(path.read_bytes()).digest()))
    for rel, digest in sorted(entries):
        h.update(rel.encode() + b"\0" + digest)
    h.update(extra)
    return h.digest()


@dataclass
class SimulatedChip:
    """A software AMD Secure Processor for one site: signs reports with its VCEK.

    ``debug`` sets POLICY.DEBUG (fault injection); ``measurement`` is fixed at launch.
    """

    vcek_key: ec.EllipticCurvePrivateKey
    vcek: x509.Certificate
    chip_id: bytes
    measurement: bytes
    tcb: SimulatedTcb = field(default_factory=SimulatedTcb)
    guest_policy: int = DEFAULT_GUEST_POLICY
    vmpl: int = 0
    host_data: bytes = bytes(abi.HOST_DATA_SIZE)
    version: int = 3

    @classmethod
    def launch(cls, root: SimulatedRoot, measurement: bytes, *, debug: bool = False,
               tcb: SimulatedTcb | None = None, chip_id: bytes | None = None) -> SimulatedChip:
        tcb = tcb or SimulatedTcb()
        chip_id = chip_id or secrets.token_bytes(abi.CHIP_ID_SIZE)
        key, cert = issue_vcek(root, chip_id, tcb)
        policy = DEFAULT_GUEST_POLICY | ((1 << abi.POLICY_DEBUG_BIT) if debug else 0)
        return cls(vcek_key=key, vcek=cert, chip_id=chip_id, measurement=measurement, tcb=tcb,
                   guest_policy=policy)

    @property
    def vcek_pem(self) -> bytes:
        return self.vcek.public_bytes(serialization.Encoding.PEM)

    def report(self, report_data: bytes) -> bytes:
        """A signed 1184-byte ATTESTATION_REPORT binding ``report_data`` (64 bytes)."""
        if len(report_data) != abi.REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {abi.REPORT_DATA_SIZE} bytes")
        if len(self.measurement) != abi.MEASUREMENT_SIZE:
            raise ValueError(f"measurement must be {abi.MEASUREMENT_SIZE} bytes")
        buf = bytearray(abi.REPORT_SIZE)
        tcb = self.tcb.encode()
        struct.pack_into("<I", buf, abi.OFF_VERSION, self.version)
        struct.pack_into("<Q", buf, abi.OFF_POLICY, self.guest_policy)
        struct.pack_into("<I", buf, abi.OFF_VMPL, self.vmpl)
        struct.pack_into("<I", buf, abi.OFF_SIGNATURE_ALGO, abi.SIGNATURE_ALGO_ECDSA_P384_SHA384)
        for off in (abi.OFF_CURRENT_TCB, abi.OFF_REPORTED_TCB, abi.OFF_COMMITTED_TCB,
                    abi.OFF_LAUNCH_TCB):
            struct.pack_into("<Q", buf, off, tcb)
        struct.pack_into("<Q", buf, abi.OFF_PLATFORM_INFO, 1 << abi.PLATFORM_SMT_EN_BIT)
        struct.pack_into("<I", buf, abi.OFF_SIGNER_INFO, 0)  # SIGNING_KEY = VCEK
        buf[abi.OFF_REPORT_DATA:abi.OFF_REPORT_DATA + abi.REPORT_DATA_SIZE] = report_data
        buf[abi.OFF_MEASUREMENT:abi.OFF_MEASUREMENT + abi.MEASUREMENT_SIZE] = self.measurement
        buf[abi.OFF_HOST_DATA:abi.OFF_HOST_DATA + abi.HOST_DATA_SIZE] = self.host_data
        buf[abi.OFF_REPORT_ID:abi.OFF_REPORT_ID + abi.REPORT_ID_SIZE] = \
            hashlib.sha256(self.chip_id + self.measurement).digest()
        if self.version >= 3:
            buf[abi.OFF_CPUID_FAM_ID], buf[abi.OFF_CPUID_MOD_ID], buf[abi.OFF_CPUID_STEP] = \
                SIM_CPUID
        buf[abi.OFF_CHIP_ID:abi.OFF_CHIP_ID + abi.CHIP_ID_SIZE] = self.chip_id
        major, minor, build = SIM_FIRMWARE
        for off in (abi.OFF_CURRENT_BUILD, abi.OFF_COMMITTED_BUILD):
            buf[off], buf[off + 1], buf[off + 2] = build, minor, major
        der = self.vcek_key.sign(bytes(buf[:abi.SIGNED_LENGTH]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        size = abi.ECDSA_P384_COMPONENT_SIZE
        buf[abi.OFF_SIGNATURE:abi.OFF_SIGNATURE + size] = r.to_bytes(size, "little")
        buf[abi.OFF_SIGNATURE + size:abi.OFF_SIGNATURE + 2 * size] = s.to_bytes(size, "little")
        return bytes(buf)

    def derived_key(self, label: bytes, *, bind_measurement: bool = False) -> bytes:
        """A 32-byte key only this chip can derive (like SNP's MSG_KEY_REQ derived key).

        By default it mixes in the guest's FAMILY_ID and IMAGE_ID, not its MEASUREMENT, as a
        real guest selects with GUEST_FIELD_SELECT for state that must survive an approved
        software update (the privacy ledger must not be lost on upgrade). With
        ``bind_measurement`` code with another measurement derives another key.
        """
        secret = self.vcek_key.private_numbers().private_value.to_bytes(48, "big")
        salt = bytes(abi.FAMILY_ID_SIZE + abi.IMAGE_ID_SIZE)  # FAMILY_ID || IMAGE_ID (zero)
        if bind_measurement:
            salt += self.measurement
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                    info=b"cleanroom-fl/sealing-key/v1\0" + label).derive(secret)
