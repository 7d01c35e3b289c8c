"""Provisioning: files, modes, configs that load, site-generated keys, refusals."""

from __future__ import annotations

import json
import stat

import pytest

from cleanroom.cli import main
from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.errors import ConfigError
from cleanroom.site_agent.config import load_site_config


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_layout_modes_and_configs(tmp_path):
    result = provision(ProvisionRequest(out=tmp_path / "fed", sites=["cleveland", "va"]))
    fed = tmp_path / "fed"
    for secret in ("ca/ca.key", "coordinator/superlink.key", "coordinator/audit_signing_key.pem",
                   "coordinator/operator.token", "coordinator/api_tokens.json",
                   "sites/va/node_auth.key", "sites/va/state/enclave/chip_vcek_key.pem",
                   "simulated-root/ask_key.pem"):
        assert mode(fed / secret) == 0o600, secret
    coordinator = load_coordinator_config(result.coordinator_config)
    assert [s.name for s in coordinator.sites] == ["cleveland", "va"]
    site = load_site_config(result.site_configs["va"])
    assert site.flower is not None and site.flower.auth_key.name == "node_auth.key"
    policy = (fed / "coordinator" / "policy.toml").read_text()
    assert 'environment = "simulation"' in policy and "simulated_root" in policy
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((fed / "coordinator" / "superlink.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_site_generated_key_never_leaves_the_site(tmp_path, capsys):
    hospital = tmp_path / "hospital"
    assert main(["site", "keygen", "--out", str(hospital)]) == 0
    assert mode(hospital / "node_auth.key") == 0o600
    out = capsys.readouterr().out
    assert "PRIVATE" not in out and "BEGIN" not in out  # keys are never printed
    assert main(["provision", "--out", str(tmp_path / "fed"), "--sites", "a,b",
                 "--site-key", f"b={hospital / 'node_auth.pub'}"]) == 0
    fed = tmp_path / "fed"
    assert not (fed / "sites" / "b" / "node_auth.key").exists()
    assert (fed / "sites" / "a" / "node_auth.key").exists()
    assert (fed / "coordinator" / "sites" / "b.pub").read_bytes() == \
        (hospital / "node_auth.pub").read_bytes()
    assert main(["site", "keygen", "--out", str(hospital)]) == 2  # never overwrite a key


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"sites": ["ok", "bad name!"]}, "not valid"),
    ({"sites": ["a", "a"]}, "unique"),
    ({"sites": ["a"], "enclave": "configfs-tsm"}, "--measurement"),
    ({"sites": ["a"], "site_keys": {"zzz": "x.pub"}}, "unknown site"),
])
def test_provision_refusals(tmp_path, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        provision(ProvisionRequest(out=tmp_path / "fed", **kwargs))


def test_provision_refuses_to_overwrite(tmp_path):
    provision(ProvisionRequest(out=tmp_path / "fed", sites=["a"]))
    with pytest.raises(ConfigError, match="already provisioned"):
        provision(ProvisionRequest(out=tmp_path / "fed", sites=["a"]))


def test_bad_site_public_key(tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa AAAA nonsense")
    with pytest.raises(ConfigError, match="not an OpenSSH or PEM public key"):
        provision(ProvisionRequest(out=tmp_path / "fed", sites=["a"], site_keys={"a": bad}))


def test_production_provisioning_with_measurement(tmp_path):
    provision(ProvisionRequest(out=tmp_path / "fed", sites=["a"], enclave="configfs-tsm",
                               measurements=["ab" * 48], aggregator_measurements=["cd" * 48]))
    policy = (tmp_path / "fed" / "coordinator" / "policy.toml").read_text()
    assert 'environment = "production"' in policy and "simulated_root" not in policy
    assert not (tmp_path / "fed" / "simulated-root").exists()



    site = load_site_config(tmp_path / "fed" / "sites" / "a" / "site.toml")
    assert site.aggregator.required and not site.policy.share_metrics
    trust = json.loads(site.aggregator.policy.read_text())
    assert trust["measurements"] == ["cd" * 48] and "simulated_root" not in trust


def test_production_provisioning_needs_the_aggregator_measurement(tmp_path):
    with pytest.raises(ConfigError, match="--aggregator-measurement"):
        provision(ProvisionRequest(out=tmp_path / "fed", sites=["a"], enclave="configfs-tsm",
                                   measurements=["ab" * 48]))
    provision(ProvisionRequest(out=tmp_path / "fed2", sites=["a"], enclave="configfs-tsm",
                               measurements=["ab" * 48], aggregator=False))
    text = (tmp_path / "fed2" / "sites" / "a" / "site.toml").read_text()
    assert "required = false" in text and "share_metrics = true" in text
