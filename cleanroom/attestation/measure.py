"""The honest launch digests of the site agent's and the aggregator's code, as the simulated
TEE measures them, and the policy sites verify the aggregator against.

Both sides need it: a simulated site launches its enclave with it, a coordinator's simulation
policy allows it. The code roots are found without importing the site agent (the shared
package imports neither side): the installed ``cleanroom`` package (shared code and the
entry points), ``cleanroom.site_agent`` and ``cleanroom.models`` (the built-in tasks).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from cleanroom.attestation.simulated import measure_code
from cleanroom.attestation.validate.policy import Policy

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


AGGREGATOR_PACKAGES = ("cleanroom", "cleanroom.coordinator")
AGGREGATOR_TAG = b"cleanroom-fl/aggregator"


@lru_cache(maxsize=1)
def aggregator_measurement() -> bytes:
    """The honest simulated launch digest of the aggregator enclave's code (the shared package
    and the coordinator's): what sites pin for a simulated aggregator."""
    roots = []
    for name in AGGREGATOR_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} is not installed")
        roots.append(Path(next(iter(spec.submodule_search_locations))).resolve())
    return measure_code(roots, extra=AGGREGATOR_TAG)


def aggregator_trust_policy(*, simulated_root: Path | None, measurements: list[bytes],
                            name: str = "consortium-aggregator") -> Policy:
    """The attestation policy sites verify the coordinator's aggregator evidence against: its
    allowed measurements, debug off; a simulated root for a simulated consortium."""
    if not measurements:
        raise ValueError("an aggregator trust policy needs the aggregator's measurement(s)")
    return Policy(name=name, environment="simulation" if simulated_root else "production",
                  simulated_root=simulated_root, measurements=list(measurements),
                  allow_debug=False)


def write_aggregator_trust(path: Path, **kwargs: Any) -> Path:
    """:func:`aggregator_trust_policy` as a policy file (JSON) for sites' configurations
    (``[aggregator] policy``), written atomically."""
    from cleanroom.fsutil import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = aggregator_trust_policy(**kwargs).model_dump_json(indent=2, exclude_defaults=True)
    atomic_write(path, (text + "\n").encode(), mode=0o644)
    return path
