"""Real vendor evidence through the exact CLI contract: every vector in tests/vectors, positive
and negative (negative_manifest.json), plus the pinned roots' authenticity."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cleanroom.attestation import trust
from cleanroom.attestation.abi import snp as snp_abi
from cleanroom.attestation.abi import tdx as tdx_abi
from cleanroom.attestation.abi.amd_cert import load_certificates
from cleanroom.cli import main

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
NEGATIVE = json.loads((VECTORS / "negative_manifest.json").read_text())
P384_N = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
             "581a0db248b0a77aecec196accc52973", 16)
P256_N = int("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551", 16)


def cli(capsys, *args: str) -> tuple[int, dict]:
    code = main(["attest", "verify", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


POSITIVE = [e for e in MANIFEST if e["signature_verifies"]]


@pytest.mark.parametrize("entry", POSITIVE, ids=[e["file"] for e in POSITIVE])
def test_real_vector_accepted_through_cli(capsys, entry):
    args = [str(VECTORS / entry["file"]), "--at", entry["verify_at"]]
    if entry.get("cert"):
        args += ["--vcek", str(VECTORS / entry["cert"])]
    code, out = cli(capsys, *args, "--measurement", entry["measurement_hex"],
                    "--report-data", entry["report_data_hex"])
    assert code == 0, out["reasons"]
    assert out["verdict"] == "accepted"
    assert out["format"] == entry["format"]
    assert out["measurement"] == entry["measurement_hex"]
    assert out["report_data"] == entry["report_data_hex"]
    assert out["debug"] is entry["debug"]
    if entry["format"] == "sev-snp":
        assert out["product"] == entry["product"]
        assert out["signing_key"] == entry["signing_key"]
        assert out["simulated"] is False and out["root"].startswith("amd-")


def test_every_product_and_key_type_is_covered():
    covered = {(e["product"], e["signing_key"]) for e in POSITIVE if e["format"] == "sev-snp"}
    assert {p for p, _ in covered} == {"Milan", "Genoa", "Turin"}
    assert {k for _, k in covered} == {"vcek", "vlek"}
    versions = {e["report_version"] for e in POSITIVE if e["format"] == "sev-snp"}
    assert {2, 3, 5} <= versions


def _mutate(data: bytes, spec: dict) -> bytes:
    buf = bytearray(data)
    if "xor_byte" in spec:
        buf[spec["xor_byte"]["offset"]] ^= spec["xor_byte"]["value"]
    if "set_byte" in spec:
        buf[spec["set_byte"]["offset"]] = spec["set_byte"]["value"]
    if "truncate" in spec:
        del buf[spec["truncate"]:]
    if "append" in spec:
        buf += bytes.fromhex(spec["append"])
    if spec.get("malleate_snp_s"):
        s = snp_abi.parse_report(bytes(buf)).signature.s
        size = snp_abi.ECDSA_P384_COMPONENT_SIZE
        off = snp_abi.OFF_SIGNATURE + size
        buf[off:off + size] = (P384_N - s).to_bytes(size, "little")
    if spec.get("malleate_tdx_s"):
        quote = tdx_abi.parse_quote(bytes(buf))
        off = len(quote.signed_bytes) + 4 + 32  # u32 length, then r (32) and s (32)
        s = int.from_bytes(buf[off:off + 32], "big")
        buf[off:off + 32] = (P256_N - s).to_bytes(32, "big")
    return bytes(buf)


CASES = [(e, "negative") for e in NEGATIVE["negative"]] + \
    [(e, "still-verifies") for e in NEGATIVE["still_verifies"]]


@pytest.mark.parametrize(("entry", "kind"), CASES, ids=[c[0]["name"] for c in CASES])
def test_negative_manifest(capsys, tmp_path, entry, kind):
    data = (VECTORS / entry["file"]).read_bytes()
    if "mutate" in entry:
        data = _mutate(data, entry["mutate"])
        assert data != (VECTORS / entry["file"]).read_bytes()
    evidence = tmp_path / "evidence.bin"
    evidence.write_bytes(data)
    args = [str(evidence), "--at", entry["at"], *entry.get("args", [])]
    if entry.get("cert"):
        args += ["--vcek", str(VECTORS / entry["cert"])]
    code, out = cli(capsys, *args)
    assert code == entry["expect_exit"], out["reasons"]
    failed = {c["check"] for c in out.get("checks", []) if not c["passed"]}
    assert set(entry["expect_failed"]) <= failed, (failed, out["reasons"])
    if kind == "still-verifies":
        assert out["verdict"] == "accepted"
    else:
        assert out["verdict"] == "rejected" and out["reasons"]


def test_vcek_as_der_and_as_bundle_with_untrusted_ask_ark(capsys, tmp_path):
    """A PEM bundle with ASK/ARK is accepted, but those extra certificates are ignored: a fake
    ASK/ARK in the bundle does not make a foreign chain verify, nor break a genuine one."""
    entry = next(e for e in POSITIVE if e["file"] == "snp/genoa_v5_vcek_yaxi.bin")
    vcek = load_certificates((VECTORS / entry["cert"]).read_bytes())[0]
    der = tmp_path / "vcek.der"
    der.write_bytes(vcek.public_bytes(serialization.Encoding.DER))
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek", str(der),
                    "--at", entry["verify_at"])
    assert code == 0, out["reasons"]
    from cleanroom.attestation.simulated import create_simulated_root

    fake = create_simulated_root(tmp_path / "fake", rsa_bits=2048)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((VECTORS / entry["cert"]).read_bytes() + fake.bundle_pem)
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek", str(bundle),
                    "--at", entry["verify_at"])
    assert code == 0 and out["root"] == "amd-genoa-vcek"


def test_unusable_inputs_exit_2(capsys, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00" * 100)
    assert cli(capsys, str(garbage))[0] == 2
    assert cli(capsys, str(tmp_path / "missing.bin"))[0] == 2
    entry = POSITIVE[0]
    bad_cert = tmp_path / "bad.pem"
    bad_cert.write_text("not a certificate")
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek", str(bad_cert))
    assert code == 2 and out["verdict"] == "rejected"
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek",
                    str(VECTORS / entry["cert"]), "--at", "yesterday")
    assert code == 2 and "ISO 8601" in out["error"]
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek",
                    str(VECTORS / entry["cert"]), "--measurement", "abcd")
    assert code == 2 and "48 bytes" in out["error"]
    bad_policy = tmp_path / "policy.toml"
    bad_policy.write_text("allow_debug = 'maybe'\nmesurements = []\n")
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek",
                    str(VECTORS / entry["cert"]), "--policy", str(bad_policy))
    assert code == 2 and "allow_debug" in out["error"] and "mesurements" in out["error"]


def test_policy_file_is_applied(capsys, tmp_path):
    entry = next(e for e in POSITIVE if e["product"] == "Turin")
    policy = tmp_path / "policy.toml"
    policy.write_text('name = "turin-only"\nproducts = ["Milan"]\n[min_tcb.Turin]\nsnp = 99\n')
    code, out = cli(capsys, str(VECTORS / entry["file"]), "--vcek",
                    str(VECTORS / entry["cert"]), "--at", entry["verify_at"],
                    "--policy", str(policy))
    failed = {c["check"] for c in out["checks"] if not c["passed"]}
    assert code == 1 and {"product_allowed", "tcb_floor"} <= failed


def test_show_prints_every_field(capsys):
    for entry in MANIFEST:
        assert main(["attest", "show", str(VECTORS / entry["file"])]) == 0
        text = capsys.readouterr().out
        assert "format:" in text
        if entry["format"] == "sev-snp":
            for field in ("version", "measurement", "report_data", "chip_id", "reported_tcb",
                          "policy", "signing_key", "platform_info"):
                assert re.search(rf"^\s*{field}", text, re.M), field
        else:
            assert "mr_td" in text and "rtmr0" in text


def _fingerprints_from_provenance() -> dict[str, str]:
    text = (Path(trust.__file__).parent / "PROVENANCE.md").read_text()
    return dict(re.findall(r"\| `(\w+\.pem)` \| [^|]+ \| `([0-9a-f]{64})`", text))


def test_pinned_roots_are_genuine():
    """Every pinned root matches its recorded fingerprint and signs what it should."""
    recorded = _fingerprints_from_provenance()
    chains = trust.amd_chains()
    assert {(c.product.value, c.signing_key) for c in chains} == {
        (p, k) for p in ("Milan", "Genoa", "Turin") for k in ("vcek", "vlek")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pinned roots must parse without any warning
        for chain in chains:
            chain.intermediate.verify_directly_issued_by(chain.ark)
            chain.ark.verify_directly_issued_by(chain.ark)
    root = trust.intel_sgx_root()
    root.verify_directly_issued_by(root)
    folder = Path(trust.__file__).parent
    for pem in sorted(folder.glob("*.pem")):
        der = x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        assert hashlib.sha256(der).hexdigest() == recorded[pem.name], pem.name
        twin = VECTORS / "roots" / pem.name
        assert twin.read_bytes() == pem.read_bytes(), f"{pem.name} differs from tests copy"
