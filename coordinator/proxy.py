"""The coordinator's public face: a TLS reverse proxy that serves only Flower's Fleet API.

Flower 1.42 serves Fleet (SuperNodes), Control (``flwr run|ls|stop|supernode ...``) and
Runtime (the ServerApp's task token) on ONE HTTPS port, and its open-source Control API has no
credential (docs/notes/flower-deployment.md). So the SuperLink listens on loopback only, and
this proxy listens on the public port with the SuperLink's own certificate and forwards
exactly the calls a SuperNode makes (:data:`FLEET_ROUTES`, read off a real federation's
traffic) plus ``GET /health``. Everything else gets ``403`` with a JSON reason: someone who
holds only the consortium's CA certificate can neither submit, list, stop nor register
anything, nor take a ServerApp's task.

The decision is the pure function :func:`route`; the aiohttp part streams bodies both ways
(no buffering of model updates), keeps every end-to-end header (node authentication travels
in ``flwr-public-key`` / ``flwr-signature`` / ``flwr-timestamp``), caps request bodies
(``413``) and bounds each request's time (``504``).

Run: ``python -m cleanroom.coordinator.proxy --config coordinator.toml`` (the coordinator
daemon does).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FLEET_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("POST", "/v1/fleet/activate-node"),
    ("POST", "/v1/fleet/deactivate-node"),
    ("POST", "/v1/fleet/send-node-heartbeat"),
    ("POST", "/v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/push-messages"),
    ("POST", "/v1/fleet/get-run"),
    ("POST", "/v1/fleet/get-fab"),
    ("POST", "/v1/fleet/push-object"),
    ("POST", "/v1/fleet/pull-object"),
    ("POST", "/v1/fleet/confirm-message-received"),
    ("GET", "/health"),
})
"""Every (method, path) a 1.42 SuperNode uses. ``/v1/fleet/register-node`` and
``unregister-node`` exist but a SuperNode under ``--enable-supernode-auth`` never calls them:
node keys enter only through the coordinator's own registration, on loopback."""

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host"})


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


def route(method: str, path: str, query: str = "") -> Verdict:
    """Whether the public port forwards ``method path?query``; the reason when it does not.

    Exact matches only (no prefixes, no query strings): what is forwarded is the canonical
    path of the matched route, so encoded or dotted variants never reach the SuperLink."""
    if (method, path) in FLEET_ROUTES and not query:
        return Verdict(True)
    if path.startswith("/v1/control/"):
        return Verdict(False, "the Control API is not exposed on this port: runs are "
                       "submitted on the coordinator's host ('cleanroom run') or through the "
                       "coordinator API with an operator token")
    if path.startswith("/v1/runtime/"):
        return Verdict(False, "the Runtime API is not exposed on this port")
    if (method, path) in FLEET_ROUTES:
        return Verdict(False, f"{method} {path} takes no query string")
    return Verdict(False, f"{method} {path} is not a Fleet call this port serves")


class BodyTooLarge(Exception):
    """A request body went over the proxy's cap while it was streamed."""


class CappedBody:
    """A request body streamed on to the SuperLink, stopped past ``limit`` bytes
    (``over`` tells afterwards: the HTTP client wraps the error it raises)."""

    def __init__(self, stream: object, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.over = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.stream.iter_any():  # type: ignore[attr-defined]
            seen += len(chunk)
            if seen > self.limit:
                self.over = True
                raise BodyTooLarge(f"request body over {self.limit} bytes")
            yield chunk


def _forbidden(reason: str, status: int = 403) -> object:
    from aiohttp import web

    return web.json_response({"error": "forbidden" if status == 403 else "refused",
                              "reason": reason}, status=status)


def build_proxy(upstream: str, ca_cert: Path, *, max_body: int, timeout: float) -> object:
    """The aiohttp application forwarding Fleet calls to ``upstream`` (host:port, HTTPS
    verified with ``ca_cert``)."""
    import aiohttp
    from aiohttp import web

    client_tls = ssl.create_default_context(cafile=str(ca_cert))
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def on_startup(app: web.Application) -> None:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_tls, limit=200),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10))

    async def on_cleanup(app: web.Application) -> None:
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        verdict = route(request.method, request.path, request.query_string)
        if verdict.allowed and request.rel_url.raw_path != request.path:
            verdict = Verdict(False, "the path must not be percent-encoded")
        if not verdict.allowed:
            log.warning("refused %s %s from %s: %s", request.method, request.raw_path[:200],
                        request.remote, verdict.reason)
            return _forbidden(verdict.reason)  # type: ignore[return-value]
        length = request.content_length
        if length is not None and length > max_body:
            log.warning("refused %s from %s: body of %d bytes over %d", request.path,
                        request.remote, length, max_body)
            return _forbidden(f"request body over {max_body} bytes", 413)  # type: ignore[return-value]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = CappedBody(request.content, max_body) if request.body_exists else None
        started = time.perf_counter()
        response: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                async with app[session_key].request(
                        request.method, f"https://{upstream}{request.path}", headers=headers,
                        data=body.chunks() if body is not None else None,
                        allow_redirects=False,
                        skip_auto_headers=("Accept-Encoding", "User-Agent",
                                           "Content-Type")) as upstream_response:
                    response = web.StreamResponse(status=upstream_response.status,
                                                  reason=upstream_response.reason)
                    for key, value in upstream_response.headers.items():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            response.headers.add(key, value)
                    if upstream_response.content_length is not None:
                        response.content_length = upstream_response.content_length
                    await response.prepare(request)
                    async for chunk in upstream_response.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
        except (BodyTooLarge, aiohttp.ClientError) as exc:
            if body is not None and body.over:
                log.warning("refused %s from %s: body over %d bytes", request.path,
                            request.remote, max_body)
                if response is None:
                    return _forbidden(f"request body over {max_body} bytes", 413)  # type: ignore[return-value]
                raise
            log.warning("upstream error on %s: %s", request.path, exc)
            if response is None:
                return web.json_response({"error": "bad-gateway",
                                          "reason": "the SuperLink did not answer"}, status=502)
            raise
        except TimeoutError:
            log.warning("%s from %s took over %.0fs", request.path, request.remote, timeout)
            if response is None:
                return web.json_response({"error": "timeout", "reason": f"the request took "
                                          f"over {timeout:.0f}s"}, status=504)
            raise
        log.debug("%s %s -> %d in %.1f ms", request.method, request.path, response.status,
                  (time.perf_counter() - started) * 1000)
        return response

    app = web.Application(client_max_size=max_body,
                          handler_args={"auto_decompress": False})  # bytes pass untouched
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cleanroom.coordinator.proxy",
                                     description="Fleet-only TLS proxy in front of the "
                                     "coordinator's loopback SuperLink.")
    parser.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aiohttp import web

    from cleanroom.coordinator.config import load_coordinator_config

    link = load_coordinator_config(args.config).superlink
    app = build_proxy(link.control_address, link.ca_cert, max_body=link.max_request_bytes,
                      timeout=link.request_timeout)
    log.info("Fleet proxy on %s:%d -> SuperLink %s", link.host, link.port, link.control_address)
    web.run_app(app, host=link.host, port=link.port,  # type: ignore[arg-type]
                ssl_context=server_tls(link.cert, link.key), access_log=None,
                print=None, handle_signals=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
