"""cleanroom.malloc: the mmap threshold is fixed where glibc is the C library."""

from __future__ import annotations

import platform

import pytest

from cleanroom.malloc import release_large_buffers


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_threshold_is_set_on_glibc():
    assert release_large_buffers() is True

