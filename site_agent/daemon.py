"""``cleanroom site``: a hospital's site-agent daemon.

Checks everything it can before starting (configuration, keys, certificates, data, enclave
provider, ports), starts Flower's SuperNode (TLS, the site's auth key, the site config named
in its node config) with ``--isolation process --superexec-auth-secret-file``, and, as the only
holder of that fresh per-start secret (mode 0600), the site's own executor
(:mod:`cleanroom.site_agent.executor`): warm, and it runs a task only if the site approved its
FAB's digest, checked before anything of it is installed or imported. Then it serves the local
site API (loopback by default), and on SIGTERM stops every process it started.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cleanroom.errors import ConfigError
from cleanroom.fsutil import write_private
from cleanroom.http import load_tokens, serve_until_signal
from cleanroom.pki import check_node_private_key
from cleanroom.process import (
    DAEMON_MARKER,
    DaemonError,
    Supervisor,
    require_free_ports,
    signals_ignored,
)
from cleanroom.site_agent.config import SiteConfig, load_site_config
from cleanroom.site_agent.runtime import SiteRuntime, build_runtime

log = logging.getLogger(__name__)

SECRET_FILE = "superexec.secret"  # in the state folder, mode 0600, new at every start
CONNECTED = "SuperNode ID"  # what Flower's SuperNode logs once the SuperLink accepted its key
CONNECT_WAIT = 30.0  # s; past it the executor starts anyway (the SuperNode keeps retrying)
ONLINE_MARK = "supernode.online"  # in FLWR_HOME while the SuperNode is (or was last) connected
# Flower holds a node online until 2 x 30 s after its last heartbeat and refuses to activate
# it again before: a site restarted after a crash (kill -9, power loss) retries that long.
STILL_ONLINE_WAIT = 75.0
# A fresh start whose activation is refused retries this long: the coordinator may still be
# registering the provisioned node keys (both daemons started together); a key it never
# registers is refused after it.
UNREGISTERED_WAIT = 10.0
ACTIVATION_REFUSED = "Failed to activate SuperNode"

# Known SuperNode failures -> what the hospital's IT team should do.
SUPERNODE_ERRORS = (
    ("Failed to activate SuperNode", "the coordinator does not know this site's node key: "
     "send node_auth.pub to the consortium operator to register it"),
    ("CERTIFICATE_VERIFY_FAILED", "the SuperLink's TLS certificate does not chain to "
     "flower.root_certificates (wrong CA file, or not the consortium's SuperLink)"),
    ("Unable to parse the private key", "flower.auth_key is not an OpenSSH private key"),
    ("address already in use", "the SuperNode's local port is taken: change flower.port"),
    ("SuperExec authentication failed", "the executor and the SuperNode disagree on the "
     "SuperExec secret (restart the site daemon)"),
    ("Connection reset by peer", "the SuperLink refused the connection (plaintext client "
     "against a TLS port?)"),
)


def preflight(config: SiteConfig) -> SiteRuntime:
    if config.flower is None:
        raise ConfigError(f"site {config.site}: the [flower] section is required for the daemon")
    flower = config.flower
    if not flower.root_certificates.is_file():
        raise ConfigError(f"flower.root_certificates {flower.root_certificates} does not exist")
    public = check_node_private_key(flower.auth_key)
    if config.node_public_key is not None:
        from cleanroom.pki import NodePublicKey

        if NodePublicKey.load(config.node_public_key).spki_pem != public.spki_pem:
            raise ConfigError("node_public_key does not match flower.auth_key")
    if config.api.tokens is not None:
        load_tokens(config.api.tokens)
    require_free_ports(("127.0.0.1", flower.port, "SuperNode runtime API"),
                       (config.api.host, config.api.port, "site API"))
    runtime = build_runtime(config)
    _ = runtime.aggregator_policy  # a broken aggregator policy stops the daemon, named
    if not config.aggregator.required:
        log.warning("site %s releases updates to a coordinator whose aggregator it has not "
                    "attested (aggregator.required = false)", config.site)
    registered = runtime.datasets.datasets()  # the data room must open inside the enclave
    if not registered:
        log.warning("site %s has no registered dataset yet: it refuses every task until one "
                    "is ('cleanroom site dataset add NAME FILE')", config.site)
    return runtime


def explain_failure(log_text: str) -> str | None:
    for needle, advice in SUPERNODE_ERRORS:
        if needle in log_text:
            return advice
    return None


def _check(sup: Supervisor) -> None:
    try:
        sup.check_alive()
    except DaemonError as exc:
        advice = explain_failure(str(exc))
        raise DaemonError(f"SuperNode stopped: {advice}" if advice else str(exc)) from None


def wait_connected(sup: Supervisor, timeout: float = CONNECT_WAIT, offset: int = 0) -> bool:
    """Wait until the SuperNode is connected (its log from ``offset``: this start's);
    a SuperNode that stopped raises with advice."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check(sup)
        if CONNECTED in sup.log_since("supernode", offset):
            return True
        time.sleep(0.2)
    log.warning("the SuperNode has not connected after %.0fs (SuperLink unreachable?); "
                "starting the executor anyway", timeout)
    return False


def online_mark(config: SiteConfig) -> Path:
    return config.state_dir / "flwr-home" / ONLINE_MARK


def start_node(config: SiteConfig, config_path: Path, sup: Supervisor,
               connected: Callable[[int], object] = lambda offset: None) -> None:
    """The SuperNode in process isolation, and the site's executor, the only holder of the
    fresh SuperExec secret: nothing else on this machine can take a task from the SuperNode,
    and no task runs without passing the site's gate. ``connected(log offset)`` is called in
    between (the daemon waits for the SuperNode to connect: a refused node key or certificate
    stops it before the executor spends seconds loading torch).

    If the last start did not stop cleanly (the online mark is still there), the SuperLink
    may still hold this node online and refuse to activate it: the SuperNode is started again
    until it is let in, for at most :data:`STILL_ONLINE_WAIT` seconds."""
    flower = config.flower
    assert flower is not None
    env = sup.env({"FLWR_HOME": str(config.state_dir / "flwr-home")})
    secret = config.state_dir / SECRET_FILE
    write_private(secret, secrets.token_bytes(32))  # fresh per start
    args = [
        "flower-supernode", "--superlink", flower.superlink,
        "--root-certificates", str(flower.root_certificates),
        "--auth-supernode-private-key", str(flower.auth_key),
        "--port", str(flower.port),
        "--node-config", f"site='{config.site}' site-config='{config_path}'",
        "--isolation", "process", "--superexec-auth-secret-file", str(secret),
    ]
    mark = online_mark(config)
    crashed = mark.exists()
    deadline = time.monotonic() + (STILL_ONLINE_WAIT if crashed else UNREGISTERED_WAIT)
    while True:
        offset = sup.log_size("supernode")
        sup.start("supernode", args, env)
        try:
            connected(offset)
            break
        except DaemonError:
            refused = ACTIVATION_REFUSED in sup.log_since("supernode", offset)
            if not (refused and time.monotonic() < deadline):
                raise
            if crashed:
                log.warning("the SuperLink still holds this site's node online from a start "
                            "that did not stop cleanly (crash?): retrying until it lets the "
                            "node go (at most %.0f s)", STILL_ONLINE_WAIT)
            else:
                log.warning("the SuperLink refused this site's node key: retrying for %.0f s "
                            "(the coordinator may still be registering it)", UNREGISTERED_WAIT)
            sup.forget("supernode")
            time.sleep(3.0)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text("")
    sup.start("executor", [
        sys.executable, "-m", "cleanroom.site_agent.executor", "--config", str(config_path),
        "--runtime-api-address", f"127.0.0.1:{flower.port}", "--secret-file", str(secret),
    ], env)


def serve_site(config_path: Path, *, on_ready: Any = None) -> int:
    from cleanroom.site_agent.api import build_site_api

    config_path = Path(config_path).resolve()
    config = load_site_config(config_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(config.state_dir / "logs")
    sup.take_over(config.state_dir / DAEMON_MARKER, "the site daemon")  # kill -9 leftovers
    runtime = preflight(config)
    try:
        start_node(config, config_path, sup, lambda offset: wait_connected(sup, offset=offset))
        time.sleep(0.5)
        _check(sup)
        tokens = load_tokens(config.api.tokens) if config.api.tokens else {}
        app = build_site_api(runtime, tokens)
        if on_ready is not None:
            on_ready(config)
        asyncio.run(serve_until_signal(app, config.api.host, config.api.port, lambda: _check(sup)))
    finally:
        with signals_ignored():  # a second SIGTERM must not orphan the children
            sup.stop()  # the SuperNode deactivates its node on SIGTERM: a clean stop
        online_mark(config).unlink(missing_ok=True)
    return 0
