"""Attestation verification throughput, next to the raw ECDSA verify rate of OpenSSL.

Prints a table: verifications per second for SEV-SNP (real vendor vectors when shipped in
tests/vectors, and the simulated chain) and TDX (real quotes), and ``openssl speed`` ECDSA
verify rates (P-384 for SNP, P-256 for TDX) on this machine, with the ratio of the two.
Run: ``python -m benchmarks attestation [--seconds S]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"


def openssl_verify_rate(curve: str, seconds: int) -> float | None:
    """ECDSA verifications/s from ``openssl speed`` (None when openssl is unavailable)."""
    try:
        out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), f"ecdsa{curve}"],
                             capture_output=True, text=True, timeout=120, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        m = re.match(rf"\s*\d+ bits ecdsa \(nist{curve}\)\s+\S+s\s+\S+s\s+\S+\s+([\d.]+)",
                     line)
        if m:
            return float(m.group(1))
    return None


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    fn()  # warm caches (certificate parsing, imports)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start), n


def cases() -> list[tuple[str, str, Callable[[], object]]]:
    from cleanroom.attestation.evidence import Endorsements, verify_evidence
    from cleanroom.attestation.simulated import SimulatedChip, create_simulated_root
    from cleanroom.attestation.trust import load_simulated_chain
    from cleanroom.attestation.validate.policy import Policy

    out: list[tuple[str, str, Callable[[], object]]] = []
    manifest = VECTORS / "manifest.json"
    if manifest.exists():
        for entry in json.loads(manifest.read_text()):
            if entry.get("format") != "sev-snp" or not entry.get("signature_verifies"):
                continue
            data = (VECTORS / entry["file"]).read_bytes()
            cert = (VECTORS / entry["cert"]).read_bytes()
            at = dt.datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))

            def snp_real(data: bytes = data, cert: bytes = cert, at: dt.datetime = at) -> object:
                v = verify_evidence(data, policy=Policy(vmpl=None), at=at,
                                    endorsements=Endorsements(cert))
                assert v.authentic, v.reasons
                return v

            out.append((f"SEV-SNP real {entry.get('product')} {entry.get('signing_key')}",
                        "P-384", snp_real))
            break
    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-root-"))
    root = create_simulated_root(tmp)
    chip = SimulatedChip.launch(root, bytes(48))
    report_data = bytes(64)
    report = chip.report(report_data)
    policy = Policy(environment="simulation", simulated_root=root.bundle_path,
                    measurements=[bytes(48)], report_data=report_data)
    chains = load_simulated_chain(root.bundle_path)

    def snp_sim() -> object:
        v = verify_evidence(report, policy=policy, endorsements=Endorsements(chip.vcek_pem),
                            amd_chains=chains)
        assert v.accepted
        return v

    out.append(("SEV-SNP simulated chain (full policy)", "P-384", snp_sim))
    quote_hex = VECTORS / "tdx" / "dcap-qvl" / "tdx-quote.hex"
    if quote_hex.exists():
        quote = bytes.fromhex("".join(quote_hex.read_text().split()).removeprefix("0x"))
        at = dt.datetime(2025, 3, 20, tzinfo=dt.UTC)

        def tdx_real() -> object:
            v = verify_evidence(quote, policy=Policy(), at=at)
            assert v.authentic, v.reasons
            return v

        out.append(("TDX v4 real quote (no collateral)", "P-256", tdx_real))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks attestation",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per case")
    args = parser.parse_args(argv)
    openssl = {c: openssl_verify_rate(c, max(1, int(args.seconds)))
               for c in ("p384", "p256")}
    print(f"{'case':42s} {'verif/s':>9s} {'openssl ECDSA verify/s':>24s} {'ratio':>7s}")
    for name, curve, fn in cases():
        per_s, _ = rate(fn, args.seconds)
        base = openssl["p384" if curve == "P-384" else "p256"]
        ratio = f"{per_s / base:.3f}" if base else "n/a"
        base_text = f"{base:,.0f} ({curve})" if base else "openssl missing"
        print(f"{name:42s} {per_s:9.1f} {base_text:>24s} {ratio:>7s}")
    print("ratio = full verifications per second / raw ECDSA verifications per second "
          "(one verification checks the report signature, the certificate chain and the policy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
