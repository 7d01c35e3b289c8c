"""SEV-SNP derived sealing key: request/response layout, the ioctl path, and every refusal."""

from __future__ import annotations

import ctypes
import errno
import struct
from pathlib import Path

import pytest

from cleanroom import sev_guest as sg
from cleanroom.enclave import ConfigfsTsmProvider, EnclaveError
from cleanroom.site_agent.config import EnclaveConfig

KEY = bytes(range(1, 33))


def response(status: int = 0, key: bytes = KEY) -> bytes:
    return struct.pack("<I", status) + bytes(28) + key


class FakeFirmware:
    """Stands in for the sev-guest driver: checks the request like the kernel would, and
    writes a MSG_KEY_RSP whose key depends on the selected fields (as the firmware's does)."""

    def __init__(self, status: int = 0, fail: int | None = None) -> None:
        self.status, self.fail, self.requests = status, fail, []

    def __call__(self, fd: int, request: int, arg: sg._GuestRequest) -> int:
        assert request == sg.SNP_GET_DERIVED_KEY == 0xC0205301
        assert arg.msg_version == 1
        req = ctypes.string_at(arg.req_data, sg.REQUEST_SIZE)
        self.requests.append(req)
        if self.fail is not None:
            arg.exitinfo2 = (0x5 << 32) | 0x16
            raise OSError(self.fail, "Input/output error")
        fields = struct.unpack_from("<Q", req, 8)[0]
        ctypes.memmove(arg.resp_data, response(self.status, bytes([fields + 1]) * 32),
                       sg.RESPONSE_SIZE)
        return 0


@pytest.fixture
def device(tmp_path: Path) -> Path:
    path = tmp_path / "sev-guest"
    path.write_bytes(b"")
    return path


def test_request_layout_matches_linux_struct() -> None:
    req = sg.derived_key_request(sg.Field.POLICY | sg.Field.MEASUREMENT, vmpl=1, guest_svn=7,
                                 tcb_version=0x1122)
    assert len(req) == sg.REQUEST_SIZE == ctypes.sizeof(ctypes.c_uint64) * 4
    assert struct.unpack("<IIQIIQ", req) == (0, 0, 0b1001, 1, 7, 0x1122)
    assert struct.unpack_from("<I", sg.derived_key_request(sg.Field(0), vm_root_key=True))[0] == 1
    assert ctypes.sizeof(sg._GuestRequest) == 32
    assert sg._GuestRequest.req_data.offset == 8


@pytest.mark.parametrize("kw", [{"vmpl": 4}, {"guest_svn": 1 << 32}, {"tcb_version": -1}])
def test_request_out_of_range_refused(kw: dict[str, int]) -> None:
    with pytest.raises(sg.SevGuestError):
        sg.derived_key_request(sg.Field.POLICY, **kw)


def test_response_parsing_and_refusals() -> None:
    assert sg.parse_derived_key_response(response()) == KEY
    with pytest.raises(sg.SevGuestError, match="invalid parameters"):
        sg.parse_derived_key_response(response(status=0x16))
    with pytest.raises(sg.SevGuestError, match="status 0x7"):
        sg.parse_derived_key_response(response(status=7))
    with pytest.raises(sg.SevGuestError, match="all-zero"):
        sg.parse_derived_key_response(response(key=bytes(32)))
    with pytest.raises(sg.SevGuestError, match="63 bytes"):
        sg.parse_derived_key_response(response()[:-1])


def test_field_names() -> None:
    assert sg.field_select(["policy", "measurement"]) == sg.Field.POLICY | sg.Field.MEASUREMENT
    with pytest.raises(sg.SevGuestError, match="unknown guest field 'chip'"):
        sg.field_select(["chip"])
    with pytest.raises(ValueError, match="sealing_fields"):
        EnclaveConfig(sealing_fields=["chip"])


def test_ioctl_path(device: Path) -> None:
    fw = FakeFirmware()
    key = sg.get_derived_key(sg.Field.MEASUREMENT, device=device, ioctl=fw)
    assert key == bytes([9]) * 32 and len(fw.requests) == 1


def test_ioctl_failure_names_firmware_error(device: Path) -> None:
    with pytest.raises(sg.SevGuestError, match="firmware error 0x16, VMM error 0x5"):
        sg.get_derived_key(sg.Field.POLICY, device=device, ioctl=FakeFirmware(fail=errno.EIO))
    with pytest.raises(sg.SevGuestError, match="invalid parameters"):
        sg.get_derived_key(sg.Field.POLICY, device=device, ioctl=FakeFirmware(status=0x16))


def test_missing_device(tmp_path: Path) -> None:
    with pytest.raises(sg.SevGuestError, match=r"cannot open .*sev-guest driver"):
        sg.get_derived_key(sg.Field.POLICY, device=tmp_path / "absent")


def test_provider_seals_with_the_derived_key(tmp_path: Path, device: Path) -> None:
    fw = FakeFirmware()
    provider = ConfigfsTsmProvider(tmp_path, sev_guest_device=device, ioctl=fw)
    a, b = provider.sealing_key(b"ledger"), provider.sealing_key(b"enclave")
    assert len(a) == 32 and a != b
    assert len(fw.requests) == 1  # asked once, then cached in memory only
    assert struct.unpack_from("<Q", fw.requests[0], 8)[0] == 0b1001  # policy + measurement
    other = ConfigfsTsmProvider(tmp_path, sev_guest_device=device, ioctl=FakeFirmware(),
                                sealing_fields=("policy", "family_id"))
    assert other.sealing_key(b"ledger") != a  # other binding, other key
    broken = ConfigfsTsmProvider(tmp_path, sev_guest_device=device,
                                 ioctl=FakeFirmware(fail=errno.EIO))
    with pytest.raises(EnclaveError, match="sealing key: SNP_GET_DERIVED_KEY failed"):
        broken.sealing_key(b"ledger")
