#!/usr/bin/env python3
"""Re-check every collected attestation vector and pinned root in this folder.

Standalone: needs only the standard library and ``cryptography``. Run from this folder::

    python check_vectors.py                  # one line per root / vector, exit 1 on any surprise
    python check_vectors.py --write-manifest # (re)write manifest.json from the table below

What is checked (see PROVENANCE.md for where each file came from):

* roots/: every AMD ARK is self-signed (RSA-4096, RSASSA-PSS/SHA-384); every ASK/ASVK is directly
  issued by the ARK of its product; the Intel SGX Root CA is self-signed (ECDSA P-256) and the
  Intel intermediates kept for tests are issued by it.
* SEV-SNP reports: VERSION, SIGNATURE_ALGO == 1, ECDSA P-384/SHA-384 signature (R, S little endian,
  72 bytes each at 0x2A0) over report[0:0x2A0] verifies with the VCEK/VLEK key; the VCEK/VLEK is
  directly issued by the pinned ASK/ASVK of its product; the TCB in the certificate equals the
  report's REPORTED_TCB; for a VCEK the hwID equals CHIP_ID.
* TDX quotes: header version and TEE type 0x81; quote ECDSA P-256 signature over header||body (v5:
  header||body type||body size||body) with the attestation key; QE report signature with the PCK
  key; QE report binding (SHA-256(attestation key || QE auth data) in REPORT_DATA[0:32], rest
  zero); PCK chain -> Intel SGX Root CA identical to roots/intel_sgx_root_ca.pem.
* negative vectors must FAIL the check named in the manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import sys
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

HERE = Path(__file__).resolve().parent
ROOTS = HERE / "roots"

# VCEK/VLEK certificates have serial number 0; cryptography warns about it and nothing else.
warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")

AMD_OID = "1.3.6.1.4.1.3704.1"
PRODUCTS = ("Milan", "Genoa", "Turin")

# ----------------------------------------------------------------------------- the vector table
# file, cert, format, signing key, expectation, short provenance note (details in PROVENANCE.md)
VECTORS = [
    {"file": "snp/milan_v2_vcek_oak.bin", "cert": "snp/milan_v2_vcek_oak_vcek.pem",
     "notes": "project-oak/oak oak_attestation_verification/testdata/oc_evidence.textproto "
              "(root_layer.remote_attestation_report) + oc_vcek_milan.pem; real Oak Containers evidence, "
              "generated 2024-03-22 per the file header."},
    {"file": "snp/milan_v3_vcek_azure_sidecar.bin", "cert": "snp/milan_v3_vcek_azure_sidecar_vcek.pem",
     "notes": "microsoft/confidential-sidecar-containers pkg/attest/platform_cert_fetcher_test.go "
              "(hex report + THIM cert chain); Azure Container Instances Milan."},
    {"file": "snp/milan_v3_vcek_yaxi.bin", "cert": "snp/milan_v3_vcek_yaxi_vcek.pem",
     "notes": "veehaitch/routex-client-lua tests/attestation_spec.lua ('unmet requirements (Milan)', "
              "base64) + tests/data/vcek-chain-milan.pem. Upstream test expects rejection only for its "
              "own minimum committed-version policy (1.55.29 < 1.55.35); signature and chain are valid."},
    {"file": "snp/genoa_v3_vcek_azure_trustee.bin", "cert": "snp/genoa_v3_vcek_azure_trustee_vcek.pem",
     "notes": "confidential-containers/trustee deps/verifier/test_data/az-snp-vtpm/evidence-genoa.json "
              "(SNP report at offset 0x20 of the Azure HCL report, 'report' byte array) + vcek-genoa.pem."},
    {"file": "snp/genoa_v3_vcek_yaxi.bin", "cert": "snp/genoa_v3_vcek_yaxi_vcek.pem",
     "notes": "veehaitch/routex-client-lua tests/attestation_spec.lua ('unmet requirements (Genoa v3)') "
              "+ tests/data/vcek-chain-genoa.pem. Upstream rejects only for its committed-version policy."},
    {"file": "snp/genoa_v5_vcek_yaxi.bin", "cert": "snp/genoa_v5_vcek_yaxi_vcek.pem",
     "notes": "veehaitch/routex-client-lua tests/attestation_spec.lua ('Works with valid SEV-VCEK and "
              "attestation report (Genoa v5)') + tests/data/vcek-chain-genoa-v5.pem. Mitigation vectors 0x0b."},
    {"file": "snp/turin_v5_vcek_yaxi.bin", "cert": "snp/turin_v5_vcek_yaxi_vcek.pem",
     "notes": "veehaitch/routex-client-lua tests/report_spec.lua / attestation_spec.lua (Turin; the file "
              "says it comes from project-oak/oak testdata/turin_oc_evidence.textproto @ cbb5d5c) + "
              "tests/data/vcek-chain-turin.pem. Turin TCB layout (FMC byte), 8-byte hwID."},
    {"file": "snp/milan_v2_vlek_aws_constellation.bin", "cert": "snp/milan_v2_vlek_aws_constellation_vlek.pem",
     "notes": "edgelesssys/constellation internal/attestation/aws/snp/testdata/report_valid.hex; VLEK from "
              "certs_valid.hex (extended-report certificate table, VLEK GUID a8074bc2-...). AWS EC2 Milan, "
              "CSP cc-test.amazonaws.com. CHIP_ID is zero (VLEK/masked)."},
    {"file": "snp/milan_v2_vlek_aws_constellation_2.bin", "cert": "snp/milan_v2_vlek_aws_constellation_2_vlek.pem",
     "notes": "edgelesssys/constellation internal/attestation/snp/testdata/testdata.go AttestationReportVLEK "
              "(hex); same VLEK as the previous vector (same AWS host, different REPORT_DATA)."},
    {"file": "snp/negative/milan_v2_vlek_aws_constellation_report_invalid.bin",
     "cert": "snp/milan_v2_vlek_aws_constellation_vlek.pem", "expect_fail": "signature",
     "notes": "NEGATIVE: edgelesssys/constellation internal/attestation/aws/snp/testdata/report_invalid.hex = "
              "report_valid.hex with one byte of REPORT_ID changed (offset 0x150: 0x8c -> 0x9c); the report "
              "signature must not verify. Cert chain is valid."},
    {"file": "tdx/dcap-qvl_tappd_tdx10_v4.dat", "cert": None,
     "notes": "Phala-Network/dcap-qvl dcap-qvl-js/sample/quote-from-tappd.hex (already vendored as "
              "tdx/dcap-qvl/quote-from-tappd.hex) converted hex->bytes; v4 TDX 1.0; 70 bytes of zero "
              "padding after the signature data."},
]


# ----------------------------------------------------------------------------- helpers
def load_certs(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_der_x509_certificate(data)]


def load_cert(path: Path) -> x509.Certificate:
    return load_certs(path)[0]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def window(certs: list[x509.Certificate]) -> tuple[dt.datetime, dt.datetime]:
    return (max(c.not_valid_before_utc for c in certs), min(c.not_valid_after_utc for c in certs))


def verify_at(certs: list[x509.Certificate]) -> dt.datetime:
    start, end = window(certs)
    at = start + dt.timedelta(days=1)
    assert at < end, "no common validity window"
    return at


# ----------------------------------------------------------------------------- roots
def check_roots() -> list[tuple[str, bool, str]]:
    out = []
    for product in PRODUCTS:
        p = product.lower()
        ark = load_cert(ROOTS / f"amd_{p}_ark.pem")
        ok = issued_by(ark, ark) and cn(ark.subject) == f"ARK-{product}" and ark.public_key().key_size == 4096
        out.append((f"roots/amd_{p}_ark.pem", ok, f"self-signed RSA-{ark.public_key().key_size} PSS "
                    f"{iso(ark.not_valid_before_utc)}..{iso(ark.not_valid_after_utc)} sha256 {fingerprint(ark)[:16]}"))
        for kind, want_cn in (("ask", f"SEV-{product}"), ("asvk", f"SEV-VLEK-{product}")):
            c = load_cert(ROOTS / f"amd_{p}_{kind}.pem")
            ok = issued_by(c, ark) and cn(c.subject) == want_cn
            out.append((f"roots/amd_{p}_{kind}.pem", ok, f"{want_cn} issued by ARK-{product} sha256 {fingerprint(c)[:16]}"))
    root = load_cert(ROOTS / "intel_sgx_root_ca.pem")
    ok = issued_by(root, root) and cn(root.subject) == "Intel SGX Root CA" and isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    out.append(("roots/intel_sgx_root_ca.pem", ok, f"self-signed ECDSA P-256 sha256 {fingerprint(root)[:16]}"))
    for name in ("intel_sgx_pck_platform_ca.pem", "intel_sgx_tcb_signing.pem"):
        c = load_cert(ROOTS / name)
        out.append((f"roots/{name}", issued_by(c, root), f"{cn(c.subject)} issued by Intel SGX Root CA (not pinned)"))
    return out


# ----------------------------------------------------------------------------- SEV-SNP
SNP_SIZE = 0x4A0
SNP_SIGNED = 0x2A0


def _amd_ext_int(cert: x509.Certificate, oid: str) -> int | None:
    try:
        raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None
    if len(raw) < 3 or raw[0] != 0x02:
        raise ValueError(f"extension {oid} is not a DER INTEGER")
    return int.from_bytes(raw[2:2 + raw[1]], "big")


def _amd_ext_raw(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value.value
    except x509.ExtensionNotFound:
        return None


def analyze_snp(report_path: Path, cert_path: Path) -> dict:
    r = report_path.read_bytes()
    if len(r) < SNP_SIZE:
        raise ValueError(f"report is {len(r)} bytes")
    version, = struct.unpack_from("<I", r, 0x00)
    policy, = struct.unpack_from("<Q", r, 0x08)
    sig_algo, = struct.unpack_from("<I", r, 0x34)
    cert = load_cert(cert_path)
    issuer_cn = cn(cert.issuer)
    kind = "vlek" if issuer_cn.startswith("SEV-VLEK-") else "vcek"
    product = issuer_cn.rsplit("-", 1)[-1]
    p = product.lower()
    inter = load_cert(ROOTS / f"amd_{p}_{'asvk' if kind == 'vlek' else 'ask'}.pem")
    ark = load_cert(ROOTS / f"amd_{p}_ark.pem")

    rr = int.from_bytes(r[SNP_SIGNED:SNP_SIGNED + 72], "little")
    ss = int.from_bytes(r[SNP_SIGNED + 72:SNP_SIGNED + 144], "little")
    try:
        cert.public_key().verify(encode_dss_signature(rr, ss), r[:SNP_SIGNED], ec.ECDSA(hashes.SHA384()))
        sig_ok = True
    except InvalidSignature:
        sig_ok = False
    chain_ok = issued_by(cert, inter) and issued_by(inter, ark) and issued_by(ark, ark)

    rt = r[0x180:0x188]  # REPORTED_TCB
    if product == "Turin":  # FMC, BL, TEE, SNP, rsvd x3, UCODE
        report_tcb = {"fmc": rt[0], "bl": rt[1], "tee": rt[2], "snp": rt[3], "ucode": rt[7]}
    else:  # BL, TEE, rsvd x4, SNP, UCODE
        report_tcb = {"bl": rt[0], "tee": rt[1], "snp": rt[6], "ucode": rt[7]}
    cert_tcb = {"bl": _amd_ext_int(cert, f"{AMD_OID}.3.1"), "tee": _amd_ext_int(cert, f"{AMD_OID}.3.2"),
                "snp": _amd_ext_int(cert, f"{AMD_OID}.3.3"), "ucode": _amd_ext_int(cert, f"{AMD_OID}.3.8")}
    if product == "Turin":
        cert_tcb["fmc"] = _amd_ext_int(cert, f"{AMD_OID}.3.9")
    tcb_ok = cert_tcb == report_tcb
    hwid = _amd_ext_raw(cert, f"{AMD_OID}.4")
    chip_id = r[0x1A0:0x1E0]
    hwid_ok = None if kind == "vlek" else (hwid is not None and chip_id[:len(hwid)] == hwid)

    certs = [cert, inter, ark]
    start, end = window(certs)
    return {
        "format": "sev-snp", "product": product, "signing_key": kind, "report_version": version,
        "measurement_hex": r[0x90:0xC0].hex(), "report_data_hex": r[0x50:0x90].hex(),
        "debug": bool(policy >> 19 & 1), "cert_valid_from": iso(cert.not_valid_before_utc),
        "cert_valid_until": iso(cert.not_valid_after_utc), "verify_at": iso(verify_at(certs)),
        "signature_verifies": sig_ok,
        "_checks": {"sig_algo_1": sig_algo == 1, "signature": sig_ok, "chain": chain_ok,
                    "tcb_matches_cert": tcb_ok, "hwid_matches_chip_id": hwid_ok,
                    "window": f"{iso(start)}..{iso(end)}"},
    }


# ----------------------------------------------------------------------------- TDX
def analyze_tdx(path: Path) -> dict:
    q = path.read_bytes()
    version, key_type, tee_type = struct.unpack_from("<HHI", q, 0)
    if tee_type != 0x81 or key_type != 2 or version not in (4, 5):
        raise ValueError(f"not a TDX ECDSA-P256 quote v4/v5: version={version} key={key_type} tee={tee_type:#x}")
    off = 48
    if version == 4:
        body_type, body_size = 2, 584
    else:
        body_type, body_size = struct.unpack_from("<HI", q, off)
        off += 6
    body = q[off:off + body_size]
    signed = q[:off + body_size]
    off += body_size
    sig_len, = struct.unpack_from("<I", q, off)
    off += 4
    sig_data = q[off:off + sig_len]
    qsig, att_key = sig_data[0:64], sig_data[64:128]
    ctype, csize = struct.unpack_from("<HI", sig_data, 128)
    assert ctype == 6, f"outer certification data type {ctype}"
    cd = sig_data[134:134 + csize]
    qe_report, qe_sig = cd[0:384], cd[384:448]
    auth_len, = struct.unpack_from("<H", cd, 448)
    auth = cd[450:450 + auth_len]
    itype, isize = struct.unpack_from("<HI", cd, 450 + auth_len)
    assert itype == 5, f"inner certification data type {itype}"
    pem = cd[456 + auth_len:456 + auth_len + isize]
    chain = list(x509.load_pem_x509_certificates(pem.rstrip(b"\x00")))

    def p256(pub: bytes) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + pub)

    def ok(key, sig: bytes, msg: bytes) -> bool:
        try:
            key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                       msg, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            return False

    quote_sig_ok = ok(p256(att_key), qsig, signed)
    qe_sig_ok = ok(chain[0].public_key(), qe_sig, qe_report)
    rd = qe_report[320:384]
    binding_ok = rd[:32] == hashlib.sha256(att_key + auth).digest() and rd[32:] == bytes(32)
    pinned = load_cert(ROOTS / "intel_sgx_root_ca.pem")
    chain_ok = (len(chain) == 3 and issued_by(chain[0], chain[1]) and issued_by(chain[1], chain[2])
                and chain[2].public_bytes(Encoding.DER) == pinned.public_bytes(Encoding.DER))
    td_attributes = int.from_bytes(body[120:128], "little")
    start, end = window(chain)
    return {
        "format": "tdx", "quote_version": version, "tdx_body": "1.5" if body_type == 3 else "1.0",
        "measurement_hex": body[136:184].hex(), "report_data_hex": body[520:584].hex(),
        "debug": bool(td_attributes & 1), "cert_valid_from": iso(chain[0].not_valid_before_utc),
        "cert_valid_until": iso(chain[0].not_valid_after_utc), "verify_at": iso(verify_at(chain)),
        "signature_verifies": quote_sig_ok and qe_sig_ok,
        "_checks": {"quote_signature": quote_sig_ok, "qe_report_signature": qe_sig_ok,
                    "qe_report_binding": binding_ok, "pck_chain_to_pinned_root": chain_ok,
                    "pck_issuer": cn(chain[0].issuer), "trailing_bytes": len(q) - off - sig_len,
                    "window": f"{iso(start)}..{iso(end)}"},
    }


# ----------------------------------------------------------------------------- main
def analyze(entry: dict) -> dict:
    path = HERE / entry["file"]
    if entry["file"].startswith("tdx/"):
        return analyze_tdx(path)
    return analyze_snp(path, HERE / entry["cert"])


def manifest_entry(entry: dict) -> dict:
    a = analyze(entry)
    out = {"file": entry["file"], "format": a["format"], "cert": entry["cert"]}
    if a["format"] == "sev-snp":
        out.update(product=a["product"], signing_key=a["signing_key"], report_version=a["report_version"])
    else:
        out.update(quote_version=a["quote_version"], tdx_body=a["tdx_body"])
    for k in ("measurement_hex", "report_data_hex", "debug", "cert_valid_from", "cert_valid_until",
              "verify_at", "signature_verifies"):
        out[k] = a[k]
    if "expect_fail" in entry:
        out["negative"] = True
        out["expected_failure"] = entry["expect_fail"]
    out["sha256"] = hashlib.sha256((HERE / entry["file"]).read_bytes()).hexdigest()
    out["notes"] = entry["notes"]
    return out


def main(argv: list[str]) -> int:
    if "--write-manifest" in argv:
        manifest = [manifest_entry(e) for e in VECTORS]
        (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote manifest.json ({len(manifest)} vectors)")
        return 0
    bad = 0
    for name, ok, detail in check_roots():
        bad += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {name}: {detail}")
    manifest = {m["file"]: m for m in json.loads((HERE / "manifest.json").read_text())}
    for entry in VECTORS:
        a = analyze(entry)
        c = a["_checks"]
        m = manifest.get(entry["file"], {})
        drift = [k for k in ("measurement_hex", "report_data_hex", "debug", "verify_at", "signature_verifies")
                 if m.get(k) != a[k]]
        sha_ok = m.get("sha256") == hashlib.sha256((HERE / entry["file"]).read_bytes()).hexdigest()
        if a["format"] == "sev-snp":
            good = c["sig_algo_1"] and c["signature"] and c["chain"] and c["tcb_matches_cert"] and c["hwid_matches_chip_id"] is not False
            desc = (f"SNP v{a['report_version']} {a['product']} {a['signing_key'].upper()} sig={c['signature']} "
                    f"chain={c['chain']} tcb={c['tcb_matches_cert']} hwid={c['hwid_matches_chip_id']} window={c['window']}")
        else:
            good = all(c[k] for k in ("quote_signature", "qe_report_signature", "qe_report_binding", "pck_chain_to_pinned_root"))
            desc = (f"TDX v{a['quote_version']} body {a['tdx_body']} quote_sig={c['quote_signature']} "
                    f"qe_sig={c['qe_report_signature']} binding={c['qe_report_binding']} "
                    f"chain={c['pck_chain_to_pinned_root']} window={c['window']}")
        if "expect_fail" in entry:
            # a negative vector must fail exactly the named check and pass the chain check
            ok = (not c[entry["expect_fail"]]) and c.get("chain", True)
            status = "OK  " if ok and not drift and sha_ok else "FAIL"
            print(f"{status} {entry['file']}: NEGATIVE (expected {entry['expect_fail']} failure) {desc}")
        else:
            ok = good and not drift and sha_ok
            status = "OK  " if ok else "FAIL"
            extra = f" manifest-drift={drift}" if drift else ""
            extra += "" if sha_ok else " sha256-mismatch"
            print(f"{status} {entry['file']}: {desc}{extra}")
        bad += not ok
    print(f"{'all checks passed' if not bad else f'{bad} check(s) FAILED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
