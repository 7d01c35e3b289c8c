"""The Flower App (FAB) that ``cleanroom run`` submits: a shim whose components are the
installed ``coordinator.serverapp`` and ``site_agent.clientapp``.

Flower resolves components statically, so the shim modules assign ``app`` themselves. The
FAB's hash covers only this shim; what actually runs at the sites is covered by their
attestation (the measurement of the installed code), not by the FAB hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PACKAGE = "cleanroom_fab"

SERVER = '''"""Shim: the coordinator's ServerApp (installed package coordinator.serverapp)."""
from cleanroom.coordinator import serverapp as _impl

app = _impl.app
'''
CLIENT = '''"""Shim: the site's ClientApp (installed package site_agent.clientapp)."""
from cleanroom.site_agent import clientapp as _impl

app = _impl.app
'''


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_fab(out: Path, defaults: dict[str, Any]) -> Path:
    """Write the app folder; ``defaults`` declares every run-config key a run may set."""
    out = Path(out)
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    (out / PACKAGE / "__init__.py").write_text('"""Cleanroom FL Flower App shim."""\n')
    (out / PACKAGE / "server_app.py").write_text(SERVER)
    (out / PACKAGE / "client_app.py").write_text(CLIENT)
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in defaults.items())
    (out / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "cleanroom-fl-app"
version = "0.1.0"
description = "Cleanroom FL federated run (code comes from the installed cleanroom-fl)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "cleanroom"

[tool.flwr.app.components]
serverapp = "{PACKAGE}.server_app:app"
clientapp = "{PACKAGE}.client_app:app"

[tool.flwr.app.config]
{config}
''')
    return out
