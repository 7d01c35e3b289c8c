"""The coordinator's Fleet proxy: the allow-list as a pure function, and the aiohttp proxy in
front of a fake SuperLink (HTTPS, verified with a test CA): what it forwards arrives intact,
everything else is refused before it reaches the SuperLink."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from cleanroom.coordinator.proxy import FLEET_ROUTES, build_proxy, route, server_tls
from cleanroom.pki import cert_pem, make_ca, make_server_cert, private_pem

# --------------------------------------------------------------------------- allow-list


@pytest.mark.parametrize(("method", "path"), sorted(FLEET_ROUTES))
def test_every_fleet_call_a_supernode_makes_is_forwarded(method, path):
    assert route(method, path).allowed


@pytest.mark.parametrize(("method", "path", "why"), [
    ("POST", "/v1/control/start-run", "Control API is not exposed"),  # flwr run
    ("POST", "/v1/control/list-runs", "Control API is not exposed"),  # flwr ls
    ("POST", "/v1/control/stop-run", "Control API is not exposed"),  # flwr stop
    ("POST", "/v1/control/list-nodes", "Control API is not exposed"),  # flwr supernode list
    ("POST", "/v1/control/register-node", "Control API is not exposed"),
    ("POST", "/v1/control/unregister-node", "Control API is not exposed"),
    ("POST", "/v1/control/get-login-details", "Control API is not exposed"),
    ("POST", "/v1/runtime/acquire-task", "Runtime API is not exposed"),  # ServerApp token
    ("POST", "/v1/runtime/get-nodes", "Runtime API is not exposed"),
    ("POST", "/v1/fleet/register-node", "not a Fleet call"),  # keys enter via the daemon
    ("POST", "/v1/fleet/unregister-node", "not a Fleet call"),
    ("GET", "/v1/fleet/pull-messages", "not a Fleet call"),  # wrong method
    ("POST", "/health", "not a Fleet call"),
    ("GET", "/docs", "not a Fleet call"),
    ("GET", "/openapi.json", "not a Fleet call"),
    ("POST", "/v1/fleet/pull-messages/", "not a Fleet call"),  # near misses
    ("POST", "//v1/fleet/pull-messages", "not a Fleet call"),
    ("POST", "/V1/fleet/pull-messages", "not a Fleet call"),
    ("POST", "/v1/fleet/../control/list-runs", "not a Fleet call"),
    ("POST", "/v1/fleet/pull-messages%00", "not a Fleet call"),
    ("DELETE", "/v1/fleet/push-messages", "not a Fleet call"),
])
def test_everything_else_is_refused_with_a_reason(method, path, why):
    verdict = route(method, path)
    assert not verdict.allowed and why in verdict.reason


def test_query_strings_are_refused():
    assert not route("POST", "/v1/fleet/pull-messages", "x=1").allowed
    assert route("POST", "/v1/fleet/pull-messages", "").allowed


# --------------------------------------------------------------------------- the proxy


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca = make_ca("proxy test CA")
    key, cert = make_server_cert(ca_key, ca, ["127.0.0.1"])
    (folder / "ca.pem").write_bytes(cert_pem(ca))
    (folder / "server.pem").write_bytes(cert_pem(cert))
    (folder / "server.key").write_bytes(private_pem(key))
    return folder


class FakeSuperLink:
    """Records what reaches it; answers like a SuperLink (protobuf bytes, custom headers)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any, bytes]] = []
        self.delay = 0.0

    def app(self) -> web.Application:
        async def any_route(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.seen.append((request.method, request.path_qs, request.headers.copy(), body))
            await asyncio.sleep(self.delay)
            response = web.StreamResponse(status=200, headers={
                "content-type": "application/protobuf", "x-flwr-answer": "yes"})
            await response.prepare(request)
            for i in range(4):  # a streamed, chunked answer
                await response.write(bytes([i]) * 1000)
            await response.write_eof()
            return response

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", any_route)
        return app


@pytest.fixture()
async def proxied(aiohttp_server, aiohttp_client, tls):
    link = FakeSuperLink()
    upstream_tls = server_tls(tls / "server.pem", tls / "server.key")
    upstream = await aiohttp_server(link.app(), ssl=upstream_tls)

    async def make(max_body: int = 1 << 20, timeout: float = 5.0):
        proxy = build_proxy(f"127.0.0.1:{upstream.port}", tls / "ca.pem", max_body=max_body,
                            timeout=timeout)
        return await aiohttp_client(proxy), link

    return make


async def test_fleet_call_arrives_intact(proxied):
    client, link = await proxied()
    body = bytes(range(256)) * 40
    headers = {"flwr-public-key": "AAAA", "flwr-signature": "c2ln", "flwr-timestamp": "2026",
               "content-type": "application/protobuf", "Connection": "keep-alive",
               "Proxy-Authorization": "Basic secret"}
    response = await client.post("/v1/fleet/push-object", data=body, headers=headers)
    assert response.status == 200
    assert response.headers["x-flwr-answer"] == "yes"
    assert await response.read() == b"".join(bytes([i]) * 1000 for i in range(4))
    method, path, seen_headers, seen_body = link.seen[-1]
    assert (method, path, seen_body) == ("POST", "/v1/fleet/push-object", body)
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp", "content-type"):
        assert seen_headers[name] == headers[name]  # node authentication passes untouched
    assert "proxy-authorization" not in seen_headers  # hop-by-hop headers stop here
    assert (await client.get("/health")).status == 200


async def test_control_runtime_and_docs_never_reach_the_superlink(proxied):
    client, link = await proxied()
    for method, path in (("POST", "/v1/control/start-run"), ("POST", "/v1/control/stop-run"),
                         ("POST", "/v1/control/register-node"),
                         ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"),
                         ("POST", "/v1/fleet/pull-messages?x=1"),
                         ("POST", "/v1/fleet/pull%2Dmessages"),
                         ("POST", "/v1/fleet/%2E%2E/control/list-runs"),
                         ("POST", "/v1/fleet%2Fpull-messages")):
        response = await client.request(method, URL(path, encoded=True), data=b"x")
        assert response.status == 403, path
        doc = await response.json()
        assert doc["error"] == "forbidden" and doc["reason"], path
    assert link.seen == []


async def test_oversized_bodies_are_refused(proxied):
    client, link = await proxied(max_body=10_000)
    response = await client.post("/v1/fleet/push-object", data=b"x" * 10_001)
    assert response.status == 413 and "over 10000 bytes" in (await response.json())["reason"]

    async def chunks():  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b"y" * 1000

    response = await client.post("/v1/fleet/push-object", data=chunks())
    assert response.status == 413
    assert all(len(body) <= 10_000 for *_, body in link.seen)
    ok = await client.post("/v1/fleet/push-object", data=b"z" * 10_000)
    assert ok.status == 200


async def test_slow_superlink_times_out(proxied):
    client, link = await proxied(timeout=0.3)
    link.delay = 2.0
    response = await client.post("/v1/fleet/pull-messages", data=b"")
    assert response.status == 504


async def test_superlink_down_is_a_bad_gateway(aiohttp_client, tls):
    from cleanroom.process import free_port

    proxy = build_proxy(f"127.0.0.1:{free_port()}", tls / "ca.pem", max_body=1000, timeout=5)
    client = await aiohttp_client(proxy)
    response = await client.post("/v1/fleet/pull-messages", data=b"")
    assert response.status == 502 and "did not answer" in (await response.json())["reason"]


async def test_upstream_certificate_must_chain_to_the_ca(aiohttp_server, aiohttp_client, tls,
                                                         tmp_path):
    """An impostor on the loopback port (certificate from another CA) gets nothing."""
    other_key, other_ca = make_ca("other CA")
    key, cert = make_server_cert(other_key, other_ca, ["127.0.0.1"])
    (tmp_path / "s.pem").write_bytes(cert_pem(cert))
    (tmp_path / "s.key").write_bytes(private_pem(key))
    link = FakeSuperLink()
    upstream = await aiohttp_server(link.app(), ssl=server_tls(tmp_path / "s.pem",
                                                               tmp_path / "s.key"))
    client = await aiohttp_client(build_proxy(f"127.0.0.1:{upstream.port}", tls / "ca.pem",
                                              max_body=1000, timeout=5))
    response = await client.post("/v1/fleet/push-messages", data=b"secret")
    assert response.status == 502 and link.seen == []


def test_public_side_speaks_tls_1_2_or_later(tls):
    context = server_tls(tls / "server.pem", tls / "server.key")
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
