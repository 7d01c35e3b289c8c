"""Shared pieces of the daemons' HTTP APIs (aiohttp): bearer-token auth with roles, JSON errors.

Tokens are stored hashed (SHA-256) in a JSON file ``{"<sha256 hex>": "operator" | "auditor"}``;
the plaintext token is shown once when it is created and never stored. Auditors may only read;
operators may also act. Every error is a JSON body ``{"error": ...}`` with the right status.

Both APIs also serve a browser dashboard (cleanroom.dashboard), so every answer carries
browser security headers (:data:`SECURITY_HEADERS`: a strict Content-Security-Policy without
inline script, no framing, no sniffing, no referrer, no caching) and a write (any method but
GET/HEAD/OPTIONS) coming from another origin is refused before its token is looked at
(:func:`cross_origin_write`): a token only ever travels in the ``Authorization`` header, never
in a cookie or a URL, so a page of another origin has nothing to ride on, and this is a second
line should a browser ever send it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cleanroom.errors import CleanroomError, ConfigError

ROLES = ("operator", "auditor")
READ, WRITE = "read", "write"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
ROLE_KEY = web.AppKey("roles", dict)
REQUEST_ROLE = web.RequestKey("role", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def load_tokens(path: Path) -> dict[str, str]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: token file not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read token file: {exc}") from None
    if not isinstance(doc, dict) or any(r not in ROLES for r in doc.values()):
        raise ConfigError(f"{path}: expected {{sha256-of-token: role}} with roles {ROLES}")
    return dict(doc)


def add_token(path: Path, role: str) -> str:
    """Create a token with ``role``, store its hash (file mode 0600), return the token."""
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}")
    tokens = load_tokens(path) if Path(path).exists() else {}
    token = new_token()
    tokens[hash_token(token)] = role
    from cleanroom.fsutil import write_private

    write_private(Path(path), json.dumps(tokens, indent=2).encode())
    return token


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def requires(access: str) -> Callable[[Handler], Handler]:
    """Mark a handler as needing READ (operator or auditor) or WRITE (operator) access."""

    def mark(handler: Handler) -> Handler:
        handler.cleanroom_access = access  # type: ignore[attr-defined]
        return handler

    return mark


def role_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    digest = hash_token(header[len("Bearer "):].strip())
    for stored, role in request.app[ROLE_KEY].items():
        if hmac.compare_digest(stored, digest):
            return str(role)
    return None


def cross_origin_write(request: web.Request) -> str | None:
    """Why a write request comes from another origin (then it is refused), or None.

    Browsers name the requesting page: ``Sec-Fetch-Site`` (only ``same-origin`` and ``none``,
    a user's own navigation, pass: another port of this host is ``same-site`` and refused)
    and ``Origin`` (must be this server's own ``host:port``; ``null`` is refused). Clients
    that send neither (the CLI, scripts) are not browsers and need their token anyway."""
    if request.method in SAFE_METHODS:
        return None
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"cross-origin write refused (Sec-Fetch-Site: {fetch_site[:32]})"
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme, _, netloc = origin.partition("://")
        if scheme not in ("http", "https") or not netloc or netloc != request.host:
            return f"cross-origin write refused (Origin {origin[:100]!r} is not this server)"
    return None


@web.middleware
async def auth_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    refused = cross_origin_write(request)
    if refused is not None:
        return json_error(403, refused)
    access = getattr(handler, "cleanroom_access", None)
    if access is not None:
        role = role_of(request)
        if role is None:
            return json_error(401, "missing or unknown bearer token")
        if access == WRITE and role != "operator":
            return json_error(403, f"role {role} is read-only")
        request[REQUEST_ROLE] = role
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except CleanroomError as exc:
        return json_error(400, str(exc))
    except (ValueError, KeyError) as exc:
        return json_error(400, f"bad request: {exc}")


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise CleanroomError("request body must be JSON") from None
    if not isinstance(body, dict):
        raise CleanroomError("request body must be a JSON object")
    return body


async def serve_until_signal(app: web.Application, host: str, port: int,
                             check: Callable[[], None]) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; ``check()`` runs every second and may raise to end
    the daemon (e.g. its Flower child died)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                check()
    finally:
        await runner.cleanup()


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors and static files included (``on_response_prepare``)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value


@requires(READ)
async def whoami(request: web.Request) -> web.Response:
    """The caller's role (``operator`` or ``auditor``): a dashboard checks a token with it."""
    return web.json_response({"role": request[REQUEST_ROLE]})


def make_app(tokens: dict[str, str]) -> web.Application:
    app = web.Application(middlewares=[auth_and_errors], client_max_size=64 * 1024)
    app[ROLE_KEY] = tokens
    app.on_response_prepare.append(add_security_headers)
    app.router.add_get("/whoami", whoami)
    return app
