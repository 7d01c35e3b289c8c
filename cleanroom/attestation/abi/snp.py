"""AMD SEV-SNP attestation report: bytes -> typed, immutable structure, and nothing else.

Layout: AMD SEV Secure Nested Paging Firmware ABI Specification (pub. 56860), Table
"ATTESTATION_REPORT Structure". Every offset and size is a named constant below. The parser is
strict about lengths and known fields and raises :class:`ParseError` naming the field; it makes
no judgement about whether the values are acceptable (that is the validate layer's job) and does
not check the signature (the verify layer's job).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cleanroom.attestation.abi._le import raw as _bytes
from cleanroom.attestation.abi._le import u32 as _u32
from cleanroom.attestation.abi._le import u64 as _u64
from cleanroom.errors import ParseError, UnsupportedFormatError

REPORT_SIZE = 0x4A0  # 1184 bytes
SIGNED_LENGTH = 0x2A0  # the signature covers bytes [0, 0x2A0)

OFF_VERSION = 0x00
OFF_GUEST_SVN = 0x04
OFF_POLICY = 0x08
OFF_FAMILY_ID = 0x10
OFF_IMAGE_ID = 0x20
OFF_VMPL = 0x30
OFF_SIGNATURE_ALGO = 0x34
OFF_CURRENT_TCB = 0x38
OFF_PLATFORM_INFO = 0x40
OFF_SIGNER_INFO = 0x48
OFF_REPORT_DATA = 0x50
OFF_MEASUREMENT = 0x90
OFF_HOST_DATA = 0xC0
OFF_ID_KEY_DIGEST = 0xE0
OFF_AUTHOR_KEY_DIGEST = 0x110
OFF_REPORT_ID = 0x140
OFF_REPORT_ID_MA = 0x160
OFF_REPORTED_TCB = 0x180
OFF_CPUID_FAM_ID = 0x188  # version >= 3
OFF_CPUID_MOD_ID = 0x189
OFF_CPUID_STEP = 0x18A
OFF_CHIP_ID = 0x1A0
OFF_COMMITTED_TCB = 0x1E0
OFF_CURRENT_BUILD = 0x1E8
OFF_COMMITTED_BUILD = 0x1EC
OFF_LAUNCH_TCB = 0x1F0
OFF_LAUNCH_MIT_VECTOR = 0x1F8  # version >= 5
OFF_CURRENT_MIT_VECTOR = 0x200  # version >= 5
OFF_SIGNATURE = 0x2A0

FAMILY_ID_SIZE = 16
IMAGE_ID_SIZE = 16
REPORT_DATA_SIZE = 64
MEASUREMENT_SIZE = 48
HOST_DATA_SIZE = 32
KEY_DIGEST_SIZE = 48
REPORT_ID_SIZE = 32
CHIP_ID_SIZE = 64
SIGNATURE_SIZE = 512
ECDSA_P384_COMPONENT_SIZE = 72  # R and S are 72-byte little-endian fields (only 48 bytes used)
P384_ORDER = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                 "581a0db248b0a77aecec196accc52973", 16)  # n of NIST P-384 (FIPS 186-4)

MIN_VERSION = 2
MAX_VERSION = 5
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
MAX_VMPL = 3

# GUEST POLICY bits (ABI spec, "Guest Policy Structure")
POLICY_ABI_MINOR_MASK = 0xFF
POLICY_ABI_MAJOR_SHIFT = 8
POLICY_SMT_BIT = 16
POLICY_RESERVED_ONE_BIT = 17  # must be 1
POLICY_MIGRATE_MA_BIT = 18
POLICY_DEBUG_BIT = 19
POLICY_SINGLE_SOCKET_BIT = 20
POLICY_CXL_ALLOW_BIT = 21
POLICY_MEM_AES_256_XTS_BIT = 22
POLICY_RAPL_DIS_BIT = 23
POLICY_CIPHERTEXT_HIDING_BIT = 24
POLICY_PAGE_SWAP_DISABLE_BIT = 25

# PLATFORM_INFO bits
PLATFORM_SMT_EN_BIT = 0
PLATFORM_TSME_EN_BIT = 1
PLATFORM_ECC_EN_BIT = 2
PLATFORM_RAPL_DIS_BIT = 3
PLATFORM_CIPHERTEXT_HIDING_EN_BIT = 4
PLATFORM_ALIAS_CHECK_COMPLETE_BIT = 5
PLATFORM_TIO_EN_BIT = 7

# SIGNER_INFO (offset 0x48) bits
SIGNER_AUTHOR_KEY_EN_BIT = 0
SIGNER_MASK_CHIP_KEY_BIT = 1
SIGNER_SIGNING_KEY_SHIFT = 2
SIGNER_SIGNING_KEY_MASK = 0b111


class SigningKey(enum.Enum):
    """Which key signed the report (SIGNER_INFO.SIGNING_KEY)."""

    VCEK = 0
    VLEK = 1
    NONE = 7

    @property
    def label(self) -> str:
        return self.name.lower()


class Product(enum.Enum):
    """AMD EPYC generations that implement SEV-SNP."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @classmethod
    def from_name(cls, name: str) -> Product:
        # VCEK productName extension values look like "Milan-B0", "Genoa-B1", "Turin-C0".
        base = name.split("-", 1)[0].strip().lower()
        for product in cls:
            if product.value.lower() == base:
                return product
        raise UnsupportedFormatError("product", f"unknown AMD product {name!r}")

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> Product | None:
        """Product from the CPUID family/model a version >= 3 report carries (None if unknown)."""
        if family == 0x19 and model <= 0x0F:
            return cls.MILAN
        if family == 0x19 and 0x10 <= model <= 0x1F:
            return cls.GENOA
        if family == 0x19 and 0xA0 <= model <= 0xAF:  # Genoa-X / Bergamo / Siena
            return cls.GENOA
        if family == 0x1A and model <= 0x1F:
            return cls.TURIN
        return None


@dataclass(frozen=True)
class TcbVersion:
    """Security patch levels of one TCB_VERSION field.

    The 64-bit encoding differs between generations: Milan and Genoa store
    BOOTLOADER, TEE, SNP, MICROCODE in bytes 0, 1, 6, 7; Turin stores FMC, BOOTLOADER, TEE, SNP,
    MICROCODE in bytes 0, 1, 2, 3, 7. ``fmc`` is None before Turin.
    """

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, product: Product) -> TcbVersion:
        b = raw.to_bytes(8, "little")
        if product is Product.TURIN:
            return cls(raw=raw, fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
        return cls(raw=raw, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def components(self) -> dict[str, int]:
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp,
               "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.components().items())


@dataclass(frozen=True)
class GuestPolicy:
    """Decoded GUEST POLICY (offset 0x08)."""

    raw: int

    def _bit(self, bit: int) -> bool:
        return bool((self.raw >> bit) & 1)

    @property
    def abi_minor(self) -> int:
        return self.raw & POLICY_ABI_MINOR_MASK

    @property
    def abi_major(self) -> int:
        return (self.raw >> POLICY_ABI_MAJOR_SHIFT) & 0xFF

    @property
    def smt_allowed(self) -> bool:
        return self._bit(POLICY_SMT_BIT)

    @property
    def migrate_ma(self) -> bool:
        return self._bit(POLICY_MIGRATE_MA_BIT)

    @property
    def debug(self) -> bool:
        return self._bit(POLICY_DEBUG_BIT)

    @property
    def single_socket(self) -> bool:
        return self._bit(POLICY_SINGLE_SOCKET_BIT)

    @property
    def cxl_allowed(self) -> bool:
        return self._bit(POLICY_CXL_ALLOW_BIT)

    @property
    def mem_aes_256_xts(self) -> bool:
        return self._bit(POLICY_MEM_AES_256_XTS_BIT)

    @property
    def rapl_disabled(self) -> bool:
        return self._bit(POLICY_RAPL_DIS_BIT)

    @property
    def ciphertext_hiding(self) -> bool:
        return self._bit(POLICY_CIPHERTEXT_HIDING_BIT)

    @property
    def page_swap_disabled(self) -> bool:
        return self._bit(POLICY_PAGE_SWAP_DISABLE_BIT)

    def describe(self) -> dict[str, object]:
        return {
            "abi": f"{self.abi_major}.{self.abi_minor}", "smt": self.smt_allowed,
            "migrate_ma": self.migrate_ma, "debug": self.debug,
            "single_socket": self.single_socket, "cxl_allowed": self.cxl_allowed,
            "mem_aes_256_xts": self.mem_aes_256_xts, "rapl_disabled": self.rapl_disabled,
            "ciphertext_hiding": self.ciphertext_hiding,
            "page_swap_disabled": self.page_swap_disabled,
        }


@dataclass(frozen=True)
class PlatformInfo:
    """Decoded PLATFORM_INFO (offset 0x40)."""

    raw: int

    def describe(self) -> dict[str, bool]:
        names = {
            "smt_enabled": PLATFORM_SMT_EN_BIT, "tsme_enabled": PLATFORM_TSME_EN_BIT,
            "ecc_enabled": PLATFORM_ECC_EN_BIT, "rapl_disabled": PLATFORM_RAPL_DIS_BIT,
            "ciphertext_hiding_enabled": PLATFORM_CIPHERTEXT_HIDING_EN_BIT,
            "alias_check_complete": PLATFORM_ALIAS_CHECK_COMPLETE_BIT,
            "tio_enabled": PLATFORM_TIO_EN_BIT,
        }
        return {k: bool((self.raw >> b) & 1) for k, b in names.items()}


@dataclass(frozen=True)
class SnpSignature:
    """ECDSA P-384 signature; R and S as integers (decoded from little-endian fields)."""

    r: int
    s: int


@dataclass(frozen=True)
class SnpReport:
    """A parsed SEV-SNP ATTESTATION_REPORT. ``raw`` keeps the exact 1184 bytes."""

    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb_raw: int
    platform_info: PlatformInfo
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb_raw: int
    cpuid_family: int | None
    cpuid_model: int | None
    cpuid_stepping: int | None
    chip_id: bytes
    committed_tcb_raw: int
    current_version: tuple[int, int, int]  # (major, minor, build)
    committed_version: tuple[int, int, int]
    launch_tcb_raw: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature: SnpSignature

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_LENGTH]

    @property
    def debug(self) -> bool:
        return self.policy.debug

    @property
    def product_hint(self) -> Product | None:
        """Product from the report's own CPUID fields (version >= 3 only)."""
        if self.cpuid_family is None or self.cpuid_model is None:
            return None
        return Product.from_cpuid(self.cpuid_family, self.cpuid_model)

    def tcb(self, which: str, product: Product) -> TcbVersion:
        raw = {"current": self.current_tcb_raw, "reported": self.reported_tcb_raw,
               "committed": self.committed_tcb_raw, "launch": self.launch_tcb_raw}[which]
        return TcbVersion.decode(raw, product)


def parse_report(data: bytes) -> SnpReport:
    """Parse exactly one SEV-SNP attestation report.

    ``data`` must be exactly :data:`REPORT_SIZE` bytes (an ``SNP_GUEST_REQUEST`` response buffer
    should be cut by the caller, e.g. the configfs-tsm provider). Raises :class:`ParseError`
    naming the offending field.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError("report", f"expected bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) != REPORT_SIZE:
        raise ParseError("report", f"length is {len(buf)} bytes, expect {REPORT_SIZE}")

    version = _u32(buf, OFF_VERSION)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise UnsupportedFormatError(
            "VERSION", f"is {version}, expect {MIN_VERSION}..{MAX_VERSION}")
    signature_algo = _u32(buf, OFF_SIGNATURE_ALGO)
    if signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise ParseError("SIGNATURE_ALGO",
                         f"is {signature_algo}, expect {SIGNATURE_ALGO_ECDSA_P384_SHA384} "
                         "(ECDSA P-384 with SHA-384)")
    vmpl = _u32(buf, OFF_VMPL)
    if vmpl > MAX_VMPL:
        raise ParseError("VMPL", f"is {vmpl}, expect 0..{MAX_VMPL}")
    policy_raw = _u64(buf, OFF_POLICY)
    if not (policy_raw >> POLICY_RESERVED_ONE_BIT) & 1:
        raise ParseError("POLICY", f"is {policy_raw:#x}: reserved bit 17 must be 1")
    signer_info = _u32(buf, OFF_SIGNER_INFO)
    signing_key_code = (signer_info >> SIGNER_SIGNING_KEY_SHIFT) & SIGNER_SIGNING_KEY_MASK
    try:
        signing_key = SigningKey(signing_key_code)
    except ValueError:
        raise ParseError("SIGNING_KEY", f"is {signing_key_code}, expect 0 (VCEK), 1 (VLEK) "
                                        "or 7 (none)") from None

    sig = _bytes(buf, OFF_SIGNATURE, SIGNATURE_SIZE)
    r = int.from_bytes(sig[:ECDSA_P384_COMPONENT_SIZE], "little")
    s = int.from_bytes(sig[ECDSA_P384_COMPONENT_SIZE:2 * ECDSA_P384_COMPONENT_SIZE], "little")

    has_cpuid = version >= 3
    has_mit = version >= 5

    def fw(off: int) -> tuple[int, int, int]:
        build, minor, major = buf[off], buf[off + 1], buf[off + 2]
        return (major, minor, build)

    return SnpReport(
        raw=buf,
        version=version,
        guest_svn=_u32(buf, OFF_GUEST_SVN),
        policy=GuestPolicy(policy_raw),
        family_id=_bytes(buf, OFF_FAMILY_ID, FAMILY_ID_SIZE),
        image_id=_bytes(buf, OFF_IMAGE_ID, IMAGE_ID_SIZE),
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb_raw=_u64(buf, OFF_CURRENT_TCB),
        platform_info=PlatformInfo(_u64(buf, OFF_PLATFORM_INFO)),
        author_key_en=bool((signer_info >> SIGNER_AUTHOR_KEY_EN_BIT) & 1),
        mask_chip_key=bool((signer_info >> SIGNER_MASK_CHIP_KEY_BIT) & 1),
        signing_key=signing_key,
        report_data=_bytes(buf, OFF_REPORT_DATA, REPORT_DATA_SIZE),
        measurement=_bytes(buf, OFF_MEASUREMENT, MEASUREMENT_SIZE),
        host_data=_bytes(buf, OFF_HOST_DATA, HOST_DATA_SIZE),
        id_key_digest=_bytes(buf, OFF_ID_KEY_DIGEST, KEY_DIGEST_SIZE),
        author_key_digest=_bytes(buf, OFF_AUTHOR_KEY_DIGEST, KEY_DIGEST_SIZE),
        report_id=_bytes(buf, OFF_REPORT_ID, REPORT_ID_SIZE),
        report_id_ma=_bytes(buf, OFF_REPORT_ID_MA, REPORT_ID_SIZE),
        reported_tcb_raw=_u64(buf, OFF_REPORTED_TCB),
        cpuid_family=buf[OFF_CPUID_FAM_ID] if has_cpuid else None,
        cpuid_model=buf[OFF_CPUID_MOD_ID] if has_cpuid else None,
        cpuid_stepping=buf[OFF_CPUID_STEP] if has_cpuid else None,
        chip_id=_bytes(buf, OFF_CHIP_ID, CHIP_ID_SIZE),
        committed_tcb_raw=_u64(buf, OFF_COMMITTED_TCB),
        current_version=fw(OFF_CURRENT_BUILD),
        committed_version=fw(OFF_COMMITTED_BUILD),
        launch_tcb_raw=_u64(buf, OFF_LAUNCH_TCB),
        launch_mit_vector=_u64(buf, OFF_LAUNCH_MIT_VECTOR) if has_mit else None,
        current_mit_vector=_u64(buf, OFF_CURRENT_MIT_VECTOR) if has_mit else None,
        signature=SnpSignature(r=r, s=s),
    )


def canonical_bytes(report: SnpReport) -> bytes:
    """The report's canonical encoding: the signed bytes [0, 0x2A0), then R and S (72 bytes
    each, big endian) with S in low-S form (min(s, n - s)).

    The reserved rest of the 512-byte signature field is not signed and is left out, and
    (r, n - s), which verifies as well as (r, s), encodes the same: one report, one encoding.
    """
    s = report.signature.s
    if 0 < s < P384_ORDER and s > P384_ORDER // 2:
        s = P384_ORDER - s
    return report.signed_bytes + report.signature.r.to_bytes(ECDSA_P384_COMPONENT_SIZE, "big") \
        + s.to_bytes(ECDSA_P384_COMPONENT_SIZE, "big")


def looks_like_report(data: bytes) -> bool:
    """Cheap format sniff used by evidence detection (no exceptions)."""
    if len(data) != REPORT_SIZE:
        return False
    version = _u32(data, OFF_VERSION)
    return MIN_VERSION <= version <= MAX_VERSION + 16 and \
        _u32(data, OFF_SIGNATURE_ALGO) == SIGNATURE_ALGO_ECDSA_P384_SHA384
