"""One RunSpec builder for deployments: the coordinator's own ServerApp and a consortium's
own app around ``ConfidentialStrategy`` both get the operator's settings (min_sites, reply
timeout, aggregator enclave, central DP), its policy and its registered sites only."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cleanroom.coordinator.config import load_coordinator_config
from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.coordinator.serverapp import deployment_spec, online_sites
from cleanroom.coordinator.standalone import deployed_spec
from cleanroom.pki import NodePublicKey
from cleanroom.task import load_task


@dataclass
class Node:
    node_id: int
    public_key: bytes
    status: str = "online"
    name: str = ""


class Grid:
    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    def get_nodes(self) -> list[Node]:
        return self.nodes

    def get_node_ids(self) -> list[int]:
        return [n.node_id for n in self.nodes]


@pytest.fixture()
def fed(tmp_path: Path) -> Path:
    out = tmp_path / "fed"
    provision(ProvisionRequest(out=out, sites=["a", "b", "c"]))
    toml = out / "coordinator" / "coordinator.toml"
    text = toml.read_text().replace('rounds = 5\n',
                                    'rounds = 5\nmin_sites = 3\nreply_timeout = 45.0\n')
    text = text.replace('state_dir = "state/aggregator-enclave"\n',
                        'state_dir = "state/aggregator-enclave"\ncentral_epsilon = 2.0\n'
                        'central_clip = 0.5\n')
    toml.write_text(text.replace('policy = "policy.toml"\n',
                                 'policy = "policy.toml"\nsite_wait_seconds = 1\n'))
    return out / "coordinator" / "coordinator.toml"


def grid_of(config_path: Path) -> Grid:
    config = load_coordinator_config(config_path)
    nodes = [Node(10 + i, NodePublicKey.load(s.public_key).spki_pem)
             for i, s in enumerate(config.sites)]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = Node(99, ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Grid([*nodes, stranger])


def test_both_app_kinds_get_the_operators_settings(fed: Path) -> None:
    config = load_coordinator_config(fed)
    task = load_task("heart-disease")
    grid = grid_of(fed)
    sites = online_sites(config, grid, "1")
    ours = deployment_spec(config, config.training.model_validate(
        {**config.training.model_dump(), "rounds": 4}), task, sites, "1",
        strategy="fedavg", run_name="ours")
    theirs, their_grid, reply_timeout = deployed_spec(fed, task, object(), 4, "2", grid)
    for spec in (ours, theirs):
        assert spec.min_nodes == 3
        assert spec.attest_timeout == 45.0
        assert spec.aggregator is not None and spec.aggregator.provider == "simulated"
        assert spec.central_dp is not None
        assert spec.plan.rounds == 4
        assert spec.plan.central_clip == 0.5
        assert sorted(spec.directory.names.values()) == ["a", "b", "c"]
        assert 99 not in spec.directory.names  # a key no site registered takes no part
        assert spec.sites == ["a", "b", "c"]
        assert spec.coordinator_id == config.name
    assert reply_timeout == 45.0
    assert sorted(their_grid.get_node_ids()) == [10, 11, 12]


def test_nodes_without_a_registered_key_take_no_part(fed: Path) -> None:
    """Garbage, empty, a site's key in another encoding it was not registered with, offline:
    none of them is a site, and none of them stands in for one in the wait."""
    config = load_coordinator_config(fed)
    good = grid_of(fed).nodes[:1]  # site a only
    pem = NodePublicKey.load(config.sites[1].public_key).spki_pem
    hostile = [Node(20, b""), Node(21, b"\x00" * 10_000), Node(22, b"-----BEGIN PUBLIC KEY-----"),
               Node(23, pem, status="offline"), Node(24, pem, status="unregistered")]
    sites = online_sites(config, Grid([*good, *hostile]), "1")
    assert {nid: name for nid, (_, name) in sites.nodes.items()} == {10: "a"}
    assert sites.grid(Grid([*good, *hostile])).get_node_ids() == [10]


def test_a_site_online_under_two_node_ids_counts_once(fed: Path) -> None:
    """Two online nodes holding site a's key (the SuperLink refuses a second registration of
    a key; a SuperLink that did not, or a stale entry) must not count as two sites: the
    wait ended as soon as the node count reached the site count, c unwaited for, and a's
    replies would weigh twice."""
    config = load_coordinator_config(fed)
    a, b, _c, _stranger = grid_of(fed).nodes
    twin = Node(30, a.public_key)
    started = time.monotonic()
    sites = online_sites(config, Grid([twin, a, b]), "1")
    assert time.monotonic() - started >= 0.9  # waited (site_wait_seconds = 1) for c
    names = {nid: name for nid, (_, name) in sites.nodes.items()}
    assert names == {10: "a", 11: "b"}  # the lower node id, whatever the order
