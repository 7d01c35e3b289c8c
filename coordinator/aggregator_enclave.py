"""Where the aggregator runs: its own enclave, a separate process the operator's process only
talks to through a pipe.

:class:`AggregatorHandle` starts the aggregator (:class:`~cleanroom.coordinator.aggregator.
AggregatorCore`) in a fresh interpreter (``python -m cleanroom.coordinator.aggregator_enclave``:
nothing of the operator's memory is inherited)
with its own evidence provider (the simulated TEE, whose chip the consortium's simulated root
issued, or configfs-tsm in a confidential VM) and proxies every call. The round keys are
generated in there and never cross the pipe; what comes back is public keys, evidence,
verdicts (digests and reasons) and aggregates. ``isolation="inprocess"`` keeps the core in
this process (unit tests only: then nothing separates the operator from the keys).
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from cleanroom.coordinator import enclave_wire
from cleanroom.coordinator.aggregator import AggregatorCore, CentralDp
from cleanroom.coordinator.enclave_wire import EnclaveInputError
from cleanroom.errors import CleanroomError
from cleanroom.protocol.wire import TrainPlan

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0
CALL_TIMEOUT = 600.0
MAX_HEAD = 64 << 20  # bytes of a call's head message (its pickle without the large buffers)


class ChannelError(EnclaveInputError):
    """The pipe's framing broke (the enclave answers once, then ends the channel)."""


@dataclass(frozen=True)
class AggregatorLaunch:
    """How the aggregator's enclave starts."""

    provider: Literal["simulated", "configfs-tsm"] = "simulated"
    state_dir: Path | None = None  # simulated: the chip's sealed state (created on first use)
    simulated_root: Path | None = None  # simulated: the consortium's simulated root
    measurement: bytes | None = None  # simulated: launch digest (default: the honest code's)
    debug: bool = False  # simulated: launch with the DEBUG policy bit (fault injection)
    tsm_root: Path = Path("/sys/kernel/config/tsm/report")  # configfs-tsm
    isolation: Literal["process", "inprocess"] = "process"


def build_provider(launch: AggregatorLaunch) -> Any:
    """The enclave's evidence provider (runs inside the enclave)."""
    from cleanroom.enclave import ConfigfsTsmProvider, SimulatedProvider

    if launch.provider == "configfs-tsm":
        return ConfigfsTsmProvider(launch.tsm_root)
    from cleanroom.attestation.measure import aggregator_measurement
    from cleanroom.attestation.simulated import load_simulated_root

    if launch.state_dir is None:
        raise CleanroomError("a simulated aggregator enclave needs a state folder")
    root = load_simulated_root(launch.simulated_root) if launch.simulated_root else None
    return SimulatedProvider.launch(root, launch.state_dir,
                                    launch.measurement or aggregator_measurement(),
                                    debug=launch.debug)


def _memory(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since start or the last reset) of this process,
    bytes; 0 where /proc is missing. (``ru_maxrss`` would report the operator's process:
    Linux keeps the parent's peak across fork and exec.)"""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


# What the enclave answers: the core's public calls (checked in here, not only by the handle).
CALLS = frozenset({"begin_round", "admit", "attest", "attest_sites", "submit_update",
                   "aggregate", "begin_evaluation", "submit_metrics", "release_metrics",
                   "end_round", "public_key", "central_epsilon", "secagg_begin",
                   "secagg_receive", "secagg_requests"})


def _start_args(message: Any) -> tuple[AggregatorLaunch, str, CentralDp | None, Any]:
    if not (isinstance(message, tuple) and len(message) == 4):
        raise EnclaveInputError("the start message must be (launch, plan, central DP, robust)")
    launch, plan_json, central, robust = message
    if not isinstance(launch, AggregatorLaunch) or not isinstance(plan_json, str) \
            or not isinstance(central, (CentralDp, type(None))):
        raise EnclaveInputError("the start message's launch, plan or central DP is not one")
    return launch, plan_json, central, robust


def _call(message: Any) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """A call as the operator's process sent it: (name, args, kwargs), name allowed."""
    if not (isinstance(message, tuple) and len(message) == 3):
        raise EnclaveInputError("a call must be (name, args, kwargs)")
    name, args, kwargs = message
    if not isinstance(name, str) or not isinstance(args, tuple) \
            or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise EnclaveInputError("a call must be (name, args, kwargs)")
    if name != "close" and name not in CALLS:
        raise EnclaveInputError(f"{name[:64]!r} is not a call of the aggregator enclave")
    return name, args, kwargs


def _serve(conn: Any) -> None:
    """The enclave process: build the core from the first message, answer calls until told
    to stop. Everything read from the pipe is data only (:mod:`enclave_wire`)."""
    try:
        launch, plan_json, central, robust = _start_args(conn.recv_call())
        core = AggregatorCore(build_provider(launch), TrainPlan.model_validate_json(plan_json),
                              central_dp=central, robust=robust)
        conn.send(("ok", getattr(core.provider, "measurement", None)))
        _reset_peak()
        started_rss = _memory("VmRSS")
    except Exception as exc:  # noqa: BLE001 - reported to the operator, then the process ends
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    while True:
        try:
            name, args, kwargs = _call(conn.recv_call())
            if name == "close":
                conn.send(("ok", (started_rss, _memory("VmHWM"))))  # benchmarks; no secret
                return
            conn.send(("ok", getattr(core, name)(*args, **kwargs)))
        except (EOFError, OSError):
            return
        except ChannelError as exc:
            conn.send(("error", type(exc).__name__, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes back typed as text
            conn.send(("error", type(exc).__name__, str(exc)))


class _Duplex:
    """A connection over the child's stdin/stdout pipes. Calls go in as data-only pickles
    (:func:`enclave_wire.dumps`, read by :meth:`recv_call`), answers come out pickled; both
    framed as a head message and the out-of-band buffers it announces
    (:func:`enclave_wire.frame`), each buffer written from the sender's own memory and read
    into the object the receiver keeps."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = Connection(read_fd, writable=False)
        self.writer = Connection(write_fd, readable=False)

    def _send_framed(self, head: bytes, buffers: list[memoryview]) -> None:
        self.writer.send_bytes(head)
        for buffer in buffers:
            self.writer.send_bytes(buffer)

    def send(self, obj: Any) -> None:
        self._send_framed(*enclave_wire.pickled(obj))

    def send_call(self, obj: Any) -> None:
        self._send_framed(*enclave_wire.dumps(obj))

    def recv(self) -> Any:
        """The operator side: an answer, its arrays built over buffers read in place
        (writable, as from a plain pickle)."""
        sizes, data = enclave_wire.unframe(self.reader.recv_bytes())
        buffers = []
        for size in sizes:
            buffer = bytearray(size)
            if self.reader.recv_bytes_into(buffer) != size:
                raise CleanroomError("the aggregator enclave's answer is framed wrongly")
            buffers.append(buffer)
        return pickle.loads(data, buffers=buffers)

    def recv_call(self) -> Any:
        """The enclave side: one call, data only, our types rebuilt with validation. A head
        that cannot be framed (a count or size beyond the limits) ends the channel
        (:class:`ChannelError`): what follows it in the pipe could not be told apart."""
        try:
            sizes, data = enclave_wire.unframe(self.reader.recv_bytes(MAX_HEAD))
        except EnclaveInputError as exc:
            raise ChannelError(str(exc)) from None
        buffers = []
        for size in sizes:
            buffer = self.reader.recv_bytes(max(size, 1))
            if len(buffer) != size:
                raise ChannelError(f"a call's buffer holds {len(buffer)} bytes, its head "
                                   f"announced {size}")
            buffers.append(buffer)
        return enclave_wire.decode(enclave_wire.loads(data, buffers))

    def poll(self, timeout: float) -> bool:
        return self.reader.poll(timeout)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


def _child_main() -> None:
    from cleanroom.malloc import release_large_buffers

    release_large_buffers()  # each site's update is model-sized: freed, it leaves at once
    read_fd, write_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the channel
    _serve(_Duplex(read_fd, write_fd))


class AggregatorHandle:
    """The operator side's handle on the aggregator enclave (same calls as the core)."""

    CALLS = CALLS

    def __init__(self, launch: AggregatorLaunch, plan: TrainPlan, *,
                 central_dp: CentralDp | None = None, robust: Any = None) -> None:
        self.launch = launch
        self.robust_inside = robust is not None  # the strategy itself aggregates in there
        # The enclave process's resident memory once started and its peak (once closed).
        self.start_rss_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self._lock = threading.RLock()  # _result may close while a call holds it
        self._core: AggregatorCore | None = None
        self._conn: Any = None
        self._process: Any = None
        if launch.isolation == "inprocess":
            self._core = AggregatorCore(build_provider(launch), plan, central_dp=central_dp,
                                        robust=robust)
            self.measurement = getattr(self._core.provider, "measurement", None)
            return
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cleanroom.coordinator.aggregator_enclave"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._conn = _Duplex(os.dup(self._process.stdout.fileno()),
                             os.dup(self._process.stdin.fileno()))
        self._process.stdout.close()
        self._process.stdin.close()
        self._conn.send_call((launch, plan.model_dump_json(), central_dp, robust))
        self.measurement = self._result(START_TIMEOUT, "start")

    def _result(self, timeout: float, what: str) -> Any:
        if not self._conn.poll(timeout):
            self.close()
            raise CleanroomError(f"the aggregator enclave did not answer {what} within "
                                 f"{timeout:.0f}s")
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise CleanroomError(f"the aggregator enclave stopped (no answer to {what})") \
                from None
        if reply[0] == "error":
            raise CleanroomError(f"aggregator enclave: {reply[1]}: {reply[2]}")
        return reply[1]

    def __getattr__(self, name: str) -> Any:
        if name not in self.CALLS:
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._core is not None:
                return getattr(self._core, name)(*args, **kwargs)
            with self._lock:
                if self._conn is None:
                    raise CleanroomError("the aggregator enclave is closed")
                try:
                    self._conn.send_call((name, args, kwargs))
                except OSError:  # the enclave process is gone (its pipe is closed)
                    self.close()
                    raise CleanroomError(f"the aggregator enclave stopped (cannot send "
                                         f"{name})") from None
                return self._result(CALL_TIMEOUT, name)
        return call

    def close(self) -> None:
        """Stop the enclave process (its keys die with it)."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send_call(("close", (), {}))
                    if self._conn.poll(5):
                        reply = self._conn.recv()
                        if reply[0] == "ok" and isinstance(reply[1], tuple):
                            self.start_rss_bytes, self.peak_rss_bytes = reply[1]
                except (OSError, EOFError, BrokenPipeError):
                    pass
                self._conn.close()
                self._conn = None
            if self._process is not None:
                try:
                    self._process.wait(5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(5)
                self._process = None


if __name__ == "__main__":
    # Run the imported module's code, not this __main__ copy: the types the pipe rebuilds
    # (AggregatorLaunch...) must be the package's own.
    from cleanroom.coordinator.aggregator_enclave import _child_main as main

    main()
