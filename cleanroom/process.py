"""Child-process supervision for the daemons: start, health-check, stop without orphans.

Flower's SuperLink starts a ``flower-superexec`` in its own session, which starts the ServerApp;
the SuperNode starts one ``flwr-clientapp`` per message. Killing a process group does not reach
them all, so every descendant is tagged with an environment variable; on stop we SIGTERM the
main processes, wait, SIGKILL stragglers, then sweep ``/proc`` for anything still carrying our
tag.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cleanroom.errors import CleanroomError
from cleanroom.fsutil import atomic_write, exclusive_lock

log = logging.getLogger(__name__)

TAG_VAR = "CLEANROOM_SUPERVISOR_TAG"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class DaemonError(CleanroomError):
    """A daemon could not start or a child process failed."""


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on (host, port) (checked by binding).

    Binds with ``SO_REUSEADDR`` as the servers we start do (gRPC, asyncio): connections of a
    process that just died linger in TIME_WAIT on its port for a minute, and a daemon restarted
    after a crash must not be refused for them; a live listener still refuses the bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def require_free_ports(*endpoints: tuple[str, int, str]) -> None:
    busy = [f"{what} port {port} on {host}" for host, port, what in endpoints
            if port_in_use(host, port)]
    if busy:
        raise DaemonError("already in use: " + ", ".join(busy) + " (another federation or "
                          "daemon is running there; stop it or choose other ports)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``TAG_VAR=tag`` (excluding this one)."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def _started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None if no
    such process runs: a pid with another start time was reused by an unrelated process."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def stop_tagged(tag: str, grace: float = 5.0) -> list[int]:
    """SIGTERM every process carrying ``tag``, SIGKILL what is left after ``grace`` seconds;
    returns the pids found."""
    return _sweep(tag, grace)[0]


def _sweep(tag: str, grace: float) -> tuple[list[int], list[int]]:
    """SIGTERM the live processes carrying ``tag`` until none is left or ``grace`` seconds
    passed, then SIGKILL the rest; returns (pids found, pids killed)."""
    found = tagged_pids(tag)
    deadline = time.monotonic() + grace
    while (left := [p for p in tagged_pids(tag) if _started(p)]) and \
            time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
    killed = []
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return found, killed


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT ignored for the body (a daemon stopping its children: a second
    signal, e.g. a service manager or a test that signals twice, would end it half-way and
    leave them running; the stop is bounded by its own timeouts). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM,
                                                                     signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


MARKER_MAX = 64 * 1024  # bytes: a daemon marker is ~150
DAEMON_MARKER = "daemon.json"  # in a daemon's state folder: its start (Supervisor.take_over)


def _read_marker(marker: Path, what: str) -> dict[str, object]:
    """The start a daemon marker records, or {} (none yet; torn, oversized, not a JSON
    object: no obstacle). A marker that is a symlink or not a regular file (a FIFO would
    block the read forever) was not written by a daemon: refused, named."""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        kind = "a symlink" if marker.is_symlink() else f"unreadable ({exc.strerror})"
        raise DaemonError(f"{what}: its marker {marker} is {kind}: a daemon writes it as a "
                          "plain file; remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DaemonError(f"{what}: its marker {marker} is not a regular file: a daemon "
                          "writes it as a plain file; remove it")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MARKER_MAX + 1)
    if len(data) > MARKER_MAX:
        log.warning("%s: %s is over %d bytes: ignored", what, marker, MARKER_MAX)
        return {}
    try:
        loaded = json.loads(data)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def https_health(url: str, ca: Path, timeout: float = 3.0) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return int(response.status)


@dataclass
class Supervisor:
    """Starts children with a common tag and stops them all, descendants included."""

    log_dir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLOWER_ENV)
        env[TAG_VAR] = self.tag
        # Flower starts its helpers by bare name: they must come from this environment.
        import sys

        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update(extra or {})
        return env

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - kept by the child
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                env=env or self.env(), start_new_session=True)
        log_file.close()
        self.children.append((name, proc))
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args[:3]))
        return proc

    def take_over(self, marker: Path, what: str) -> list[int]:
        """Make this the one start of the daemon ``what`` whose state ``marker`` (a JSON
        file: daemon pid, its start time, its supervisor tag) records, before it binds
        anything: a previous start killed without its children (``kill -9`` of the daemon
        alone) left them running, holding its ports and serving stale state; they are
        stopped (by tag: they run in sessions of their own). A previous start that is still
        alive is refused. A marker that records another path (the state folder was copied
        from another daemon's) is ignored: that daemon is not this one's predecessor.
        Returns the pids stopped. Two starts at the same instant are serialised (a lock
        beside the marker): the second finds the first's marker and is refused."""
        with exclusive_lock(Path(marker)):
            return self._take_over(Path(marker), what)

    def _take_over(self, marker: Path, what: str) -> list[int]:
        previous = _read_marker(marker, what)
        here = str(marker.resolve())
        if previous.get("marker", here) != here:
            # A copy of another daemon's state folder (a site cloned from a running one):
            # that daemon and its children are not this one's to refuse or stop.
            log.warning("%s: %s records a daemon of %s: ignored", what, marker,
                        previous.get("marker"))
            previous = {}
        pid, tag = previous.get("pid"), previous.get("tag")
        started = _started(pid) if isinstance(pid, int) and pid != os.getpid() else None
        if started is not None and started == previous.get("started"):
            raise DaemonError(f"{what} is already running (pid {pid}, recorded in {marker}): "
                              "stop it first")
        if tag == os.environ.get(TAG_VAR):
            # The tag of whoever started this daemon (its siblings carry it too): never a
            # predecessor's, whose tag only its own children carry.
            log.warning("%s: %s records the tag this process inherited: ignored", what, marker)
            tag = None
        stopped = stop_tagged(tag) if isinstance(tag, str) and tag and tag != self.tag else []
        if stopped:
            log.warning("stopped %d process(es) a previous %s left running: %s",
                        len(stopped), what, stopped)
        atomic_write(marker, (json.dumps({"pid": os.getpid(), "started":
                                                _started(os.getpid()), "tag": self.tag,
                                                "marker": here}) + "\n").encode(), mode=0o644)
        return stopped

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def log_size(self, name: str) -> int:
        """Bytes in ``name``'s log so far (logs are appended across starts)."""
        path = self.log_dir / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def log_since(self, name: str, offset: int) -> str:
        """``name``'s log from byte ``offset`` (what this start of it wrote)."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def forget(self, name: str) -> None:
        """Drop the exited child ``name`` (before starting it again)."""
        self.children = [(n, p) for n, p in self.children if n != name or p.poll() is None]

    def check_alive(self) -> None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                raise DaemonError(f"{name} exited with status {code}:\n{self.log_tail(name)}")

    def stop(self, timeout: float = 10.0) -> list[int]:
        """Stop every child and tagged descendant; returns pids that had to be killed."""
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        killed = _sweep(self.tag, 5.0)[1]
        if killed:
            log.warning("killed leftover processes %s", killed)
        return killed


def wait_for(predicate: object, timeout: float, what: str, supervisor: Supervisor | None = None,
             interval: float = 0.25) -> None:
    """Poll ``predicate()`` until true; fail with the children's logs if one died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if supervisor is not None:
            supervisor.check_alive()
        try:
            if predicate():  # type: ignore[operator]
                return
        except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
            last = exc
        time.sleep(interval)
    raise DaemonError(f"timed out after {timeout:.0f}s waiting for {what}"
                      + (f" (last error: {last})" if last else ""))
