"""Strict inputs: policies are never coerced, and no file is read without a hard cap.

Attacks from issue 12: ``allow_debug = "yes"`` silently became True, ``vmpl = "0"`` became 0, a
100 MB policy loaded, and ``cleanroom attest verify /dev/urandom`` grew to 24 GB. Each is refused
here with a clear error (exit 2 for the command line), next to a control that is accepted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cleanroom.attestation.collateral_folder import load_collateral
from cleanroom.attestation.validate.policy import Policy, load_policy
from cleanroom.config import MAX_CONFIG_BYTES, read_bounded
from cleanroom.errors import CollateralError, ConfigError
from tests.attestation.test_tdx import DCAP_QVL

TAPPD = Path(__file__).resolve().parents[1] / "vectors" / "tdx" / "dcap-qvl_tappd_tdx10_v4.dat"
URANDOM = Path("/dev/urandom")
needs_urandom = pytest.mark.skipif(not URANDOM.exists(), reason="no /dev/urandom")


def write(tmp_path: Path, suffix: str, text: str) -> Path:
    path = tmp_path / f"policy{suffix}"
    path.write_text(text)
    return path


COERCIONS = [
    ("allow_debug", '"yes"', "yes"), ("allow_debug", '"on"', "on"), ("allow_debug", "1", 1),
    ("allow_debug", '"true"', "true"), ("allow_migration_agent", "1", 1),
    ("vmpl", '"0"', "0"), ("vmpl", "0.0", 0.0), ("min_guest_svn", '"1"', "1"),
    ("require_collateral", '"false"', "false"), ("max_evidence_bytes", "1024.0", 1024.0),
]


@pytest.mark.parametrize(("field", "toml_value", "json_value"), COERCIONS,
                         ids=[f"{f}={t}" for f, t, _ in COERCIONS])
def test_policy_values_are_never_coerced(tmp_path: Path, field: str, toml_value: str,
                                         json_value: object) -> None:
    for path in (write(tmp_path, ".toml", f"{field} = {toml_value}\n"),
                 write(tmp_path, ".json", json.dumps({field: json_value}))):
        with pytest.raises(ConfigError) as info:
            load_policy(path)
        assert f"  - {field}:" in str(info.value), str(info.value)


def test_nested_tcb_floor_is_strict_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"min_tcb\.Milan\.snp"):
        load_policy(write(tmp_path, ".toml", '[min_tcb.Milan]\nsnp = "8"\n'))


def test_strict_policy_still_loads_what_files_can_say(tmp_path: Path) -> None:
    """Control: the documented conversions (hex, RTMR keys, paths) and real types load."""
    rtmr = "ab" * 48
    toml = write(tmp_path, ".toml", f'allow_debug = true\nvmpl = 0\nformats = ["tdx"]\n'
                 f'measurements = ["0x{"cd" * 48}"]\naccepted_tcb_statuses = ["UpToDate"]\n'
                 f'[rtmrs]\n0 = ["{rtmr}"]\n3 = ["{rtmr}"]\n[min_tcb.Genoa]\nsnp = 23\n')
    policy = load_policy(toml)
    assert policy.allow_debug is True and policy.vmpl == 0 and sorted(policy.rtmrs) == [0, 3]
    assert policy.measurements == [bytes.fromhex("cd" * 48)]
    js = write(tmp_path, ".json", json.dumps({"vmpl": None, "rtmrs": {"2": [rtmr]},
                                              "simulated_root": "root.pem",
                                              "environment": "simulation"}))
    policy = load_policy(js)
    assert policy.vmpl is None and list(policy.rtmrs) == [2]
    assert policy.simulated_root == tmp_path / "root.pem"
    assert Policy().with_updates(allow_debug=True).allow_debug is True
    for bad in ({"rtmrs": {"4": [rtmr]}}, {"rtmrs": {"x": [rtmr]}},
                {"accepted_tcb_statuses": ["UptoDate"]}):
        with pytest.raises(ConfigError):
            load_policy(write(tmp_path, ".json", json.dumps(bad)))


def test_a_100_mb_policy_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    with open(path, "wb") as fh:  # sparse: 100 MB on paper, no disk used
        fh.truncate(100 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_policy(path)
    assert time.perf_counter() - start < 2


def test_bounded_read_limits(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_bounded(path, 10) == b"x" * 10
    with pytest.raises(ConfigError, match="larger than 9 bytes"):
        read_bounded(path, 9)
    with pytest.raises(ConfigError, match="file not found"):
        read_bounded(tmp_path / "absent", 10)
    with pytest.raises(ConfigError, match="is a folder"):
        read_bounded(tmp_path, 10)


@needs_urandom
def test_endless_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than"):
        load_policy(URANDOM)
    folder = tmp_path / "collateral"
    folder.mkdir()
    for name in ("tcb_info.json", "qe_identity.json", "tcb_signing_chain.pem"):
        (folder / name).write_bytes((DCAP_QVL / "collateral-2025-03" / name).read_bytes())
    (folder / "pck_crl.der").symlink_to(URANDOM)
    with pytest.raises(CollateralError, match=r"pck_crl\.der: larger than"):
        load_collateral(folder)


def cleanroom(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "cleanroom", "attest", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)


@needs_urandom
@pytest.mark.parametrize("args", [
    ["verify", "/dev/urandom"],
    ["verify", "/dev/urandom", "--json"],
    ["show", "/dev/urandom"],
    ["verify", str(TAPPD), "--policy", "/dev/urandom"],
    ["verify", str(TAPPD), "--vcek", "/dev/urandom"],
], ids=["verify", "verify-json", "show", "policy", "vcek"])
def test_cli_refuses_endless_input_quickly(args: list[str]) -> None:
    start = time.perf_counter()
    result = cleanroom(*args, timeout=60)  # before: grew to 24 GB and was OOM-killed
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert time.perf_counter() - start < 30
    if "--json" in args:
        assert "larger than" in json.loads(result.stdout)["error"]
    else:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "larger than" in lines[0]
        assert "Traceback" not in result.stderr


def test_cli_refuses_a_coerced_policy_with_exit_2(tmp_path: Path) -> None:
    policy = write(tmp_path, ".toml", 'allow_debug = "yes"\n')
    result = cleanroom("verify", str(TAPPD), "--policy", str(policy),
                       "--at", "2025-03-20T00:00:00Z")
    assert result.returncode == 2 and "allow_debug" in result.stderr
    control = write(tmp_path, ".toml", "allow_debug = true\n")
    result = cleanroom("verify", str(TAPPD), "--policy", str(control),
                       "--at", "2025-03-20T00:00:00Z")
    assert result.returncode == 0, result.stdout + result.stderr
