"""Enclave providers: where a site (or the coordinator's aggregator) gets its TEE evidence and
its sealing key.

* :class:`ConfigfsTsmProvider` - Linux configfs-tsm (``/sys/kernel/config/tsm/report``), the
  kernel interface that serves both SEV-SNP (provider ``sev_guest``) and TDX (``tdx_guest``)
  guests. It writes the 64-byte report_data to ``inblob`` and reads ``outblob`` (the report or
  quote) and, for SNP, ``auxblob`` (the host-provided certificate table holding the VCEK).
* :class:`SimulatedProvider` - the simulated TEE (:mod:`cleanroom.attestation.simulated`),
  for development and the simulation; same report format, simulated root.

A provider never decides whether its evidence is good; the coordinator does.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cleanroom.attestation.abi import snp_cert_table as cert_table
from cleanroom.attestation.abi.amd_cert import load_certificates, pick_key_certificate
from cleanroom.attestation.abi.snp_cert_table import GUID_ARK as GUID_ARK  # re-exported
from cleanroom.attestation.abi.snp_cert_table import GUID_ASK as GUID_ASK  # re-exported
from cleanroom.attestation.abi.snp_cert_table import GUID_VCEK, GUID_VLEK
from cleanroom.attestation.simulated import (
    SimulatedChip,
    SimulatedRoot,
    SimulatedTcb,
    issue_vcek,
)
from cleanroom.errors import CleanroomError, ParseError
from cleanroom.fsutil import write_private
from cleanroom.sev_guest import IoctlFn, SevGuestError, field_select, get_derived_key

log = logging.getLogger(__name__)

REPORT_DATA_SIZE = 64
DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
MAX_BLOB = 64 * 1024

class EnclaveError(CleanroomError):
    """The enclave provider could not produce evidence or a key."""


@dataclass(frozen=True)
class Evidence:
    """What a site sends to prove its enclave: the raw report/quote and its endorsement."""

    format: str  # "sev-snp" | "tdx"
    data: bytes
    endorsement: bytes = b""  # SNP: VCEK/VLEK (PEM or DER); TDX: empty (PCK chain is inside)
    provider: str = ""


class EnclaveProvider(Protocol):
    """Interface of every provider."""

    name: str

    def evidence(self, report_data: bytes) -> Evidence: ...

    def sealing_key(self, label: bytes) -> bytes: ...

    def for_task(self, task_digest: str) -> EnclaveProvider:
        """The enclave that runs ``task_digest``: a simulated enclave is launched per task
        (its MEASUREMENT covers agent and task); a real one is the image that was launched,
        and the task is bound through REPORT_DATA."""
        ...


# ----------------------------------------------------------------------------- configfs-tsm


def parse_cert_table(aux: bytes) -> dict[uuid.UUID, bytes]:
    """The host's SNP certificate table (:mod:`cleanroom.attestation.abi.snp_cert_table`) as
    ``{GUID: certificate bytes}``; a malformed table is an :class:`EnclaveError`."""
    try:
        return cert_table.parse_cert_table(aux).as_dict()
    except ParseError as exc:
        raise EnclaveError(f"auxblob certificate table: {exc}") from None


class TsmFs:
    """The file operations on a configfs-tsm report entry (the kernel reacts to them).

    Kept as a seam so tests can emulate the kernel's reactions on a plain folder."""

    def mkdir(self, entry: Path) -> None:
        entry.mkdir()

    def rmdir(self, entry: Path) -> None:
        entry.rmdir()

    def read(self, path: Path) -> bytes:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_BLOB + 1)
        except OSError as exc:
            raise EnclaveError(f"cannot read {path}: {exc.strerror}") from None
        if len(data) > MAX_BLOB:
            raise EnclaveError(f"{path} is larger than {MAX_BLOB} bytes")
        return data

    def write(self, path: Path, data: bytes) -> None:
        try:
            with open(path, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            raise EnclaveError(f"cannot write {path}: {exc.strerror}") from None


class ConfigfsTsmProvider:
    """Evidence from Linux configfs-tsm, for real SEV-SNP and TDX guests."""

    def __init__(self, root: Path = DEFAULT_TSM_ROOT, *, privlevel: int | None = None,
                 vcek_path: Path | None = None, sealing_secret_path: Path | None = None,
                 sev_guest_device: Path | None = None,
                 sealing_fields: tuple[str, ...] = ("policy", "measurement"),
                 fs: TsmFs | None = None, ioctl: IoctlFn | None = None) -> None:
        self.root = Path(root)
        self.privlevel = privlevel
        self.vcek_path = vcek_path
        self.sealing_secret_path = sealing_secret_path
        self.sev_guest_device = sev_guest_device
        self.sealing_fields = field_select(sealing_fields)
        self.ioctl = ioctl
        self._derived: bytes | None = None
        self.fs = fs or TsmFs()
        self.name = "configfs-tsm"

    def available(self) -> bool:
        return self.root.is_dir()

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise EnclaveError(f"report_data must be {REPORT_DATA_SIZE} bytes")
        if not self.available():
            raise EnclaveError(f"{self.root} does not exist: is configfs mounted and is this a "
                               "SEV-SNP or TDX guest with the tsm report module loaded?")
        entry = self.root / f"cleanroom-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.fs.mkdir(entry)
        except OSError as exc:
            raise EnclaveError(f"cannot create {entry}: {exc.strerror}") from None
        fs = self.fs
        try:
            provider = fs.read(entry / "provider").decode(errors="replace").strip()
            if self.privlevel is not None:
                fs.write(entry / "privlevel", str(self.privlevel).encode())
            generation_before = int(fs.read(entry / "generation").strip() or b"0")
            fs.write(entry / "inblob", report_data)
            outblob = fs.read(entry / "outblob")
            aux = fs.read(entry / "auxblob") if (entry / "auxblob").exists() else b""
            generation_after = int(fs.read(entry / "generation").strip() or b"0")
            if generation_after != generation_before + 1:
                raise EnclaveError("configfs-tsm report changed while reading (another writer "
                                   f"used {entry.name}); retry")
        except ValueError:
            raise EnclaveError(f"{entry}/generation is not a number") from None
        finally:
            try:
                fs.rmdir(entry)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("could not remove %s: %s", entry, exc.strerror)
        if provider.startswith("sev_guest"):
            return Evidence("sev-snp", outblob, self._snp_endorsement(aux), self.name)
        if provider.startswith("tdx_guest"):
            return Evidence("tdx", outblob, b"", self.name)
        raise EnclaveError(f"unknown configfs-tsm provider {provider!r}")

    def _snp_endorsement(self, aux: bytes) -> bytes:
        if aux:
            table = parse_cert_table(aux)
            for guid in (GUID_VCEK, GUID_VLEK):
                if guid in table:
                    return table[guid]
        if self.vcek_path is not None:
            try:
                data = self.vcek_path.read_bytes()
            except OSError as exc:
                raise EnclaveError(f"cannot read VCEK {self.vcek_path}: {exc.strerror}") from None
            pick_key_certificate(load_certificates(data))  # fail early on a wrong file
            return data
        raise EnclaveError("the host provides no certificate table (auxblob) and no vcek_path is "
                           "configured: fetch the VCEK from AMD KDS once and set vcek_path")

    def for_task(self, task_digest: str) -> ConfigfsTsmProvider:
        return self  # the launched image's measurement; the task is bound in REPORT_DATA

    def sealing_key(self, label: bytes) -> bytes:
        """Key for the sealed store, one per ``label``, derived (HKDF) from the enclave secret.

        On SEV-SNP guests set ``sev_guest_device``: the secret is the firmware's derived key
        (``SNP_GET_DERIVED_KEY``, bound to ``sealing_fields`` of this guest: by default its
        policy and launch measurement, so other code cannot unseal). Otherwise (TDX, or a key
        broker) ``sealing_secret_path`` names a file the guest's boot fills, readable only by
        the daemon.
        """
        if self.sealing_secret_path is not None:
            try:
                secret = self.sealing_secret_path.read_bytes()
            except OSError as exc:
                raise EnclaveError(f"cannot read sealing secret: {exc.strerror}") from None
            if len(secret) < 32:
                raise EnclaveError("sealing secret must be at least 32 bytes")
        elif self.sev_guest_device is not None:
            if self._derived is None:
                try:
                    self._derived = get_derived_key(
                        self.sealing_fields, device=self.sev_guest_device,
                        vmpl=self.privlevel or 0, ioctl=self.ioctl)
                except SevGuestError as exc:
                    raise EnclaveError(f"sealing key: {exc}") from None
            secret = self._derived
        else:
            raise EnclaveError("no sealing secret configured (set sev_guest_device on SEV-SNP "
                               "guests, or sealing_secret_path)")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"cleanroom-fl/sealing-key/v1\0" + label).derive(secret)


# ----------------------------------------------------------------------------- simulated

CHIP_KEY = "chip_vcek_key.pem"
CHIP_ID = "chip_id.bin"
CHIP_VCEK = "vcek.pem"


class SimulatedProvider:
    """The simulated TEE for one site; its chip (VCEK key, chip id) persists in ``state_dir``.

    The measurement is computed at launch from the code the site runs, so it changes when the
    code does; the chip identity and hence the sealing key survive restarts.
    """

    def __init__(self, chip: SimulatedChip) -> None:
        self.chip = chip
        self.name = "simulated"

    @classmethod
    def launch(cls, root: SimulatedRoot | None, state_dir: Path, measurement: bytes, *,
               debug: bool = False) -> SimulatedProvider:
        """Start the simulated chip kept in ``state_dir`` (created on first use).

        Its VCEK is read from ``state_dir/vcek.pem`` when the simulated vendor already issued
        it (deployments: ``cleanroom provision``); otherwise ``root`` issues it now.
        """
        state_dir = Path(state_dir)
        key_path, id_path = state_dir / CHIP_KEY, state_dir / CHIP_ID
        if key_path.exists() and id_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise EnclaveError(f"{key_path} is not an EC key")
            chip_id = id_path.read_bytes()
        else:
            key = ec.generate_private_key(ec.SECP384R1())
            chip_id = secrets.token_bytes(64)
            write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
            write_private(id_path, chip_id)
        tcb = SimulatedTcb()
        vcek_path = state_dir / CHIP_VCEK
        if root is not None:
            _, vcek = issue_vcek(root, chip_id, tcb, key=key)
        elif vcek_path.exists():
            vcek = pick_key_certificate(load_certificates(vcek_path.read_bytes()))
        else:
            raise EnclaveError(f"no simulated VCEK in {state_dir} and no simulated root to "
                               "issue one")
        chip = SimulatedChip(vcek_key=key, vcek=vcek, chip_id=chip_id, measurement=measurement,
                             tcb=tcb)
        if debug:
            from cleanroom.attestation.abi.snp import POLICY_DEBUG_BIT

            chip.guest_policy |= 1 << POLICY_DEBUG_BIT
        return cls(chip)

    @property
    def measurement(self) -> bytes:
        return self.chip.measurement

    def evidence(self, report_data: bytes) -> Evidence:
        return Evidence("sev-snp", self.chip.report(report_data), self.chip.vcek_pem, self.name)

    def for_task(self, task_digest: str) -> SimulatedProvider:
        """This chip running an enclave launched for ``task_digest`` (same keys and sealing)."""
        import dataclasses

        from cleanroom.attestation.simulated import task_measurement

        return SimulatedProvider(dataclasses.replace(
            self.chip, measurement=task_measurement(self.chip.measurement, task_digest)))

    def sealing_key(self, label: bytes) -> bytes:
        return self.chip.derived_key(label)
