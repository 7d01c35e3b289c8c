"""SEV-SNP verification with the simulated chain: every check shown accepting and refusing."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cleanroom.attestation.abi import snp as abi
from cleanroom.attestation.evidence import Endorsements, verify_evidence
from cleanroom.attestation.simulated import (
    SimulatedChip,
    SimulatedTcb,
    create_simulated_root,
    issue_vcek,
)
from cleanroom.attestation.trust import load_simulated_chain
from cleanroom.attestation.validate.policy import Policy, TcbFloor
from cleanroom.errors import ConfigError
from tests.attestation.snp_helpers import patch, patch_u32, patch_u64, resign

MEASUREMENT = bytes(range(48))
REPORT_DATA = bytes(range(64, 128))


@pytest.fixture(scope="module")
def chip(sim_root) -> SimulatedChip:
    return SimulatedChip.launch(sim_root, MEASUREMENT)


@pytest.fixture(scope="module")
def chains(sim_root_dir):
    return load_simulated_chain(sim_root_dir / "root_chain.pem")


def policy(sim_root_dir, **kw) -> Policy:
    base = {"environment": "simulation", "simulated_root": sim_root_dir / "root_chain.pem",
            "measurements": [MEASUREMENT.hex()], "report_data": REPORT_DATA.hex()}
    base.update(kw)
    return Policy.model_validate(base)


def verdict(report: bytes, vcek: bytes, pol: Policy, **kw):
    return verify_evidence(report, policy=pol, endorsements=Endorsements(vcek), **kw)


def failed_names(v) -> set[str]:
    return {c.name for c in v.failures}


def test_honest_report_accepted(chip, sim_root_dir):
    v = verdict(chip.report(REPORT_DATA), chip.vcek_pem, policy(sim_root_dir))
    assert v.accepted, v.reasons
    assert v.claims.simulated and v.claims.product == "Milan" and v.claims.signing_key == "vcek"
    assert v.claims.measurement == MEASUREMENT and v.claims.report_data == REPORT_DATA


@pytest.mark.parametrize(("field", "pol_kw", "mutate"), [
    ("measurement", {"measurements": ["ab" * 48]}, None),
    ("report_data", {"report_data": "cd" * 64}, None),
    ("debug", {}, lambda r: patch_u64(r, abi.OFF_POLICY, 0x30000 | 1 << abi.POLICY_DEBUG_BIT)),
    ("migration_agent", {},
     lambda r: patch_u64(r, abi.OFF_POLICY, 0x30000 | 1 << abi.POLICY_MIGRATE_MA_BIT)),
    ("vmpl", {}, lambda r: patch_u32(r, abi.OFF_VMPL, 2)),
    ("product_allowed", {"products": ["Genoa"]}, None),
    ("signing_key_allowed", {"signing_keys": ["vlek"]}, None),
    ("tcb_floor", {"min_tcb": {"Milan": TcbFloor(snp=99)}}, None),
    ("guest_svn", {"min_guest_svn": 5}, None),
    ("report_version", {"min_report_version": 5}, None),
    ("family_id", {"family_id": "11" * 16}, None),
    ("image_id", {"image_id": "22" * 16}, None),
    ("host_data", {"host_data": "33" * 32}, None),
    ("format", {"formats": ["tdx"]}, None),
])
def test_each_policy_check_refuses(chip, sim_root_dir, field, pol_kw, mutate):
    report = chip.report(REPORT_DATA)
    if mutate is not None:
        report = resign(mutate(report), chip.vcek_key)
    v = verdict(report, chip.vcek_pem, policy(sim_root_dir, **pol_kw))
    assert not v.accepted
    assert v.authentic, "only the policy layer may fail here"
    assert field in failed_names(v), v.reasons


def test_allow_debug_accepts_debug_enclave(sim_root, sim_root_dir):
    debug_chip = SimulatedChip.launch(sim_root, MEASUREMENT, debug=True)
    report = debug_chip.report(REPORT_DATA)
    assert not verdict(report, debug_chip.vcek_pem, policy(sim_root_dir)).accepted
    assert verdict(report, debug_chip.vcek_pem, policy(sim_root_dir, allow_debug=True)).accepted


def test_forged_signature_refused(chip, sim_root_dir):
    report = patch(chip.report(REPORT_DATA), abi.OFF_MEASUREMENT, b"\xff")  # edit signed bytes
    v = verdict(report, chip.vcek_pem, policy(sim_root_dir))
    assert "signature" in failed_names(v) and not v.authentic


def test_signature_of_other_key_refused(chip, sim_root_dir):
    report = resign(chip.report(REPORT_DATA), ec.generate_private_key(ec.SECP384R1()))
    assert "signature" in failed_names(verdict(report, chip.vcek_pem, policy(sim_root_dir)))


def test_malleated_signature_still_verifies(chip, sim_root_dir):
    """(r, n - s) is a second valid ECDSA signature: never deduplicate by signature bytes."""
    report = chip.report(REPORT_DATA)
    parsed = abi.parse_report(report)
    n = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
            "581a0db248b0a77aecec196accc52973", 16)
    size = abi.ECDSA_P384_COMPONENT_SIZE
    malleated = patch(report, abi.OFF_SIGNATURE + size,
                      (n - parsed.signature.s).to_bytes(size, "little"))
    assert malleated != report
    assert verdict(malleated, chip.vcek_pem, policy(sim_root_dir)).accepted


def test_untrusted_root_refused(chip, tmp_path):
    create_simulated_root(tmp_path, rsa_bits=2048)
    other = Policy(environment="simulation", simulated_root=tmp_path / "root_chain.pem",
                   measurements=[MEASUREMENT], report_data=REPORT_DATA)
    v = verdict(chip.report(REPORT_DATA), chip.vcek_pem, other)
    assert "chain" in failed_names(v)


def test_production_policy_never_trusts_simulated_root(chip, sim_root_dir):
    v = verdict(chip.report(REPORT_DATA), chip.vcek_pem,
                Policy(measurements=[MEASUREMENT], report_data=REPORT_DATA))
    assert "chain" in failed_names(v) and not v.accepted
    with pytest.raises(ValueError, match="production policies never trust"):
        Policy(simulated_root=sim_root_dir / "root_chain.pem")


def test_production_policy_file_with_simulated_root_is_config_error(tmp_path, sim_root_dir):
    from cleanroom.attestation.validate.policy import load_policy

    path = tmp_path / "p.toml"
    path.write_text(f'simulated_root = "{sim_root_dir / "root_chain.pem"}"\n')
    with pytest.raises(ConfigError, match="production"):
        load_policy(path)


def test_vcek_of_other_chip_refused(chip, sim_root, sim_root_dir):
    _, other = issue_vcek(sim_root, os.urandom(64), chip.tcb, key=chip.vcek_key)
    from cryptography.hazmat.primitives import serialization

    v = verdict(chip.report(REPORT_DATA), other.public_bytes(serialization.Encoding.PEM),
                policy(sim_root_dir))
    assert "chip_id" in failed_names(v)
    assert "signature" not in failed_names(v)


def test_vcek_tcb_must_equal_reported_tcb(chip, sim_root, sim_root_dir):
    from cryptography.hazmat.primitives import serialization

    _, other = issue_vcek(sim_root, chip.chip_id, SimulatedTcb(snp=chip.tcb.snp + 1),
                          key=chip.vcek_key)
    v = verdict(chip.report(REPORT_DATA), other.public_bytes(serialization.Encoding.PEM),
                policy(sim_root_dir))
    assert "tcb_binding" in failed_names(v)


@pytest.mark.parametrize("at", [dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
                                dt.datetime(2099, 1, 1, tzinfo=dt.UTC)])
def test_validity_at_settable_time(chip, sim_root_dir, at):
    v = verdict(chip.report(REPORT_DATA), chip.vcek_pem, policy(sim_root_dir), at=at)
    assert "validity" in failed_names(v)


def test_signing_key_field_must_match_certificate(chip, sim_root_dir):
    report = resign(patch_u32(chip.report(REPORT_DATA), abi.OFF_SIGNER_INFO, 1 << 2),
                    chip.vcek_key)  # claims VLEK
    assert "signing_key" in failed_names(verdict(report, chip.vcek_pem, policy(sim_root_dir)))


def test_missing_vcek_is_a_failed_check(chip, sim_root_dir):
    v = verify_evidence(chip.report(REPORT_DATA), policy=policy(sim_root_dir))
    assert "certificate" in failed_names(v) and not v.accepted


def test_bad_certificate_bytes_typed(chip, sim_root_dir):
    v = verdict(chip.report(REPORT_DATA), b"not a certificate", policy(sim_root_dir))
    assert not v.accepted and v.failures[0].name == "CertificateError"


def test_size_limit_before_parsing(sim_root_dir):
    v = verify_evidence(b"\0" * 70_000, policy=policy(sim_root_dir))
    assert [c.name for c in v.checks] == ["size"]


@pytest.mark.parametrize("data", [b"", b"garbage", bytes(abi.REPORT_SIZE), os.urandom(5000)])
def test_garbage_is_a_typed_rejection(sim_root_dir, data):
    v = verify_evidence(data, policy=policy(sim_root_dir))
    assert not v.accepted and v.failures[0].name == "format"


def test_bad_policy_values_named():
    with pytest.raises(ValueError, match="measurements"):
        Policy.model_validate({"measurements": ["abcd"]})
    with pytest.raises(ValueError, match="mesurements"):
        Policy.model_validate({"mesurements": []})


