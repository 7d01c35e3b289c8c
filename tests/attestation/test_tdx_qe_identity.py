"""TDX without collateral: the Quoting Enclave must still be Intel's.

The PCK signs the report of any enclave allowed the provisioning key, and a host with flexible
launch control can give that to an enclave of its own; only Intel's TD Quoting Enclave makes the
attestation key Intel's. So without collateral the QE report is checked against Intel's QE
identity pinned in ``cleanroom.attestation.trust``, whose values are shown here to be exactly
those of an Intel-signed PCS QE identity document.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom.attestation import trust
from cleanroom.attestation.abi import tdx as abi
from cleanroom.attestation.collateral_folder import CollateralFolder, load_collateral
from cleanroom.attestation.evidence import Endorsements, verify_evidence
from cleanroom.attestation.validate.policy import Policy, load_policy
from cleanroom.attestation.verdict import Verdict
from cleanroom.attestation.verify.tdx import verify_tdx
from tests.attestation.test_tdx import (
    AT_REAL,
    DCAP_QVL,
    REAL_CASES,
    FakePki,
    build_quote,
    load_hex,
    make_pki,
)
from tests.attestation.test_tdx_collateral import FakePcs, make_pcs

REAL_COLLATERAL = DCAP_QVL / "collateral-2025-03"
AT_FAKE = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def failures(verdict: Verdict) -> list[str]:
    return [c.name for c in verdict.failures]


def reason(verdict: Verdict, name: str) -> str:
    return next(c.reason for c in verdict.checks if c.name == name)


def test_pinned_values_are_intels_signed_qe_identity() -> None:
    """The pinned values equal the identity of Intel's PCS TD_QE document in tests/vectors,
    whose signature (by the TCB signing certificate, chained to the pinned Intel root) holds."""
    document = (REAL_COLLATERAL / "qe_identity.json").read_bytes()
    provenance = Path(trust.__file__).with_name("PROVENANCE.md").read_text()
    assert hashlib.sha256(document).hexdigest() in provenance  # the file PROVENANCE.md cites
    collateral = load_collateral(REAL_COLLATERAL)
    quote = abi.parse_quote(load_hex(DCAP_QVL / "quote-from-tappd.hex"))
    verification = verify_tdx(quote, at=AT_REAL, root=trust.intel_sgx_root(),
                              collateral=collateral)
    signed = {c.name: c.passed for c in verification.checks}
    assert signed["tcb_signing_chain"] and signed["qe_identity_signature"]
    assert signed["qe_identity_fresh"]
    values = collateral.qe_identity.values
    pinned = trust.intel_td_qe_identity()
    for field in ("mrsigner", "isvprodid", "miscselect", "miscselect_mask", "attributes",
                  "attributes_mask"):
        assert getattr(pinned, field) == getattr(values, field), field


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_genuine_quotes_verify_without_collateral(case: str) -> None:
    loader, at = REAL_CASES[case]
    verdict = verify_evidence(loader(), policy=Policy(), at=at)
    assert verdict.accepted, verdict.reasons
    assert "pinned" in reason(verdict, "qe_identity")
    assert reason(verdict, "tcb_status") == "not checked: no collateral given"


def test_verify_tdx_checks_the_qe_only_when_given_an_identity() -> None:
    quote = abi.parse_quote(load_hex(DCAP_QVL / "quote-from-tappd.hex"))
    plain = verify_tdx(quote, at=AT_REAL, root=trust.intel_sgx_root())
    assert "qe_identity" not in [c.name for c in plain.checks]  # "not checked if None"
    pinned = verify_tdx(quote, at=AT_REAL, root=trust.intel_sgx_root(),
                        qe_identity=trust.intel_td_qe_identity())
    assert [c.name for c in pinned.checks][-1] == "qe_identity" and pinned.authentic


@pytest.fixture(scope="module")
def fake_pki() -> FakePki:
    return make_pki()


@pytest.fixture
def fake_root(fake_pki: FakePki, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePki]:
    """A self-made PCK chain stands in for Intel's (test only): the quote is then authentic
    in every other respect, so the QE identity is the one thing that decides."""
    monkeypatch.setattr(trust, "intel_sgx_root", lambda: fake_pki.root)
    yield fake_pki


IMPOSTORS = [
    ({"mr_signer": b"\x66" * 32}, "MRSIGNER",
     f"is {'66' * 32}, expect {trust.INTEL_TD_QE_MRSIGNER.hex()}"),
    ({"isv_prod_id": 1}, "ISVPRODID", "is 1, expect 2"),
    ({"attributes": bytes.fromhex("13") + bytes(15)}, "ATTRIBUTES",
     "is 13000000000000000000000000000000 (masked with fbffffffffffffff0000000000000000), "
     "expect 11000000000000000000000000000000"),
    ({"misc_select": 1}, "MISCSELECT", "is 01000000 (masked with ffffffff), expect 00000000"),
]


def test_the_fake_qe_with_intels_identity_is_accepted(fake_root: FakePki) -> None:
    """Control for the cases below: same quote, the QE report carries Intel's values."""
    verdict = verify_evidence(build_quote(fake_root), policy=Policy(), at=AT_FAKE)
    assert verdict.accepted, verdict.reasons


@pytest.mark.parametrize(("qe_report", "field", "detail"), IMPOSTORS,
                         ids=[field for _, field, _ in IMPOSTORS])
def test_a_qe_that_is_not_intels_is_refused(fake_root: FakePki, qe_report: dict[str, object],
                                            field: str, detail: str) -> None:
    verdict = verify_evidence(build_quote(fake_root, qe_report_kwargs=qe_report),
                              policy=Policy(), at=AT_FAKE)
    assert not verdict.accepted and not verdict.authentic and verdict.claims is None
    assert failures(verdict) == ["qe_identity"]
    assert f"QE {field} {detail}" in reason(verdict, "qe_identity")
    assert "pinned" in reason(verdict, "qe_identity")


def test_with_collateral_the_signed_identity_decides(fake_root: FakePki,
                                                     tmp_path: Path) -> None:
    """With collateral the QE is matched against the collateral's Intel-signed identity."""
    pcs: FakePcs = make_pcs(fake_root)
    folder = pcs.write(tmp_path / "pcs")
    verdict = verify_evidence(build_quote(fake_root), policy=Policy(require_collateral=True),
                              at=AT_FAKE, endorsements=Endorsements(collateral_dir=folder))
    assert verdict.accepted, verdict.reasons
    assert reason(verdict, "qe_identity").startswith("QE matches TD_QE")
    impostor = build_quote(fake_root, qe_report_kwargs={"mr_signer": b"\x66" * 32})
    verdict = verify_evidence(impostor, policy=Policy(), at=AT_FAKE,
                              endorsements=Endorsements(collateral=load_collateral(folder)))
    assert failures(verdict) == ["qe_identity"]
    assert "(TD_QE)" in reason(verdict, "qe_identity")


def test_collateral_folder_loads_once_and_follows_changes(fake_root: FakePki,
                                                          tmp_path: Path) -> None:
    pcs = make_pcs(fake_root)
    folder = pcs.write(tmp_path / "pcs")
    source = CollateralFolder(folder)
    first = source.current()
    assert source.current() is first  # unchanged folder: not read again
    (folder / "tcb_info.json").write_text("{")  # a broken refresh keeps what was loaded
    assert source.current() is first
    pcs.write(folder)  # a good refresh is picked up
    assert source.current() is not first
    verdict = verify_evidence(build_quote(fake_root), policy=Policy(require_collateral=True),
                              at=AT_FAKE, endorsements=Endorsements(collateral=source.current()))
    assert verdict.accepted, verdict.reasons
    with pytest.raises(ValueError, match="not both"):
        Endorsements(collateral=first, collateral_dir=folder)


def test_policy_can_require_collateral(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("require_collateral = true\n")
    policy = load_policy(path)
    assert policy.require_collateral
    verdict = verify_evidence(load_hex(DCAP_QVL / "quote-from-tappd.hex"), policy=policy,
                              at=AT_REAL)
    assert failures(verdict) == ["tcb_status"]
    assert "requires" in reason(verdict, "tcb_status")


def test_provision_writes_production_policies_that_require_collateral(tmp_path: Path) -> None:
    from cleanroom.coordinator.provision import ProvisionRequest, provision

    provision(ProvisionRequest(out=tmp_path / "prod", sites=["a"], enclave="configfs-tsm",
                               measurements=["ab" * 48], aggregator_measurements=["cd" * 48]))
    prod = tmp_path / "prod" / "coordinator" / "policy.toml"
    assert tomllib.loads(prod.read_text())["require_collateral"] is True
    assert load_policy(prod).require_collateral  # strict loading accepts what provision writes
    provision(ProvisionRequest(out=tmp_path / "sim", sites=["a"]))
    sim = load_policy(tmp_path / "sim" / "coordinator" / "policy.toml")
    assert not sim.require_collateral and sim.environment == "simulation"
