"""Crash-safe file writes shared by the coordinator and the site agent."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write-to-temp, fsync, rename, fsync the folder: the file is old or new, never torn."""
    atomic_write_with(path, lambda fh: fh.write(data), mode, digest=False)


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o600, *,
                      digest: bool = True) -> str | None:
    """:func:`atomic_write` of what ``write(fh)`` writes (seeking allowed), without the whole
    content as one bytes object in memory; returns the written file's SHA-256 (read back
    from the file, in chunks) when ``digest``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    sha256 = None
    try:
        with os.fdopen(fd, "w+b") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            if digest:
                fh.seek(0)
                sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha256


def write_private(path: Path, data: bytes) -> None:
    """Write secret material (a key, a token) atomically with mode 0600 from the start: never
    world-readable, never torn. The one writer of secrets on either side."""
    atomic_write(path, data, mode=0o600)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` + ".lock" (serialises processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
