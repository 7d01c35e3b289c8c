"""TDX collateral on disk: read a collateral folder (bounded), and keep a configured one loaded.

The I/O edge of the collateral code: :func:`read_collateral_folder` turns a folder into bytes
(:class:`CollateralFiles`), :func:`load_collateral` parses them
(:func:`cleanroom.attestation.abi.tdx_collateral.parse_collateral`), and
:class:`CollateralFolder` is what a long-running verifier (the coordinator's gate) holds: it
loads the folder once, refuses to start on a broken one, and picks up a refreshed folder (an
operator's daily PCS fetch) without a restart.

Folder layout (Intel PCS formats, unchanged)::

    tcb_info.json           {"tcbInfo": {...}, "signature": "<hex r||s>"}        (TDX, version 3)
    qe_identity.json        {"enclaveIdentity": {...}, "signature": "<hex r||s>"} (TD_QE, v 2)
    tcb_signing_chain.pem   Intel SGX TCB Signing certificate, then (optionally) the root
    pck_crl.der|.pem        optional: CRL of the PCK Platform/Processor CA
    root_crl.der|.pem       optional: CRL of the Intel SGX Root CA

Nothing is verified here: :mod:`cleanroom.attestation.verify.collateral` does that, per quote.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cleanroom.attestation.abi.tdx_collateral import (
    MAX_DOCUMENT_SIZE,
    QE_IDENTITY_FILE,
    TCB_INFO_FILE,
    TCB_SIGNING_CHAIN_FILE,
    CollateralFiles,
    TdxCollateral,
    parse_collateral,
)
from cleanroom.config import read_bounded
from cleanroom.errors import CollateralError

log = logging.getLogger(__name__)

PCK_CRL_STEM = "pck_crl"
ROOT_CRL_STEM = "root_crl"
CRL_SUFFIXES = (".der", ".pem")


def _read(directory: Path, name: str) -> bytes:
    return read_bounded(directory / name, MAX_DOCUMENT_SIZE, what="collateral",
                        error=CollateralError)


def _read_optional(directory: Path, stem: str) -> tuple[str, bytes] | None:
    present = [stem + suffix for suffix in CRL_SUFFIXES if (directory / (stem + suffix)).exists()]
    if len(present) > 1:
        raise CollateralError(f"collateral {directory}: both {' and '.join(present)}; keep one")
    return (present[0], _read(directory, present[0])) if present else None


def read_collateral_folder(directory: Path) -> CollateralFiles:
    """The bytes of every collateral file in ``directory`` (each read with a hard cap).

    Raises :class:`CollateralError` naming the folder or file when one is missing, too large
    or unreadable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CollateralError(f"collateral {directory} is not a folder")
    required = {}
    for name in (TCB_INFO_FILE, QE_IDENTITY_FILE, TCB_SIGNING_CHAIN_FILE):
        if not (directory / name).exists():
            raise CollateralError(f"collateral {directory}: {name} is missing")
        required[name] = _read(directory, name)
    return CollateralFiles(
        tcb_info=required[TCB_INFO_FILE], qe_identity=required[QE_IDENTITY_FILE],
        tcb_signing_chain=required[TCB_SIGNING_CHAIN_FILE],
        pck_crl=_read_optional(directory, PCK_CRL_STEM),
        root_crl=_read_optional(directory, ROOT_CRL_STEM), source=str(directory))


def load_collateral(directory: Path) -> TdxCollateral:
    """Read and parse a collateral folder; :class:`CollateralError` names what is wrong."""
    return parse_collateral(read_collateral_folder(directory))


def _stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when an operator replaces a file: (name, size, mtime) of every file."""
    out = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class CollateralFolder:
    """A configured collateral folder, loaded once and reloaded when its files change.

    The constructor loads it (a broken folder is a start-up error, :class:`CollateralError`).
    :meth:`current` returns the parsed collateral; when the folder's files changed since the
    last load it reloads them, and if the new files are broken it logs the error and keeps the
    previous collateral (whose signatures and dates are still checked for every quote, so an
    expired set is refused, never silently trusted).

    Usage (the coordinator)::

        folder = CollateralFolder(config.tdx_collateral)   # once, at start-up
        Endorsements(collateral=folder.current())           # per verification
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._stamp = _stamp(self.directory)
        self._collateral = load_collateral(self.directory)

    def current(self) -> TdxCollateral:
        stamp = _stamp(self.directory)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._collateral = load_collateral(self.directory)
                except CollateralError as exc:
                    log.error("collateral %s changed but does not load (%s); keeping the "
                              "collateral loaded before", self.directory, exc)
                self._stamp = stamp
            return self._collateral
