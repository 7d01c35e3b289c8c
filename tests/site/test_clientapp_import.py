"""Flower starts a process per message: the ClientApp module must import without torch/Opacus."""

from __future__ import annotations

import subprocess
import sys


def test_clientapp_imports_without_torch_or_opacus():
    code = ("import sys, site_agent.clientapp; "
            "heavy = sorted(m for m in ('torch', 'opacus', 'scipy', 'mlflow') "
            "if m in sys.modules); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"imported at start: {out.stdout.strip()}"
