"""The honest launch digest of the site agent's code, as the simulated TEE measures it.

Both sides need it: a simulated site launches its enclave with it, a coordinator's simulation
policy allows it. The code roots are found without importing the site agent (the shared
package imports neither side): the installed ``cleanroom`` package (shared code and the
entry points), ``cleanroom.site_agent`` and ``cleanroom.models`` (the built-in tasks).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from cleanroom.attestation.simulated import measure_code

SITE_PACKAGES = ("cleanroom", "cleanroom.site_agent", "cleanroom.models")


def site_code_roots() -> list[Path]:
    """Source folders of the code a site runs: what the simulated TEE measures."""
    roots = []
    for name in SITE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} is not installed")
        roots.append(Path(next(iter(spec.submodule_search_locations))).resolve())
    return roots


@lru_cache(maxsize=1)
def code_measurement() -> bytes:
    """The honest simulated launch digest of the installed site code."""
    return measure_code(site_code_roots())
