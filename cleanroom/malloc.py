"""Give model-sized buffers back to the OS as soon as they are freed (glibc).

glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own
``mmap``, returned to the OS by ``free``. But the threshold is dynamic: after the first such
buffer is freed it rises to that buffer's size (up to 32 MiB), so from then on every
model-sized buffer (a sealed model, a site's reply, a decoded update: ~4 MB at 1M parameters)
comes from the heap, where a freed one stays in the process and the heap's high-water mark
only grows across rounds. Setting the threshold explicitly turns the adjustment off.

Used by the processes that hold models between phases and sites: the coordinator of a
deployment, the aggregator enclave and the coordinator of a simulation whose sites run in a
process of their own. Not by a training site: its per-step temporaries reuse heap memory
faster than fresh mappings (page faults). Measured by ``python -m benchmarks memory``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
THRESHOLD = 256 * 1024  # bytes: anything this large gets its own mapping


def release_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False (nothing changed) when the
    C library is not glibc or refuses the value."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
    log.debug("malloc mmap threshold %d bytes: %s", threshold, "set" if done else "refused")
    return done
