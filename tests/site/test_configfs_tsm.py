"""The configfs-tsm provider against a fake configfs tree that behaves like the kernel's."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from cleanroom.attestation.evidence import Endorsements, verify_evidence
from cleanroom.attestation.simulated import SimulatedChip
from cleanroom.attestation.validate.policy import Policy
from cleanroom.enclave import (
    GUID_ARK,
    GUID_VCEK,
    ConfigfsTsmProvider,
    EnclaveError,
    TsmFs,
    parse_cert_table,
)

MEASUREMENT = b"\x42" * 48


def cert_table(entries: dict[uuid.UUID, bytes]) -> bytes:
    header_size = 24 * (len(entries) + 1)
    table, blobs, offset = b"", b"", header_size
    for guid, blob in entries.items():
        table += guid.bytes_le + struct.pack("<II", offset, len(blob))
        blobs += blob
        offset += len(blob)
    return table + bytes(24) + blobs


class FakeKernel(TsmFs):
    """Plain folders and files; the kernel's reactions (attribute files appear on mkdir, a
    write bumps ``generation``, reading ``outblob`` produces the report) are emulated."""

    def __init__(self, chip: SimulatedChip | None, provider: str = "sev_guest",
                 with_aux: bool = True, racing: bool = False) -> None:
        self.chip, self.provider, self.with_aux, self.racing = chip, provider, with_aux, racing
        self.writes: list[tuple[str, bytes]] = []

    def mkdir(self, entry: Path) -> None:
        entry.mkdir()
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")

    def rmdir(self, entry: Path) -> None:
        for child in entry.iterdir():
            child.unlink()
        entry.rmdir()

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        self.writes.append((path.name, data))
        gen = path.parent / "generation"
        bump = 2 if self.racing else 1
        gen.write_text(f"{int(gen.read_text()) + bump}\n")
        if path.name == "inblob":
            if self.provider == "sev_guest":
                (path.parent / "outblob").write_bytes(self.chip.report(data))
                if self.with_aux:
                    (path.parent / "auxblob").write_bytes(
                        cert_table({GUID_VCEK: self.chip.vcek_pem, GUID_ARK: b"ark"}))
            else:
                (path.parent / "outblob").write_bytes(b"TDX QUOTE" + data)


@pytest.fixture(scope="module")
def chip(sim_root):
    return SimulatedChip.launch(sim_root, MEASUREMENT)


def test_snp_evidence_from_fake_configfs_verifies(tmp_path, chip, sim_root_dir):
    kernel = FakeKernel(chip)
    provider = ConfigfsTsmProvider(tmp_path, fs=kernel)
    report_data = bytes(range(64))
    evidence = provider.evidence(report_data)
    assert evidence.format == "sev-snp" and evidence.endorsement == chip.vcek_pem
    assert ("inblob", report_data) in kernel.writes
    assert list(tmp_path.iterdir()) == [], "the report entry is removed afterwards"
    policy = Policy(environment="simulation", simulated_root=sim_root_dir / "root_chain.pem",
                    measurements=[MEASUREMENT], report_data=report_data)
    verdict = verify_evidence(evidence.data, policy=policy,
                              endorsements=Endorsements(evidence.endorsement))
    assert verdict.accepted, verdict.reasons


def test_privlevel_is_written(tmp_path, chip):
    kernel = FakeKernel(chip)
    ConfigfsTsmProvider(tmp_path, fs=kernel, privlevel=2).evidence(bytes(64))
    assert ("privlevel", b"2") in kernel.writes


def test_tdx_provider(tmp_path):
    evidence = ConfigfsTsmProvider(tmp_path, fs=FakeKernel(None, "tdx_guest")).evidence(
        bytes(64))
    assert evidence.format == "tdx" and evidence.endorsement == b""


def test_concurrent_writer_detected(tmp_path, chip):
    with pytest.raises(EnclaveError, match="changed while reading"):
        ConfigfsTsmProvider(tmp_path, fs=FakeKernel(chip, racing=True)).evidence(bytes(64))
    assert list(tmp_path.iterdir()) == []


def test_vcek_from_file_when_host_gives_no_table(tmp_path, chip):
    kernel = FakeKernel(chip, with_aux=False)
    (tmp_path / "tsm").mkdir()
    with pytest.raises(EnclaveError, match="vcek_path"):
        ConfigfsTsmProvider(tmp_path / "tsm", fs=kernel).evidence(bytes(64))
    vcek = tmp_path / "vcek.pem"
    vcek.write_bytes(chip.vcek_pem)
    evidence = ConfigfsTsmProvider(tmp_path / "tsm", fs=kernel, vcek_path=vcek).evidence(
        bytes(64))
    assert evidence.endorsement == chip.vcek_pem
    wrong = tmp_path / "wrong.pem"
    wrong.write_text("nonsense")
    with pytest.raises(Exception, match="certificate"):
        ConfigfsTsmProvider(tmp_path / "tsm", fs=kernel, vcek_path=wrong).evidence(bytes(64))


def test_unknown_provider_and_missing_tree(tmp_path, chip):
    with pytest.raises(EnclaveError, match="unknown configfs-tsm provider"):
        ConfigfsTsmProvider(tmp_path, fs=FakeKernel(chip, "arm_cca_guest")).evidence(bytes(64))
    with pytest.raises(EnclaveError, match="does not exist"):
        ConfigfsTsmProvider(tmp_path / "absent").evidence(bytes(64))
    with pytest.raises(EnclaveError, match="64 bytes"):
        ConfigfsTsmProvider(tmp_path, fs=FakeKernel(chip)).evidence(b"short")


def test_cert_table_errors():
    assert parse_cert_table(cert_table({GUID_VCEK: b"x"}))[GUID_VCEK] == b"x"
    with pytest.raises(EnclaveError, match="terminating"):
        parse_cert_table(GUID_VCEK.bytes_le + struct.pack("<II", 24, 1) + b"x")
    with pytest.raises(EnclaveError, match="out of range"):
        parse_cert_table(GUID_VCEK.bytes_le + struct.pack("<II", 4000, 10) + bytes(24))


def test_sealing_secret(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    provider = ConfigfsTsmProvider(tmp_path, sealing_secret_path=secret)
    assert len(provider.sealing_key(b"a")) == 32
    assert provider.sealing_key(b"a") != provider.sealing_key(b"b")
    secret.write_bytes(b"short")
    with pytest.raises(EnclaveError, match="at least 32"):
        provider.sealing_key(b"a")
    with pytest.raises(EnclaveError, match="no sealing secret"):
        ConfigfsTsmProvider(tmp_path).sealing_key(b"a")
