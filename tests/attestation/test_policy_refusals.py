"""Every attestation-policy check shown refusing the bad case, through ``verify_evidence``.

Complements ``test_snp_simulated.test_each_policy_check_refuses`` (the SEV-SNP checks) with:

* TDX: each policy check refuses a real, authentic quote (pinned Intel root) when the policy asks
  for another value, and the same quote is accepted by a policy that pins its actual values;
  TD_ATTRIBUTES.DEBUG and collateral statuses use self-made quotes under a substituted root.
* SEV-SNP: the checks whose refusal was not paired with an "accepted when the policy allows it"
  control (migration agent, VMPL), the TCB floor per component, and the Turin-only FMC floor.
* Policy files: a wrong type or an unknown key is a :class:`ConfigError` naming the field.

Each case asserts that the named check is the *only* failure, so it cannot pass by accident.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleanroom.attestation import trust
from cleanroom.attestation.abi import snp as snp_abi
from cleanroom.attestation.abi import tdx as tdx_abi
from cleanroom.attestation.evidence import Endorsements, verify_evidence
from cleanroom.attestation.simulated import (
    DEFAULT_GUEST_POLICY,
    SimulatedChip,
    SimulatedRoot,
)
from cleanroom.attestation.validate.policy import Policy, load_policy
from cleanroom.attestation.verdict import Verdict
from cleanroom.errors import ConfigError
from tests.attestation.snp_helpers import patch_u32, patch_u64, resign
from tests.attestation.test_tdx import (
    DCAP_QVL,
    FakePki,
    build_quote,
    load_hex,
    make_body,
    make_pki,
)
from tests.attestation.test_tdx_collateral import FakePcs, make_pcs

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
UTC = dt.UTC


def failures(verdict: Verdict) -> list[str]:
    return [c.name for c in verdict.failures]


def reason(verdict: Verdict, name: str) -> str:
    return next(c.reason for c in verdict.checks if c.name == name)


def assert_refused_by(verdict: Verdict, check: str) -> None:
    """Rejected by the policy layer alone, and by exactly ``check``."""
    assert not verdict.accepted
    assert verdict.authentic, verdict.reasons  # parse and signatures were fine
    assert failures(verdict) == [check], verdict.reasons


# ================================================================== TDX: real quote, pinned root

TDX_AT = dt.datetime(2025, 3, 20, tzinfo=UTC)  # inside the real PCK chain's validity


@pytest.fixture(scope="module")
def tappd() -> bytes:
    return load_hex(DCAP_QVL / "quote-from-tappd.hex")


@pytest.fixture(scope="module")
def tappd_pinned(tappd: bytes) -> Policy:
    """A TDX policy that pins every value of the real quote: every TDX check runs and passes."""
    body = tdx_abi.parse_quote(tappd).body
    return Policy(formats=["tdx"], measurements=[body.mr_td],
                  rtmrs={i: [getattr(body, f"rtmr{i}")] for i in range(4)},
                  mr_seam=[body.mr_seam], config_id=body.mr_config_id, mr_owner=body.mr_owner,
                  min_tee_tcb_svn=body.tee_tcb_svn, report_data=body.report_data)


TDX_CHECKS = ["format", "measurement", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "debug", "mr_seam",
              "config_id", "mr_owner", "tcb_floor", "tcb_status", "report_data"]


def test_tdx_real_quote_accepted_when_policy_pins_its_values(tappd: bytes,
                                                             tappd_pinned: Policy) -> None:
    verdict = verify_evidence(tappd, policy=tappd_pinned, at=TDX_AT)
    assert verdict.accepted, verdict.reasons
    ran = {c.name for c in verdict.checks}
    assert set(TDX_CHECKS) <= ran  # every check of validate_tdx actually ran


OTHER48 = "ab" * 48


def _other_rtmr(index: int) -> Any:
    return lambda p: {**{i: [v.hex() for v in vs] for i, vs in p.rtmrs.items()},
                      index: [OTHER48]}


TDX_REFUSALS: list[tuple[str, str, Any]] = [
    ("format", "formats", lambda p: ["sev-snp"]),
    ("measurement", "measurements", lambda p: [OTHER48]),
    *[(f"rtmr{i}", "rtmrs", _other_rtmr(i)) for i in range(4)],
    ("mr_seam", "mr_seam", lambda p: [OTHER48]),
    ("config_id", "config_id", lambda p: OTHER48),
    ("mr_owner", "mr_owner", lambda p: OTHER48),
    # real TEE_TCB_SVN is 05 01 02 00..: one byte above the quote's, first and third byte
    ("tcb_floor", "min_tee_tcb_svn", lambda p: "060102" + "00" * 13),
    ("tcb_floor", "min_tee_tcb_svn", lambda p: "050103" + "00" * 13),
    ("tcb_status", "require_collateral", lambda p: True),
    ("report_data", "report_data", lambda p: "cd" * 64),
]


@pytest.mark.parametrize(("check", "field", "value"), TDX_REFUSALS,
                         ids=[f"{c}-{f}-{i}" for i, (c, f, _) in enumerate(TDX_REFUSALS)])
def test_tdx_policy_check_refuses_real_quote(tappd: bytes, tappd_pinned: Policy, check: str,
                                             field: str, value: Any) -> None:
    policy = tappd_pinned.with_updates(**{field: value(tappd_pinned)})
    verdict = verify_evidence(tappd, policy=policy, at=TDX_AT)
    assert_refused_by(verdict, check)


def test_tdx_formats_sev_snp_only_refuses_tdx(tappd: bytes) -> None:
    verdict = verify_evidence(tappd, policy=Policy(formats=["sev-snp"]), at=TDX_AT)
    assert_refused_by(verdict, "format")
    assert "sev-snp" in reason(verdict, "format")


def test_tdx_require_collateral_names_the_missing_collateral(tappd: bytes) -> None:
    verdict = verify_evidence(tappd, policy=Policy(require_collateral=True), at=TDX_AT)
    assert_refused_by(verdict, "tcb_status")
    assert "collateral" in reason(verdict, "tcb_status")
    assert verify_evidence(tappd, policy=Policy(), at=TDX_AT).accepted


# ============================================ TDX: self-made quotes under a substituted root

FAKE_AT = dt.datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def fake_pki() -> FakePki:
    return make_pki()


@pytest.fixture
def fake_root_pinned(fake_pki: FakePki, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePki]:
    """Make verify_evidence anchor TDX quotes in the self-made root (test only)."""
    monkeypatch.setattr(trust, "intel_sgx_root", lambda: fake_pki.root)
    yield fake_pki


def test_tdx_debug_td_refused_unless_allowed(fake_root_pinned: FakePki) -> None:
    pki = fake_root_pinned
    honest = build_quote(pki, body=make_body(td_attributes=1 << 28))  # SEPT_VE_DISABLE only
    assert verify_evidence(honest, policy=Policy(), at=FAKE_AT).accepted
    debug = build_quote(pki, body=make_body(td_attributes=(1 << 28) | 1))
    verdict = verify_evidence(debug, policy=Policy(), at=FAKE_AT)
    assert_refused_by(verdict, "debug")
    assert verdict.claims is not None and verdict.claims.debug
    assert verify_evidence(debug, policy=Policy(allow_debug=True), at=FAKE_AT).accepted


@pytest.fixture(scope="module")
def fake_pcs(fake_pki: FakePki) -> FakePcs:
    return make_pcs(fake_pki)


def test_tdx_tcb_status_out_of_date_refused_unless_accepted(
        fake_root_pinned: FakePki, fake_pcs: FakePcs, tmp_path: Path) -> None:
    folder = fake_pcs.write(tmp_path / "pcs")
    ends = Endorsements(collateral_dir=folder)
    current = build_quote(fake_root_pinned)
    assert verify_evidence(current, policy=Policy(require_collateral=True), at=FAKE_AT,
                           endorsements=ends).accepted
    old_module = build_quote(fake_root_pinned, body=make_body(tee_tcb_svn=bytes([3, 1, 5])
                                                              + bytes(13)))
    verdict = verify_evidence(old_module, policy=Policy(), at=FAKE_AT, endorsements=ends)
    assert_refused_by(verdict, "tcb_status")
    assert "OutOfDate" in reason(verdict, "tcb_status")
    relaxed = Policy(accepted_tcb_statuses=["UpToDate", "OutOfDate"])
    assert verify_evidence(old_module, policy=relaxed, at=FAKE_AT, endorsements=ends).accepted


# ================================================================= SEV-SNP: simulated chip

MEASUREMENT = bytes(range(48))
REPORT_DATA = bytes(range(64, 128))


@pytest.fixture(scope="module")
def chip(sim_root: SimulatedRoot) -> SimulatedChip:
    return SimulatedChip.launch(sim_root, MEASUREMENT)


def snp_policy(sim_root_dir: Path, **changes: Any) -> Policy:
    base: dict[str, Any] = {"environment": "simulation",
                            "simulated_root": sim_root_dir / "root_chain.pem",
                            "measurements": [MEASUREMENT.hex()], "report_data": REPORT_DATA.hex()}
    return Policy.model_validate({**base, **changes})


def snp_verdict(report: bytes, chip: SimulatedChip, policy: Policy) -> Verdict:
    return verify_evidence(report, policy=policy, endorsements=Endorsements(chip.vcek_pem))


def test_snp_migration_agent_refused_unless_allowed(chip: SimulatedChip,
                                                    sim_root_dir: Path) -> None:
    report = resign(patch_u64(chip.report(REPORT_DATA), snp_abi.OFF_POLICY,
                              DEFAULT_GUEST_POLICY | 1 << snp_abi.POLICY_MIGRATE_MA_BIT),
                    chip.vcek_key)
    assert_refused_by(snp_verdict(report, chip, snp_policy(sim_root_dir)), "migration_agent")
    allowed = snp_policy(sim_root_dir, allow_migration_agent=True)
    assert snp_verdict(report, chip, allowed).accepted


def test_snp_vmpl_refused_unless_policy_names_it(chip: SimulatedChip,
                                                  sim_root_dir: Path) -> None:
    report = resign(patch_u32(chip.report(REPORT_DATA), snp_abi.OFF_VMPL, 2), chip.vcek_key)
    verdict = snp_verdict(report, chip, snp_policy(sim_root_dir))
    assert_refused_by(verdict, "vmpl")
    assert "expect 0" in reason(verdict, "vmpl")
    assert snp_verdict(report, chip, snp_policy(sim_root_dir, vmpl=2)).accepted
    assert snp_verdict(report, chip, snp_policy(sim_root_dir, vmpl=None)).accepted
    honest = chip.report(REPORT_DATA)  # VMPL 0 is refused by a policy that wants VMPL 2
    assert_refused_by(snp_verdict(honest, chip, snp_policy(sim_root_dir, vmpl=2)), "vmpl")


@pytest.mark.parametrize("component", ["bootloader", "tee", "snp", "microcode"])
def test_snp_tcb_floor_each_component(chip: SimulatedChip, sim_root_dir: Path,
                                      component: str) -> None:
    have = {"bootloader": chip.tcb.bootloader, "tee": chip.tcb.tee, "snp": chip.tcb.snp,
            "microcode": chip.tcb.microcode}
    report = chip.report(REPORT_DATA)
    at_floor = snp_policy(sim_root_dir, min_tcb={"Milan": have})
    assert snp_verdict(report, chip, at_floor).accepted
    above = {**have, component: have[component] + 1}
    verdict = snp_verdict(report, chip, snp_policy(sim_root_dir, min_tcb={"Milan": above}))
    assert_refused_by(verdict, "tcb_floor")
    assert f"{component}={have[component]} < {have[component] + 1}" in reason(verdict,
                                                                                 "tcb_floor")


def test_snp_tcb_floor_of_another_product_does_not_apply(chip: SimulatedChip,
                                                         sim_root_dir: Path) -> None:
    policy = snp_policy(sim_root_dir, min_tcb={"Genoa": {"snp": 255}})
    assert snp_verdict(chip.report(REPORT_DATA), chip, policy).accepted


TURIN = next(e for e in json.loads((VECTORS / "manifest.json").read_text())
             if e.get("product") == "Turin" and e["signature_verifies"])


def test_snp_tcb_floor_fmc_on_real_turin_report() -> None:
    """Turin adds the FMC component (REPORTED_TCB here: fmc=0 bootloader=1 snp=2 ucode=71)."""
    data = (VECTORS / TURIN["file"]).read_bytes()
    ends = Endorsements((VECTORS / TURIN["cert"]).read_bytes())
    at = dt.datetime.fromisoformat(TURIN["verify_at"].replace("Z", "+00:00"))
    tcb = snp_abi.parse_report(data).tcb("reported", snp_abi.Product.TURIN).components()
    exact = Policy(min_tcb={"Turin": tcb})
    assert verify_evidence(data, policy=exact, endorsements=ends, at=at).accepted
    above = Policy(min_tcb={"Turin": {**tcb, "fmc": tcb["fmc"] + 1}})
    verdict = verify_evidence(data, policy=above, endorsements=ends, at=at)
    assert_refused_by(verdict, "tcb_floor")
    assert f"fmc={tcb['fmc']} < {tcb['fmc'] + 1}" in reason(verdict, "tcb_floor")


# ==================================================================== malformed policy files


def _write(tmp_path: Path, suffix: str, text: str) -> Path:
    path = tmp_path / f"policy{suffix}"
    path.write_text(text)
    return path


BAD_TOML = [
    ("allow_debug = 'maybe'\n", "allow_debug"),
    ("mesurements = []\n", "mesurements"),
    ("vmpl = 7\n", "vmpl"),
    ("formats = ['sgx']\n", "formats.0"),
    ("measurements = ['abcd']\n", "measurements.0"),
    ("family_id = 'zz'\n", "family_id"),
    ("rtmrs = { 4 = ['" + "00" * 48 + "'] }\n", "rtmrs"),
    ("max_evidence_bytes = 'big'\n", "max_evidence_bytes"),
    ("[min_tcb.Milan]\nsnpp = 3\n", "min_tcb.Milan.snpp"),
    ("[min_tcb.Milan]\nsnp = 300\n", "min_tcb.Milan.snp"),
    ("[min_tcb.Rome]\nsnp = 3\n", "min_tcb.Rome"),
]


@pytest.mark.parametrize(("text", "field"), BAD_TOML, ids=[f for _, f in BAD_TOML])
def test_bad_toml_policy_is_config_error_naming_the_field(tmp_path: Path, text: str,
                                                          field: str) -> None:
    path = _write(tmp_path, ".toml", text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  - {field}" in message, message


BAD_JSON: list[tuple[dict[str, Any], str]] = [
    ({"allow_debug": "maybe"}, "allow_debug"),
    ({"allow_debg": True}, "allow_debg"),
    ({"measurements": "00" * 48}, "measurements"),  # a string, not a list
    ({"min_guest_svn": -1}, "min_guest_svn"),
    ({"min_tcb": {"Genoa": {"microcode": "high"}}}, "min_tcb.Genoa.microcode"),
    ({"report_data": "00" * 32}, "report_data"),
]


@pytest.mark.parametrize(("doc", "field"), BAD_JSON, ids=[f for _, f in BAD_JSON])
def test_bad_json_policy_is_config_error_naming_the_field(tmp_path: Path, doc: dict[str, Any],
                                                          field: str) -> None:
    path = _write(tmp_path, ".json", json.dumps(doc))
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert f"  - {field}" in str(info.value), str(info.value)


def test_every_bad_field_is_named_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, ".toml", "allow_debug = 'maybe'\nmesurements = []\nvmpl = 9\n")
    with pytest.raises(ConfigError, match="3 invalid field") as info:
        load_policy(path)
    for field in ("allow_debug", "mesurements", "vmpl"):
        assert f"  - {field}" in str(info.value)


@pytest.mark.parametrize(("suffix", "text", "match"), [
    (".toml", "allow_debug = \n", "not valid TOML"),
    (".json", "{", "not valid JSON"),
    (".json", "[]", "top level"),
])
def test_unparsable_policy_file_is_config_error(tmp_path: Path, suffix: str, text: str,
                                                match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_policy(_write(tmp_path, suffix, text))


def test_valid_policy_files_load(tmp_path: Path) -> None:
    """Control for the cases above: the same keys with good values load in both formats."""
    toml = _write(tmp_path, ".toml", "allow_debug = false\nvmpl = 1\n"
                  "[min_tcb.Milan]\nsnp = 3\n")
    assert load_policy(toml).min_tcb["Milan"].snp == 3
    js = _write(tmp_path, ".json", json.dumps({"allow_debug": True, "min_guest_svn": 1}))
    assert load_policy(js).allow_debug is True
