"""``cleanroom provision``: everything a consortium needs to start a federation.

Creates, under one folder: a consortium CA; the SuperLink's TLS certificate (SANs for its
address); one SuperNode authentication key per site (or takes the public key a hospital
generated itself with ``cleanroom site keygen``: its private key then never leaves the site);
the coordinator's audit signing key; the attestation policy (measurement allow-list; simulated
root trusted only for simulated enclaves; TDX collateral required for real enclaves); API
tokens; and a config file for the coordinator and for each site. Private keys are written
with mode 0600 and never printed.

Layout::

    DIR/ca/ca.pem, ca.key
    DIR/coordinator/coordinator.toml, policy.toml, superlink.{pem,key}, audit_signing_key.pem,
                    audit_public_key.hex, api_tokens.json, operator.token, auditor.token,
                    sites/<name>.pub
    DIR/sites/<name>/site.toml, ca.pem, node_auth.{key,pub,spki.pem}, api_tokens.json,
                     operator.token, state/enclave/ (simulated chip)
    DIR/simulated-root/ (simulated enclaves only)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cleanroom.attestation.simulated import create_simulated_root
from cleanroom.errors import CleanroomError, ConfigError
from cleanroom.fsutil import write_private
from cleanroom.http import add_token
from cleanroom.pki import (
    NodePublicKey,
    cert_pem,
    generate_node_key,
    make_ca,
    make_server_cert,
    private_pem,
)
from cleanroom.protocol.wire import SiteName

Enclave = Literal["simulated", "configfs-tsm"]


@dataclass
class ProvisionRequest:
    out: Path
    sites: list[str]
    enclave: Enclave = "simulated"
    site_keys: dict[str, Path] = field(default_factory=dict)  # site -> public key it sent
    measurements: list[str] = field(default_factory=list)  # hex; production allow-list
    superlink_host: str = "127.0.0.1"
    superlink_port: int = 9400  # public: the Fleet proxy
    api_port: int = 9401
    control_port: int | None = None  # loopback SuperLink (Control API); default api_port + 1
    site_base_port: int = 9500
    site_api_base_port: int = 9600
    site_ports: dict[str, tuple[int, int]] = field(default_factory=dict)  # (node, API) ports
    extra_hosts: list[str] = field(default_factory=list)
    task: str = "heart-disease"  # an installed task's name or a task folder
    rounds: int = 5
    aggregator: bool = True  # an attested aggregator enclave that every site verifies
    aggregator_measurements: list[str] = field(default_factory=list)  # hex; real enclaves
    site_torch_threads: int = 0  # [executor] torch_threads of every site (0: torch default)


@dataclass
class Provisioned:
    out: Path
    coordinator_config: Path
    site_configs: dict[str, Path]
    tokens: dict[str, Path]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml(sections: dict[str, dict[str, object]], top: dict[str, object],
          arrays: dict[str, list[dict[str, object]]] | None = None) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items() if v is not None]
    for name, values in sections.items():
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    for name, items in (arrays or {}).items():
        for item in items:
            lines += ["", f"[[{name}]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _check_names(names: list[str]) -> None:
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(SiteName)
    for name in names:
        try:
            adapter.validate_python(name)
        except ValidationError:
            raise ConfigError(f"site name {name!r} is not valid (letters, digits, '.', '_', "
                              "'-'; at most 64 characters)") from None
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"site names must be unique and non-empty, got {names}")


def _simulated_site(root: object, site_dir: Path, task: object, index: int, count: int) -> None:
    """A simulated site's chip (its VCEK issued by the simulated vendor) and its data: the
    task's simulated data registered in the site's sealed data room, as a hospital's IT team
    registers its export."""
    from cleanroom.enclave import CHIP_VCEK, SimulatedProvider
    from cleanroom.site_agent.config import load_site_config
    from cleanroom.site_agent.runtime import build_runtime

    chip_dir = site_dir / "state" / "enclave"
    provider = SimulatedProvider.launch(root, chip_dir, bytes(48))  # type: ignore[arg-type]
    (chip_dir / CHIP_VCEK).write_bytes(provider.chip.vcek_pem)
    runtime = build_runtime(load_site_config(site_dir / "site.toml"), provider)
    natural = list(task.task.sites)  # type: ignore[attr-defined]
    name = runtime.site
    if natural:  # a site named like one of the task's own sites gets its data, others in turn
        partition = natural.index(name) if name in natural else index % len(natural)
        partition, partitions = partition, len(natural)
    else:
        partition, partitions = index, count
    if task.task.simulate is not None:  # type: ignore[attr-defined]
        runtime.datasets.register_simulated(task.task, partition, partitions)  # type: ignore[attr-defined]


def _aggregator(req: ProvisionRequest, out: Path, coord: Path, root: object) -> Path | None:
    """The aggregator enclave's chip (simulated: its VCEK issued by the simulated vendor) and
    the trust policy every site pins for it; None without an aggregator."""
    from cleanroom.attestation.measure import aggregator_measurement, write_aggregator_trust

    if not req.aggregator:
        return None
    if root is not None:
        from cleanroom.enclave import CHIP_VCEK, SimulatedProvider

        chip_dir = coord / "state" / "aggregator-enclave"
        provider = SimulatedProvider.launch(root, chip_dir, bytes(48))  # type: ignore[arg-type]
        (chip_dir / CHIP_VCEK).write_bytes(provider.chip.vcek_pem)
        measurements = [aggregator_measurement()]
    else:
        if not req.aggregator_measurements:
            raise ConfigError("a real-enclave federation needs --aggregator-measurement HEX "
                              "(the launch measurement of the aggregator's image), or "
                              "--no-aggregator")
        measurements = [bytes.fromhex(m) for m in req.aggregator_measurements]
    return write_aggregator_trust(
        out / "aggregator-trust.json", measurements=measurements,
        simulated_root=root.bundle_path if root is not None else None)  # type: ignore[attr-defined]


def provision(req: ProvisionRequest) -> Provisioned:
    from cleanroom.attestation.measure import code_measurement

    _check_names(req.sites)
    unknown = set(req.site_keys) - set(req.sites)
    if unknown:
        raise ConfigError(f"--site-key for unknown site(s): {sorted(unknown)}")
    out = Path(req.out).resolve()
    if (out / "coordinator" / "coordinator.toml").exists():
        raise ConfigError(f"{out} is already provisioned (coordinator/coordinator.toml exists);"
                          " choose an empty folder")
    coord = out / "coordinator"
    coord.mkdir(parents=True, exist_ok=True)
    (coord / "sites").mkdir(exist_ok=True)

    ca_key, ca_cert = make_ca("Cleanroom FL consortium CA")
    (out / "ca").mkdir(exist_ok=True)
    (out / "ca" / "ca.pem").write_bytes(cert_pem(ca_cert))
    write_private(out / "ca" / "ca.key", private_pem(ca_key))
    hosts = [req.superlink_host, "127.0.0.1", "localhost", *req.extra_hosts]
    link_key, link_cert = make_server_cert(ca_key, ca_cert, hosts)
    (coord / "ca.pem").write_bytes(cert_pem(ca_cert))
    (coord / "superlink.pem").write_bytes(cert_pem(link_cert))
    write_private(coord / "superlink.key", private_pem(link_key))

    audit_key = ed25519.Ed25519PrivateKey.generate()
    write_private(coord / "audit_signing_key.pem", audit_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    from cleanroom.coordinator.audit import public_key_hex

    (coord / "audit_public_key.hex").write_text(public_key_hex(audit_key) + "\n")

    tokens = {"coordinator-operator": coord / "operator.token",
              "coordinator-auditor": coord / "auditor.token"}
    for role, path in (("operator", tokens["coordinator-operator"]),
                       ("auditor", tokens["coordinator-auditor"])):
        write_private(path, (add_token(coord / "api_tokens.json", role) + "\n").encode())

    simulated = req.enclave == "simulated"
    installed = not Path(req.task).is_dir()
    root = create_simulated_root(out / "simulated-root") if simulated else None
    measurements = list(req.measurements)
    if simulated:
        measurements.append(code_measurement().hex())
    if not measurements:
        raise ConfigError("a real-enclave federation needs --measurement HEX (the launch "
                          "measurement of the approved site image)")
    from cleanroom.task import load_task

    try:
        task = load_task(Path(req.task) if Path(req.task).is_dir() else req.task)
    except CleanroomError as exc:
        raise ConfigError(f"task {req.task}: {exc}") from None
    policy_top: dict[str, object] = {
        "name": f"{'simulated' if simulated else 'production'}-consortium-policy",
        "environment": "simulation" if simulated else "production",
        "measurements": measurements, "allow_debug": False, "allow_migration_agent": False,
        "tasks": [task.digest],
    }
    if root is not None:
        policy_top["simulated_root"] = str(root.bundle_path)
    else:  # production: a TDX quote's TCB status and revocation need Intel's collateral
        policy_top["require_collateral"] = True
    (coord / "policy.toml").write_text(_toml({}, policy_top))
    trust = _aggregator(req, out, coord, root)

    site_configs: dict[str, Path] = {}
    registered = []
    for index, name in enumerate(req.sites):
        site_dir = out / "sites" / name
        (site_dir / "state").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "ca" / "ca.pem", site_dir / "ca.pem")
        if name in req.site_keys:  # the hospital generated its key and sent the public part
            public = NodePublicKey.load(req.site_keys[name])
            (site_dir / "node_auth.pub").write_bytes(public.openssh + b"\n")
            (site_dir / "node_auth.spki.pem").write_bytes(public.spki_pem)
        else:
            public = generate_node_key(site_dir)
        (coord / "sites" / f"{name}.pub").write_bytes(public.openssh + b"\n")
        registered.append({"name": name, "public_key": f"sites/{name}.pub"})
        tokens[f"{name}-operator"] = site_dir / "operator.token"
        write_private(site_dir / "operator.token",
                      (add_token(site_dir / "api_tokens.json", "operator") + "\n").encode())
        node_port, api_port = req.site_ports.get(
            name, (req.site_base_port + index, req.site_api_base_port + index))
        enclave: dict[str, object] = {"provider": req.enclave}
        # per-site metrics stay with the attested aggregator unless the hospital shares them
        policy: dict[str, object] = {"require_approval": False, "share_metrics": trust is None}
        if not installed:
            policy["task_dirs"] = [str(task.folder)]
        aggregator: dict[str, object] = {"required": False}
        if trust is not None:
            shutil.copyfile(trust, site_dir / "aggregator-trust.json")
            aggregator = {"required": True, "policy": "aggregator-trust.json"}
        (site_dir / "site.toml").write_text(_toml({
            "enclave": enclave,
            "privacy": {"delta": 1e-5, "lifetime_epsilon": 10.0, "max_epsilon_per_run": 1.0},
            "policy": policy,
            "aggregator": aggregator,
            "flower": {"superlink": f"{req.superlink_host}:{req.superlink_port}",
                       "root_certificates": "ca.pem", "auth_key": "node_auth.key",
                       "port": node_port},
            "executor": {"torch_threads": req.site_torch_threads or None},
            "api": {"host": "127.0.0.1", "port": api_port, "tokens": "api_tokens.json"},
        }, {"site": name, "state_dir": "state", "node_public_key": "node_auth.spki.pem",
            "seed": index}, {"policy.tasks": [{"digest": task.digest, "name": task.name}]}))
        site_configs[name] = site_dir / "site.toml"
        if root is not None:  # the simulated vendor makes this site's chip, issues its VCEK;
            _simulated_site(root, site_dir, task, index, len(req.sites))  # its data registered

    (coord / "coordinator.toml").write_text(_toml({
        "superlink": {"host": req.superlink_host, "port": req.superlink_port,
                      "control_port": req.control_port or req.api_port + 1,
                      "ca_cert": "ca.pem", "cert": "superlink.pem", "key": "superlink.key",
                      "database": "state/superlink.db"},
        "api": {"host": "127.0.0.1", "port": req.api_port, "tokens": "api_tokens.json"},
        "training": {"task": task.name if installed else str(task.folder),
                     "rounds": req.rounds},
        **({"aggregator": {"provider": req.enclave, "state_dir": "state/aggregator-enclave"}}
           if trust is not None else {}),
    }, {"name": "cleanroom-consortium", "state_dir": "state",
        "audit_key": "audit_signing_key.pem", "policy": "policy.toml"},
        {"sites": registered}))
    return Provisioned(out, coord / "coordinator.toml", site_configs, tokens)
