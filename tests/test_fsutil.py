"""Crash-safe writes: a streamed write is renamed into place only when it completed, its
digest is the file's, and a writer that fails leaves the old file and no temporary."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cleanroom.fsutil import atomic_write, atomic_write_with


def test_a_streamed_write_returns_the_files_digest(tmp_path):
    path = tmp_path / "out.npz"
    digest = atomic_write_with(path, lambda fh: np.savez(fh, a=np.arange(10), b=np.ones(3)))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with np.load(path) as npz:
        assert npz["a"].tolist() == list(range(10))
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state"
    atomic_write(path, b"old")

    def half(fh):
        fh.write(b"new, half written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(path, half)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
