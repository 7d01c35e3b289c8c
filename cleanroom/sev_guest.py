"""SEV-SNP derived keys from the guest device (``/dev/sev-guest``, ``SNP_GET_DERIVED_KEY``).

The AMD secure processor derives a 32-byte key from a chip root key (the VCEK's secret, or the
VM root key) mixed with the guest fields the caller selects: guest policy, image id, family id,
launch measurement, guest SVN, TCB version. The same code on the same chip gets the same key
across reboots; other code (a different measurement, when it is selected) or another machine
cannot. configfs-tsm does not expose this request, so we issue the ioctl ourselves.

Layers, each testable alone: :func:`derived_key_request` and :func:`parse_derived_key_response`
are pure (SNP firmware ABI MSG_KEY_REQ / MSG_KEY_RSP, Linux ``struct snp_derived_key_req``);
:func:`get_derived_key` does the I/O through an injectable ``ioctl`` function.
"""

from __future__ import annotations

import ctypes
import enum
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from cleanroom.errors import CleanroomError

DEFAULT_DEVICE = Path("/dev/sev-guest")
REQUEST_SIZE = 32  # struct snp_derived_key_req
RESPONSE_SIZE = 64  # struct snp_derived_key_resp (MSG_KEY_RSP)
KEY_OFFSET, KEY_SIZE = 0x20, 32
MSG_VERSION = 1
# _IOWR('S', 0x1, struct snp_guest_request_ioctl): dir 3 << 30 | size 32 << 16 | 'S' << 8 | 1
SNP_GET_DERIVED_KEY = (3 << 30) | (32 << 16) | (ord("S") << 8) | 0x1
STATUS_INVALID_PARAMETERS = 0x16


class SevGuestError(CleanroomError):
    """The guest device refused or could not serve a derived-key request."""


class Field(enum.IntFlag):
    """GUEST_FIELD_SELECT bits: what the firmware mixes into the derived key."""

    POLICY = 1 << 0
    IMAGE_ID = 1 << 1
    FAMILY_ID = 1 << 2
    MEASUREMENT = 1 << 3
    GUEST_SVN = 1 << 4
    TCB_VERSION = 1 << 5


FIELD_NAMES = {"policy": Field.POLICY, "image_id": Field.IMAGE_ID,
               "family_id": Field.FAMILY_ID, "measurement": Field.MEASUREMENT,
               "guest_svn": Field.GUEST_SVN, "tcb_version": Field.TCB_VERSION}


def field_select(names: Iterable[str]) -> Field:
    selected = Field(0)
    for name in names:
        if name not in FIELD_NAMES:
            raise SevGuestError(f"unknown guest field {name!r}; choose from "
                                f"{', '.join(FIELD_NAMES)}")
        selected |= FIELD_NAMES[name]
    return selected


def derived_key_request(fields: Field, *, vmpl: int = 0, guest_svn: int = 0,
                        tcb_version: int = 0, vm_root_key: bool = False) -> bytes:
    """MSG_KEY_REQ bytes: root key select (0 VCEK, 1 VMRK), reserved, field select, VMPL,
    guest SVN, TCB version (the last two only count when their fields are selected)."""
    if not 0 <= vmpl <= 3:
        raise SevGuestError(f"vmpl must be 0..3, got {vmpl}")
    if not 0 <= guest_svn < 1 << 32 or not 0 <= tcb_version < 1 << 64:
        raise SevGuestError("guest_svn must fit 32 bits and tcb_version 64 bits")
    return struct.pack("<IIQIIQ", 1 if vm_root_key else 0, 0, int(fields), vmpl, guest_svn,
                       tcb_version)


def parse_derived_key_response(data: bytes) -> bytes:
    """The 32-byte key of a MSG_KEY_RSP, or :class:`SevGuestError` naming the status."""
    if len(data) != RESPONSE_SIZE:
        raise SevGuestError(f"derived-key response is {len(data)} bytes, expect {RESPONSE_SIZE}")
    status = struct.unpack_from("<I", data, 0)[0]
    if status == STATUS_INVALID_PARAMETERS:
        raise SevGuestError("firmware refused the derived-key request: invalid parameters "
                            "(VMPL below the guest's, or SVN/TCB above the current ones)")
    if status != 0:
        raise SevGuestError(f"firmware refused the derived-key request: status {status:#x}")
    key = data[KEY_OFFSET:KEY_OFFSET + KEY_SIZE]
    if key == bytes(KEY_SIZE):
        raise SevGuestError("firmware returned an all-zero derived key")
    return bytes(key)


class _GuestRequest(ctypes.Structure):
    """``struct snp_guest_request_ioctl`` (linux/sev-guest.h)."""

    _fields_ = [("msg_version", ctypes.c_uint8), ("req_data", ctypes.c_uint64),
                ("resp_data", ctypes.c_uint64), ("exitinfo2", ctypes.c_uint64)]


IoctlFn = Callable[[int, int, _GuestRequest], int]


def _ioctl(fd: int, request: int, arg: _GuestRequest) -> int:
    import fcntl

    return int(fcntl.ioctl(fd, request, arg))


def get_derived_key(fields: Field, *, device: Path = DEFAULT_DEVICE, vmpl: int = 0,
                    ioctl: IoctlFn | None = None) -> bytes:
    """Ask the secure processor for the key bound to ``fields`` of this guest (``ioctl``:
    a stand-in for ``fcntl.ioctl``, for tests)."""
    ioctl = ioctl or _ioctl
    request = ctypes.create_string_buffer(derived_key_request(fields, vmpl=vmpl), REQUEST_SIZE)
    response = ctypes.create_string_buffer(RESPONSE_SIZE)
    arg = _GuestRequest(msg_version=MSG_VERSION, req_data=ctypes.addressof(request),
                        resp_data=ctypes.addressof(response), exitinfo2=0)
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as exc:
        raise SevGuestError(f"cannot open {device}: {exc.strerror} (is this an SEV-SNP guest "
                            "with the sev-guest driver loaded, and may this user open it?)") \
            from None
    try:
        ioctl(fd, SNP_GET_DERIVED_KEY, arg)
    except OSError as exc:
        fw_error, vmm_error = arg.exitinfo2 & 0xFFFFFFFF, arg.exitinfo2 >> 32
        raise SevGuestError(f"SNP_GET_DERIVED_KEY failed: {exc.strerror} (firmware error "
                            f"{fw_error:#x}, VMM error {vmm_error:#x})") from None
    finally:
        os.close(fd)
    return parse_derived_key_response(response.raw)
