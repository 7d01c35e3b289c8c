"""TDX collateral: real Intel-signed TCB info / QE identity / CRLs, and a self-made PCS.

The real collateral (tests/vectors/tdx/dcap-qvl, see tests/vectors/PROVENANCE.md) is signed by
Intel's TCB signing key; its checks run against the pinned root. Every TCB-status branch is also
exercised with collateral signed by a self-made "TCB signing" certificate under the fake root of
``test_tdx.make_pki``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cleanroom.attestation.abi import tdx as abi
from cleanroom.attestation.abi.tdx_collateral import TdxCollateral, split_signed_json
from cleanroom.attestation.collateral_folder import load_collateral
from cleanroom.attestation.trust import INTEL_TD_QE_MRSIGNER, intel_sgx_root
from cleanroom.attestation.verify import collateral as col
from cleanroom.attestation.verify.tdx import TdxVerification, verify_tdx
from cleanroom.errors import CollateralError
from tests.attestation.test_tdx import (
    DCAP_QVL,
    FAKE_COMPONENTS,
    FAKE_FMSPC,
    FakePki,
    _sig_bytes,
    build_quote,
    load_hex,
    make_body,
    make_cert,
    make_pki,
)

UTC = dt.UTC
REAL_DIR = DCAP_QVL / "collateral-2025-03"
AT_REAL = dt.datetime(2025, 3, 20, tzinfo=UTC)
AT_REAL_CRL = dt.datetime(2026, 10, 20, tzinfo=UTC)  # inside the real CRLs' windows
AT_FAKE = dt.datetime(2025, 6, 1, tzinfo=UTC)


def failed_names(verification: TdxVerification) -> set[str]:
    return {c.name for c in verification.checks if not c.passed}


def reason(verification: TdxVerification, name: str) -> str:
    return next(c.reason for c in verification.checks if c.name == name)


@pytest.fixture(scope="module")
def tappd_quote() -> abi.TdxQuote:
    return abi.parse_quote(load_hex(DCAP_QVL / "quote-from-tappd.hex"))


@pytest.fixture(scope="module")
def real_collateral() -> TdxCollateral:
    return load_collateral(REAL_DIR)


# --------------------------------------------------------------------------- real collateral


def test_derived_pcs_files_match_the_verbatim_source() -> None:
    """collateral-2025-03/ is the dcap-qvl JSON re-wrapped in Intel PCS form, values untouched."""
    src = json.loads((DCAP_QVL / "tdx_quote_collateral-2025-03.json").read_text())
    assert (REAL_DIR / "tcb_info.json").read_text() == \
        '{"tcbInfo":' + src["tcb_info"] + ',"signature":"' + src["tcb_info_signature"] + '"}'
    assert (REAL_DIR / "qe_identity.json").read_text() == \
        '{"enclaveIdentity":' + src["qe_identity"] + ',"signature":"' + \
        src["qe_identity_signature"] + '"}'
    assert (REAL_DIR / "tcb_signing_chain.pem").read_text() == src["tcb_info_issuer_chain"]


def test_real_collateral_parses(real_collateral: TdxCollateral) -> None:
    info = real_collateral.tcb_info
    assert info.fmspc.hex() == "b0c06f000000" and info.tcb_evaluation_data_number == 17
    assert info.next_update == dt.datetime(2025, 4, 12, 7, 30, 24, tzinfo=UTC)
    assert [lvl.status for lvl in info.tcb_levels] == ["UpToDate", "OutOfDate"]
    assert [m.id for m in info.tdx_module_identities] == ["TDX_03", "TDX_01"]
    assert real_collateral.qe_identity.isvprodid == 2
    assert real_collateral.pck_crl is None and real_collateral.root_crl is None


def test_real_collateral_signatures_and_identities(tappd_quote: abi.TdxQuote,
                                                   real_collateral: TdxCollateral) -> None:
    verification = verify_tdx(tappd_quote, at=AT_REAL, root=intel_sgx_root(),
                              collateral=real_collateral)
    # Everything Intel signed checks out; the platform itself (SEAMLDR ACM SVN 3 in the PCK
    # certificate) is below every TCB level Intel still lists for FMSPC b0c06f000000, which
    # Intel's algorithm reports as "TCB not supported".
    # Authentic (every verify check passes); the status is left to the policy to refuse.
    assert failed_names(verification) == set()
    assert "no TCB level of the TCB info matches" in reason(verification, "tcb_level")
    assert verification.tcb_status == col.TCB_NOT_SUPPORTED
    assert reason(verification, "tdx_module") == "TDX_01 SVN 5: UpToDate"
    assert reason(verification, "qe_tcb") == "QE ISVSVN 6: UpToDate"
    assert "signed by the TCB signing certificate" in reason(verification, "tcb_info_signature")


@pytest.mark.parametrize(("when", "failures", "needle"), [
    (dt.datetime(2025, 4, 20, tzinfo=UTC), {"tcb_info_fresh", "qe_identity_fresh"},
     "nextUpdate 2025-04-12T07:30:24+00:00"),
    (dt.datetime(2025, 6, 1, tzinfo=UTC),
     {"tcb_info_fresh", "qe_identity_fresh", "tcb_signing_chain"}, "expired 2025-05-21"),
    (dt.datetime(2025, 3, 1, tzinfo=UTC), {"tcb_info_fresh", "qe_identity_fresh"},
     "issued 2025-03-13"),
])
def test_real_collateral_out_of_its_window(tappd_quote: abi.TdxQuote,
                                           real_collateral: TdxCollateral,
                                           when: dt.datetime, failures: set[str],
                                           needle: str) -> None:
    verification = verify_tdx(tappd_quote, at=when, root=intel_sgx_root(),
                              collateral=real_collateral)
    assert failed_names(verification) == failures
    assert any(needle in c.reason for c in verification.checks if not c.passed)


def _copy_real(tmp_path: Path) -> Path:
    for name in ("tcb_info.json", "qe_identity.json", "tcb_signing_chain.pem"):
        (tmp_path / name).write_bytes((REAL_DIR / name).read_bytes())
    return tmp_path


def test_tampered_real_tcb_info_fails(tmp_path: Path, tappd_quote: abi.TdxQuote) -> None:
    path = _copy_real(tmp_path) / "tcb_info.json"
    path.write_text(path.read_text().replace('"pcesvn":11', '"pcesvn":10', 1))
    verification = verify_tdx(tappd_quote, at=AT_REAL, root=intel_sgx_root(),
                              collateral=load_collateral(tmp_path))
    assert "tcb_info_signature" in failed_names(verification)
    assert "qe_identity_signature" not in failed_names(verification)


def test_signature_covers_raw_bytes_not_reserialised_json(tmp_path: Path,
                                                          tappd_quote: abi.TdxQuote) -> None:
    path = _copy_real(tmp_path) / "tcb_info.json"
    doc = json.loads(path.read_text())
    # Pretty-printing the wrapper only: the tcbInfo bytes are unchanged, still verifies.
    raw = path.read_text()
    body = raw[len('{"tcbInfo":'):raw.rindex(',"signature"')]
    path.write_text('{\n  "signature" : "' + doc["signature"] + '",\n  "tcbInfo" :  ' + body
                    + "\n}\n")
    verification = verify_tdx(tappd_quote, at=AT_REAL, root=intel_sgx_root(),
                              collateral=load_collateral(tmp_path))
    assert "tcb_info_signature" not in failed_names(verification)
    # Re-serialising the value (same data, other whitespace) breaks the signature.
    path.write_text(json.dumps(doc, indent=1))
    verification = verify_tdx(tappd_quote, at=AT_REAL, root=intel_sgx_root(),
                              collateral=load_collateral(tmp_path))
    assert "tcb_info_signature" in failed_names(verification)


def test_real_tcb_levels_with_other_platform_svns(real_collateral: TdxCollateral) -> None:
    """Intel's matching rule on the real TCB info, for platforms the quote is not from."""
    info = real_collateral.tcb_info
    base = abi.PckExtensions(ppid=bytes(16), tcb_components=(2, 2, 2, 2, 3, 1, 0, 5) + (0,) * 8,
                             pcesvn=11, cpusvn=bytes(16), pce_id=bytes(2),
                             fmspc=bytes.fromhex("b0c06f000000"), sgx_type=1)
    svn = bytes([5, 1, 2] + [0] * 13)
    level = col.match_tcb_level(info, base, svn)
    assert level is not None and level.status == "UpToDate"
    level = col.match_tcb_level(info, dataclasses.replace(base, pcesvn=7), svn)
    assert level is not None and level.status == "OutOfDate"
    assert "INTEL-SA-00837" in level.advisory_ids and len(level.advisory_ids) == 14
    assert col.match_tcb_level(info, base, bytes([5, 1, 1] + [0] * 13)) is None
    # Module version 0: components 0 and 1 are compared as well.
    assert col.match_tcb_level(info, base, bytes([4, 0, 2] + [0] * 13)) is None
    assert col.match_tcb_level(info, base, bytes([5, 0, 2] + [0] * 13)) is not None


def test_real_crls(tappd_quote: abi.TdxQuote, real_collateral: TdxCollateral) -> None:
    pck_crl = x509.load_der_x509_crl(load_hex(DCAP_QVL / "pck_crl-2026-10-08.hex"))
    root_crl = x509.load_der_x509_crl(load_hex(DCAP_QVL / "root_crl-2026-02-26.hex"))
    both = dataclasses.replace(real_collateral, pck_crl=pck_crl, root_crl=root_crl)
    verification = verify_tdx(tappd_quote, at=AT_REAL_CRL, root=intel_sgx_root(),
                              collateral=both)
    assert {"pck_crl", "root_crl"}.isdisjoint(failed_names(verification))
    assert "57 entries" in reason(verification, "pck_crl")
    assert "PCK certificate not revoked" in reason(verification, "pck_crl")
    # The 2025 TCB info is stale by then: collateral dates are checked at the same time.
    assert "tcb_info_fresh" in failed_names(verification)
    swapped = dataclasses.replace(real_collateral, pck_crl=root_crl, root_crl=pck_crl)
    verification = verify_tdx(tappd_quote, at=AT_REAL_CRL, root=intel_sgx_root(),
                              collateral=swapped)
    assert {"pck_crl", "root_crl"} <= failed_names(verification)
    verification = verify_tdx(tappd_quote, at=dt.datetime(2026, 12, 1, tzinfo=UTC),
                              root=intel_sgx_root(), collateral=both)
    assert "expired: nextUpdate 2026-11-07" in reason(verification, "pck_crl")


def test_real_crl_files_load(tmp_path: Path, tappd_quote: abi.TdxQuote) -> None:
    _copy_real(tmp_path)
    (tmp_path / "pck_crl.der").write_bytes(load_hex(DCAP_QVL / "pck_crl-2026-10-08.hex"))
    crl = x509.load_der_x509_crl(load_hex(DCAP_QVL / "root_crl-2026-02-26.hex"))
    (tmp_path / "root_crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    loaded = load_collateral(tmp_path)
    assert loaded.pck_crl is not None and loaded.root_crl is not None
    (tmp_path / "root_crl.der").write_bytes(b"x")
    with pytest.raises(CollateralError, match=re.escape("both root_crl.der and root_crl.pem")):
        load_collateral(tmp_path)


# --------------------------------------------------------------------------- synthetic PCS


def _components(svns: list[int]) -> list[dict[str, int]]:
    return [{"svn": s} for s in svns + [0] * (16 - len(svns))]


def default_tcb_info(**overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": "TDX", "version": 3, "issueDate": "2025-05-01T00:00:00Z",
        "nextUpdate": "2025-07-01T00:00:00Z", "fmspc": FAKE_FMSPC.hex(), "pceId": "0000",
        "tcbType": 0, "tcbEvaluationDataNumber": 99,
        "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8,
                      "attributesMask": "FF" * 8},
        "tdxModuleIdentities": [{
            "id": "TDX_01", "mrsigner": "00" * 48, "attributes": "00" * 8,
            "attributesMask": "FF" * 8,
            "tcbLevels": [
                {"tcb": {"isvsvn": 5}, "tcbDate": "2025-01-01T00:00:00Z",
                 "tcbStatus": "UpToDate"},
                {"tcb": {"isvsvn": 2}, "tcbDate": "2024-01-01T00:00:00Z",
                 "tcbStatus": "OutOfDate", "advisoryIDs": ["INTEL-SA-MODULE"]}]}],
        "tcbLevels": [
            {"tcb": {"sgxtcbcomponents": _components(list(FAKE_COMPONENTS)), "pcesvn": 11,
                     "tdxtcbcomponents": _components([5, 0, 5])},
             "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"sgxtcbcomponents": _components([2, 2, 2, 2, 3, 1, 0, 3]), "pcesvn": 5,
                     "tdxtcbcomponents": _components([2, 0, 2])},
             "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "OutOfDate",
             "advisoryIDs": ["INTEL-SA-00001", "INTEL-SA-00002"]},
            {"tcb": {"sgxtcbcomponents": _components([1]), "pcesvn": 1,
                     "tdxtcbcomponents": _components([1, 0, 1])},
             "tcbDate": "2020-01-01T00:00:00Z", "tcbStatus": "Revoked"}],
    }
    info.update(overrides)
    return info


def default_qe_identity(**overrides: Any) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "id": "TD_QE", "version": 2, "issueDate": "2025-05-01T00:00:00Z",
        "nextUpdate": "2025-07-01T00:00:00Z", "tcbEvaluationDataNumber": 99,
        "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
        "attributes": "11" + "00" * 15, "attributesMask": "FBFFFFFFFFFFFFFF" + "00" * 8,
        "mrsigner": INTEL_TD_QE_MRSIGNER.hex().upper(), "isvprodid": 2,
        "tcbLevels": [
            {"tcb": {"isvsvn": 6}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 4}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "OutOfDate",
             "advisoryIDs": ["INTEL-SA-QE"]},
            {"tcb": {"isvsvn": 1}, "tcbDate": "2020-01-01T00:00:00Z", "tcbStatus": "Revoked"}],
    }
    ident.update(overrides)
    return ident


@dataclasses.dataclass
class FakePcs:
    pki: FakePki
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, folder: Path, *, tcb_info: dict[str, Any] | None = None,
              qe_identity: dict[str, Any] | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, key, doc in (("tcb_info.json", "tcbInfo", tcb_info or default_tcb_info()),
                               ("qe_identity.json", "enclaveIdentity",
                                qe_identity or default_qe_identity())):
            body = json.dumps(doc, separators=(",", ":"))
            sig = _sig_bytes(self.key, body.encode())
            (folder / name).write_text(f'{{"{key}":{body},"signature":"{sig.hex()}"}}')
        (folder / "tcb_signing_chain.pem").write_bytes(
            self.cert.public_bytes(serialization.Encoding.PEM)
            + self.pki.root.public_bytes(serialization.Encoding.PEM))
        return folder

    def crl(self, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
            revoked: list[int], *, last: dt.datetime | None = None,
            nxt: dt.datetime | None = None) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
                   .last_update(last or dt.datetime(2025, 5, 1, tzinfo=UTC))
                   .next_update(nxt or dt.datetime(2025, 7, 1, tzinfo=UTC)))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(dt.datetime(2025, 5, 1, tzinfo=UTC)).build())
        return builder.sign(issuer_key, hashes.SHA256())


def make_pcs(pki: FakePki) -> FakePcs:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert("Intel SGX TCB Signing", key, "Fake SGX Root CA", pki.root_key, ca=False,
                     not_before=pki.not_before, not_after=pki.not_after, serial=77)
    return FakePcs(pki, key, cert)


@pytest.fixture(scope="module")
def pki() -> FakePki:
    return make_pki()


@pytest.fixture(scope="module")
def pcs(pki: FakePki) -> FakePcs:
    return make_pcs(pki)


def _verify(pki: FakePki, folder: Path, *, at: dt.datetime = AT_FAKE,
            **quote_kwargs: Any) -> TdxVerification:
    quote = abi.parse_quote(build_quote(pki, **quote_kwargs))
    return verify_tdx(quote, at=at, root=pki.root, collateral=load_collateral(folder))


def _svn(*head: int) -> bytes:
    return bytes(list(head) + [0] * (16 - len(head)))


def test_synthetic_up_to_date(tmp_path: Path, pki: FakePki, pcs: FakePcs) -> None:
    verification = _verify(pki, pcs.write(tmp_path))
    assert verification.authentic, verification.failures
    assert verification.tcb_status == "UpToDate" and verification.advisory_ids == ()
    assert verification.collateral_checked


@pytest.mark.parametrize(("svn", "qe_svn", "status", "advisories"), [
    (_svn(5, 1, 3), 6, "OutOfDate", ("INTEL-SA-00001", "INTEL-SA-00002")),  # platform
    (_svn(3, 1, 5), 6, "OutOfDate", ("INTEL-SA-MODULE",)),  # TDX module SVN 3 < 5
    (_svn(5, 1, 5), 5, "OutOfDate", ("INTEL-SA-QE",)),  # QE ISVSVN 5 < 6
    (_svn(5, 0, 5), 6, "UpToDate", ()),  # module version 0: tdxModule, all components
])
def test_synthetic_statuses(tmp_path: Path, pki: FakePki, pcs: FakePcs, svn: bytes,
                            qe_svn: int, status: str, advisories: tuple[str, ...]) -> None:
    verification = _verify(pki, pcs.write(tmp_path), body=make_body(tee_tcb_svn=svn),
                           qe_report_kwargs={"isv_svn": qe_svn})
    assert verification.authentic, verification.failures
    assert verification.tcb_status == status
    assert verification.advisory_ids == advisories


def test_configuration_needed_converges_to_out_of_date_configuration_needed() -> None:
    assert col.converge("ConfigurationNeeded", "OutOfDate") == "OutOfDateConfigurationNeeded"
    assert col.converge("SWHardeningNeeded", "OutOfDate") == "OutOfDate"
    assert col.converge("UpToDate", "Revoked") == "Revoked"
    assert col.converge("OutOfDate", "UpToDate") == "OutOfDate"
    assert col.converge("ConfigurationNeeded", None) == "ConfigurationNeeded"


def test_synthetic_revoked_and_unsupported(tmp_path: Path, pki: FakePki, pcs: FakePcs) -> None:
    low = make_pki(components=(1,) + (0,) * 15, pcesvn=1)
    low_pcs = FakePcs(low, pcs.key, make_cert("Intel SGX TCB Signing", pcs.key,
                                              "Fake SGX Root CA", low.root_key, ca=False,
                                              not_before=low.not_before,
                                              not_after=low.not_after, serial=78))
    folder = low_pcs.write(tmp_path / "low")
    verification = _verify(low, folder, body=make_body(tee_tcb_svn=_svn(5, 1, 1)))
    assert failed_names(verification) == {"tcb_level"}
    assert verification.tcb_status == "Revoked"
    verification = _verify(low, folder, body=make_body(tee_tcb_svn=_svn(5, 1, 0)))
    assert "no TCB level" in reason(verification, "tcb_level")
    assert verification.tcb_status == col.TCB_NOT_SUPPORTED
    verification = _verify(pki, pcs.write(tmp_path / "qe"), qe_report_kwargs={"isv_svn": 2})
    assert failed_names(verification) == {"qe_tcb", "tcb_level"}  # a revoked QE revokes all
    assert verification.tcb_status == "Revoked"
    verification = _verify(pki, pcs.write(tmp_path / "qe"), qe_report_kwargs={"isv_svn": 0})
    assert "below every TCB level" in reason(verification, "qe_tcb")


def test_synthetic_identity_mismatches(tmp_path: Path, pki: FakePki, pcs: FakePcs) -> None:
    folder = pcs.write(tmp_path, tcb_info=default_tcb_info(fmspc="00906ED50000"))
    assert failed_names(_verify(pki, folder)) == {"fmspc"}
    folder = pcs.write(tmp_path, qe_identity=default_qe_identity(mrsigner="AB" * 32))
    verification = _verify(pki, folder)
    assert failed_names(verification) == {"qe_identity"}
    assert "MRSIGNER" in reason(verification, "qe_identity")
    folder = pcs.write(tmp_path, qe_identity=default_qe_identity(isvprodid=1))
    assert failed_names(_verify(pki, folder)) == {"qe_identity"}
    verification = _verify(pki, pcs.write(tmp_path),
                           qe_report_kwargs={"attributes": b"\x13" + bytes(15)})
    assert "ATTRIBUTES" in reason(verification, "qe_identity")
    verification = _verify(pki, pcs.write(tmp_path), qe_report_kwargs={"misc_select": 1})
    assert "MISCSELECT" in reason(verification, "qe_identity")
    verification = _verify(pki, pcs.write(tmp_path), body=make_body(tee_tcb_svn=_svn(5, 2, 5)))
    assert failed_names(verification) == {"tdx_module"}
    assert "TDX_02" in reason(verification, "tdx_module")
    info = default_tcb_info()
    info["tdxModuleIdentities"][0]["mrsigner"] = "11" * 48
    verification = _verify(pki, pcs.write(tmp_path, tcb_info=info))
    assert "MRSIGNERSEAM" in reason(verification, "tdx_module")


def test_synthetic_expired_collateral_names_the_date(tmp_path: Path, pki: FakePki,
                                                     pcs: FakePcs) -> None:
    folder = pcs.write(tmp_path)
    verification = _verify(pki, folder, at=dt.datetime(2025, 8, 1, tzinfo=UTC))
    assert failed_names(verification) == {"tcb_info_fresh", "qe_identity_fresh"}
    assert "nextUpdate 2025-07-01T00:00:00+00:00" in reason(verification, "tcb_info_fresh")


def test_synthetic_collateral_from_a_foreign_signer(tmp_path: Path, pki: FakePki) -> None:
    other = make_pki()
    foreign = FakePcs(pki, *_signing(other))
    verification = _verify(pki, foreign.write(tmp_path))
    assert failed_names(verification) == {"tcb_signing_chain"}
    # A signature by another key over genuine-looking content.
    good = make_pcs(pki)
    folder = good.write(tmp_path / "good")
    (folder / "tcb_signing_chain.pem").write_bytes(
        make_pcs(pki).cert.public_bytes(serialization.Encoding.PEM))
    verification = _verify(pki, folder)
    assert failed_names(verification) == {"tcb_info_signature", "qe_identity_signature"}


def _signing(other: FakePki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert("Intel SGX TCB Signing", key, "Fake SGX Root CA", other.root_key, ca=False,
                     not_before=other.not_before, not_after=other.not_after, serial=79)
    return key, cert


def _write_crls(folder: Path, pck: x509.CertificateRevocationList | None,
                root: x509.CertificateRevocationList | None) -> None:
    for name, crl in (("pck_crl.der", pck), ("root_crl.pem", root)):
        if crl is not None:
            encoding = serialization.Encoding.DER if name.endswith(".der") else \
                serialization.Encoding.PEM
            (folder / name).write_bytes(crl.public_bytes(encoding))


def test_synthetic_crls(tmp_path: Path, pki: FakePki, pcs: FakePcs) -> None:
    cases = [
        ("ok", pcs.crl(pki.inter, pki.inter_key, [5, 6]), pcs.crl(pki.root, pki.root_key, []),
         set(), None),
        ("pck-revoked", pcs.crl(pki.inter, pki.inter_key, [pki.pck.serial_number]), None,
         {"pck_crl"}, "PCK certificate (serial 1234567) is REVOKED"),
        ("inter-revoked", None, pcs.crl(pki.root, pki.root_key, [pki.inter.serial_number]),
         {"root_crl"}, "PCK intermediate CA (serial 2) is REVOKED"),
        ("signer-revoked", None, pcs.crl(pki.root, pki.root_key, [pcs.cert.serial_number]),
         {"root_crl"}, "TCB signing certificate (serial 4d) is REVOKED"),
        ("wrong-key", pcs.crl(pki.inter, pki.root_key, []), None, {"pck_crl"},
         "does not verify"),
        ("wrong-issuer", pcs.crl(pki.root, pki.root_key, []), None, {"pck_crl"},
         "is not the PCK intermediate CA"),
        ("stale", pcs.crl(pki.inter, pki.inter_key, [], nxt=dt.datetime(2025, 5, 20,
                                                                          tzinfo=UTC)),
         None, {"pck_crl"}, "expired: nextUpdate 2025-05-20"),
    ]
    for name, pck_crl, root_crl, failures, needle in cases:
        folder = pcs.write(tmp_path / name)
        _write_crls(folder, pck_crl, root_crl)
        verification = _verify(pki, folder)
        assert failed_names(verification) == failures, name
        if needle:
            assert any(needle in c.reason for c in verification.checks), (name, needle)


# --------------------------------------------------------------------------- malformed collateral


def _raw(pcs: FakePcs, tmp_path: Path) -> Path:
    return pcs.write(tmp_path)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t[:-1], "not a JSON object|invalid JSON"),
    (lambda t: t + " trailing", "unexpected text after the object"),
    (lambda t: t.replace('"signature"', '"tcbInfo"'), "duplicate top-level key"),
    (lambda t: t.replace('"fmspc":"b0c06f000000"', '"fmspc":"b0c06f0000zz"'), "fmspc is not hex"),
    (lambda t: t.replace('"fmspc":"b0c06f000000"', '"fmspc":"b0c06f"'), "fmspc is 6 hex digits"),
    (lambda t: t.replace('"id":"TDX"', '"id":"SGX"'), "expect 'TDX'"),
    (lambda t: t.replace('"version":3', '"version":2'), "version is 2, expect 3"),
    (lambda t: t.replace('"tcbStatus":"UpToDate"', '"tcbStatus":"Fine"', 1), "tcbStatus"),
    (lambda t: t.replace('"pcesvn":11', '"pcesvn":"11"'), "pcesvn is str"),
    (lambda t: t.replace('"issueDate":"2025-05-01T00:00:00Z"', '"issueDate":"yesterday"'),
     "not an ISO 8601 date"),
    (lambda t: t.replace('"tcbInfo"', '"tcbinfo"'), "'tcbInfo' is missing"),
    (lambda t: t.rsplit('"signature":"', 1)[0] + '"signature":"abcd"}', "expect 64"),
    (lambda t: t.replace('"pceId":"0000",', '"pceId":"0000","pceId":"0001",'),
     "duplicate key"),
])
def test_malformed_tcb_info(tmp_path: Path, pcs: FakePcs, mutate: Any, message: str) -> None:
    folder = _raw(pcs, tmp_path)
    path = folder / "tcb_info.json"
    path.write_text(mutate(path.read_text()))
    with pytest.raises(CollateralError, match=message):
        load_collateral(folder)


def test_malformed_files(tmp_path: Path, pcs: FakePcs) -> None:
    folder = _raw(pcs, tmp_path)
    (folder / "qe_identity.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CollateralError, match="not UTF-8"):
        load_collateral(folder)
    pcs.write(folder)
    (folder / "qe_identity.json").write_text(
        (folder / "qe_identity.json").read_text().replace('"TD_QE"', '"QE"'))
    with pytest.raises(CollateralError, match="expect 'TD_QE'"):
        load_collateral(folder)
    pcs.write(folder)
    (folder / "tcb_signing_chain.pem").write_text("nothing")
    with pytest.raises(CollateralError, match=re.escape("tcb_signing_chain.pem")):
        load_collateral(folder)
    pcs.write(folder)
    (folder / "pck_crl.der").write_bytes(b"\x30\x03\x02\x01\x01")
    with pytest.raises(CollateralError, match=re.escape("pck_crl.der: not a DER or PEM X.509 CRL")):
        load_collateral(folder)
    (folder / "pck_crl.der").unlink()
    (folder / "qe_identity.json").unlink()
    with pytest.raises(CollateralError, match=re.escape("qe_identity.json is missing")):
        load_collateral(folder)
    with pytest.raises(CollateralError, match="is not a folder"):
        load_collateral(folder / "nope")


def test_split_signed_json_slices_exact_bytes() -> None:
    text = b'  { "a" : {"x": 1,  "y":[1, 2]} , "b":"s" }  '
    members = split_signed_json(text, "t")
    assert members["a"] == ({"x": 1, "y": [1, 2]}, b'{"x": 1,  "y":[1, 2]}')
    assert members["b"] == ("s", b'"s"')
    assert split_signed_json(b"{}", "t") == {}
    for bad in (b"[]", b'{"a" 1}', b'{"a":1,}', b'{"a":1 "b":2}', b"", b'{"a":' + b"[" * 5000):
        with pytest.raises(CollateralError):
            split_signed_json(bad, "t")


def test_collateral_through_verify_evidence(tmp_path: Path) -> None:
    from cleanroom.attestation.evidence import Endorsements, verify_evidence
    from cleanroom.attestation.validate.policy import Policy

    data = load_hex(DCAP_QVL / "quote-from-tappd.hex")
    verdict = verify_evidence(data, policy=Policy(), at=AT_REAL,
                              endorsements=Endorsements(collateral_dir=REAL_DIR))
    assert not verdict.accepted and verdict.authentic
    assert [c.name for c in verdict.failures] == ["tcb_status"]  # refused by the policy
    assert "TcbNotSupported" in verdict.failures[0].reason
    assert any(c.name == "tcb_info_signature" and c.passed for c in verdict.checks)
    (tmp_path / "tcb_info.json").write_text("{")
    verdict = verify_evidence(data, policy=Policy(), at=AT_REAL,
                              endorsements=Endorsements(collateral_dir=tmp_path))
    assert not verdict.accepted and "CollateralError" in verdict.summary
