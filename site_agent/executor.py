"""The site's own SuperExec: warm, and gated on the site's approvals.

The site daemon starts Flower's SuperNode with ``--isolation process
--superexec-auth-secret-file S``: the SuperNode then launches nothing itself, and only a
process holding the secret ``S`` can take a task (Flower's ``AcquireTask``, HMAC-signed) from
its loopback Runtime API. This module is that process, in place of ``flower-superexec``:

1. **Warm.** It imports torch, Opacus, Flower's ClientApp runtime and the site agent once and
   builds the site runtime (enclave provider, sealed stores) once (:func:`warm_up`). It never
   imports anything of a task's FAB and never runs a torch operation (it stays one thread, so
   ``fork()`` is safe).
2. **One fresh child per task.** For each task it forks. The child pulls the task's inputs with
   the task's own token (:func:`pull_task_input`: the FAB is bytes in memory),
   and asks the gate (:func:`cleanroom.site_agent.task_gate.decide`) BEFORE anything of the FAB
   is unpacked, installed or imported:

   * refused: it pushes an error reply whose reason starts with ``task-not-approved:``
     (the coordinator files it as this site's quarantine reason), records it in the site's
     activity log (``cleanroom site status``, the site API) and exits. Nothing of the FAB
     ever touched the disk;
   * approved: it hands the inputs it already pulled to Flower's own ClientApp runner
     (install the FAB into a folder of this task's own, load the ClientApp, run it, push the
     reply and the node context, task heartbeats), then exits.

   Forking per task keeps tasks apart: Flower caches app modules by name in ``sys.modules``,
   so a long-lived process would serve a later FAB with an earlier one's modules.
3. **Never on a command line:** tokens travel only in memory (stock Flower puts them on argv).

Flower specifics used (1.42, docs/notes/flower-deployment.md): ``RuntimeHttpClient``,
``AcquireTask`` with ``SuperExecAuthHttpInterceptor``, the Runtime API calls of Flower's own
task-input pull, and the module ``flwr.supernode.runtime.run_clientapp`` (``push_message``,
``push_task_output``, ``install_from_fab``, and ``run_clientapp``, which looks
``pull_task_input`` up at call time: the child sets it to return what was already pulled).

Run: ``python -m cleanroom.site_agent.executor --config site.toml --runtime-api-address
127.0.0.1:PORT --secret-file S`` (the site daemon does).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRELOAD = ("torch", "torch._dynamo", "opacus", "pandas", "flwr.supernode.runtime.run_clientapp",
           "flwr.cli.install", "flwr.clientapp.utils", "cleanroom.site_agent.clientapp",
           "cleanroom.site_agent.trainers", "cleanroom.site_agent.trainer",
           "cleanroom.site_agent.training", "cleanroom.site_agent.datasets")
"""What a message would otherwise import (torch's optimisers import torch._dynamo on first
use; the data room parses with pandas). Imports only: nothing here starts a Python thread."""
TASK_HOMES = "tasks"  # under the executor's FLWR_HOME: one install folder per task
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


@dataclass(frozen=True)
class ExecutorSettings:
    config: Path  # site.toml
    runtime_api_address: str  # the SuperNode's Runtime API (loopback, plain HTTP)
    secret: bytes  # SuperExec secret shared with the SuperNode
    preload: tuple[str, ...] = PRELOAD


def warm_up(settings: ExecutorSettings) -> Any:
    """Import the heavy modules, build the site runtime and load the site policy's approved
    tasks and their data once; returns the runtime."""
    started = time.perf_counter()
    for name in settings.preload:
        importlib.import_module(name)
    from cleanroom.attestation.registry import formats
    from cleanroom.site_agent import clientapp

    formats()  # the evidence formats (imported on first use otherwise)
    runtime = clientapp.SITES.runtime_for_path(str(settings.config))
    runtime.approvals  # noqa: B018 - open the sealed stores once (keys derived here)
    runtime.activity  # noqa: B018
    loaded = runtime.preload([t.digest for t in runtime.config.policy.tasks])
    if threading.active_count() > 1:
        log.warning("the warm process runs %d threads: forking it is unsafe",
                    threading.active_count())
    log.info("site %s: warm in %.2fs (%d approved task(s) loaded; %s)", runtime.site,
             time.perf_counter() - started, len(loaded), ", ".join(settings.preload))
    return runtime


def _acquire_client(settings: ExecutorSettings) -> Any:
    """Runtime API client signing AcquireTask with the SuperExec secret. Transport errors are
    retried briefly; an HTTP error (401: wrong secret) is raised to the loop at once (Flower's
    own retry policy would SIGINT this process on a 401)."""
    import httpx
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import RetryInvoker, constant
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=settings.runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=settings.secret,
                                                   protected_methods=frozenset({
                                                       ACQUIRE_METHOD}))],
        retry_invoker=RetryInvoker(lambda: constant(0.2), httpx.TransportError, max_tries=3,
                                   max_time=2.0, jitter=None))


def _task_client(address: str, token: str) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


OBJECT_BACKOFF = 0.05  # s, first retry of a message object the SuperNode is still fetching
OBJECT_WAIT = 7200.0  # s: as long as the SuperNode itself fetches a message (flwr's PULL_MAX_TIME)
KEEPALIVE_AFTER = 10.0  # s: a pull still waiting then starts heartbeats (none on a fast pull)
KEEPALIVE_EVERY = 20.0  # s; Flower expires a task token after 60 s without a heartbeat


@contextlib.contextmanager
def kept_alive(client: Any) -> Iterator[None]:
    """Task heartbeats while the body runs longer than :data:`KEEPALIVE_AFTER` (Flower's own
    runner starts them before its pull; ours pulls first). A task whose token expires gets a
    'ClientApp stopped responding' error reply from the SuperNode, which answers one reply
    per message it pulled: that extra reply would go out in place of the next message's,
    and every later reply of this site one message late."""
    from flwr.supercore.heartbeat import make_task_heartbeat_fn_http

    beat = make_task_heartbeat_fn_http(client)
    stop = threading.Event()

    def run() -> None:
        wait = KEEPALIVE_AFTER
        while not stop.wait(wait):
            try:
                beat()
            except Exception as exc:  # noqa: BLE001 - the pull reports the real failure
                log.debug("task heartbeat failed: %s", exc)
            wait = KEEPALIVE_EVERY

    thread = threading.Thread(target=run, name="task-keepalive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """(message, context, run, FAB) of the task, as Flower's own ``pull_task_input`` pulls
    them, but retrying a message object that is not there yet after 50 ms instead of 1 s:
    the SuperNode offers the task before it has fetched the message's objects from the
    SuperLink, and a warm executor asks within milliseconds."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = (context_from_proto(res.context), run_from_proto(res.run),
                         fab_from_proto(res.fab))
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=OBJECT_BACKOFF, backoff_cap=1.0,
        max_tries_per_object=None, max_time=OBJECT_WAIT)  # never give up before the SuperNode
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's runner sets it
    return message, context, run, fab


def gate_view(runtime: Any) -> dict[str, Any]:
    """The site's decisions the gate needs, read fresh (an approval made a second ago
    counts): policy task digests, require_approval, run id -> approved task digest."""
    policy = runtime.config.policy
    return {"site": runtime.site, "policy_tasks": [t.digest for t in policy.tasks],
            "require_approval": policy.require_approval,
            "approvals": {run: a.task_digest for run, a in runtime.approvals.current().items()}}


def run_task(runtime: Any, settings: ExecutorSettings, token: str, task_id: int,
             acquired: float) -> int:
    """In the forked child: pull, gate, then refuse or run the task. Returns an exit code."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime import run_clientapp as flower

    from cleanroom.site_agent.task_gate import ERROR_CODE, RunClaim, decide

    threads = runtime.config.executor.torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    address = settings.runtime_api_address
    client = _task_client(address, token)
    try:
        with kept_alive(client):
            message, context, run, fab = pull_task_input(client)
    except Exception as exc:  # noqa: BLE001 - whatever broke the pull, the task ends here
        # The SuperNode gave this message up (it could not fetch its content: its run ended
        # mid-transfer, e.g. the coordinator was killed): no reply, only a failed task, so
        # that nothing goes out in place of the next message's reply.
        log.warning("task %s: its message never arrived whole, the task ends without a "
                    "reply: %s", task_id, str(exc)[:300])
        flower.push_task_output(client, None, SubStatus.FAILED,
                                f"message content unavailable: {str(exc)[:300]}")
        client.close()
        return 1
    pulled = time.perf_counter()
    claim = RunClaim(run_id=int(run.run_id), fab_id=str(run.fab_id),
                     fab_version=str(run.fab_version), fab_hash=str(fab.hash_str),
                     run_config=dict(run.override_config))
    decision = decide(fab.content, claim, **gate_view(runtime))
    decided = time.perf_counter()
    timing = {"task": task_id, "run": claim.run_id, "type": message.metadata.message_type,
              "digest": decision.task_digest[:16], "approved": decision.approved,
              "pull": round(pulled - acquired, 4), "gate": round(decided - pulled, 4)}
    if not decision.approved:
        log.warning("run %s: refused task %s: %s", claim.run_id, task_id, decision.reason)
        runtime.activity.record("task-refused", str(claim.run_id), 0,
                                task_digest=decision.task_digest, fab_id=claim.fab_id,
                                reason=decision.reason)
        flower.push_message(client, Message(Error(code=ERROR_CODE, reason=decision.reason),
                                            reply_to=message), context)
        flower.push_task_output(client, context, SubStatus.FAILED, decision.reason)
        client.close()
        timing["reply"] = round(time.perf_counter() - decided, 4)
        log.info("timing %s", json.dumps(timing))
        return 0
    client.close()
    log.info("run %s: task %s (%s): %s", claim.run_id, task_id,
             message.metadata.message_type, decision.reason)
    home = Path(os.environ.get("FLWR_HOME", ".")) / TASK_HOMES / str(task_id)
    os.environ["FLWR_HOME"] = str(home)  # this task's own install folder (removed at exit)
    push = flower.push_message
    marks: dict[str, float] = {}

    def timed_push(*args: Any, **kwargs: Any) -> None:
        marks["push"] = time.perf_counter()
        push(*args, **kwargs)
        marks["pushed"] = time.perf_counter()

    install = flower.install_from_fab

    def timed_install(*args: Any, **kwargs: Any) -> Any:
        marks["install"] = time.perf_counter()
        try:
            return install(*args, **kwargs)
        finally:
            marks["installed"] = time.perf_counter()

    flower.pull_task_input = lambda _client: (message, context, run, fab)
    flower.push_message = timed_push
    flower.install_from_fab = timed_install
    code = 0
    try:
        flower.run_clientapp(runtime_api_address=address, token=token, insecure=True,
                             certificates=None, parent_pid=os.getppid(),
                             runtime_dependency_install=False)
    except SystemExit as exc:  # Flower's runner ends with sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if "installed" in marks:
        timing["install"] = round(marks["installed"] - marks["install"], 4)
    if "push" in marks:
        timing["app"] = round(marks["push"] - decided, 4)  # install + load + our handler
        timing["reply"] = round(marks["pushed"] - marks["push"], 4)
    timing["exit"] = code
    log.info("timing %s", json.dumps(timing))
    return code


class Executor:
    """The warm parent: acquires tasks and forks one child per task."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.children: set[int] = set()
        self.stopping = False

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.warning("task process %d exited with status %d", pid, code)

    def _fork(self, runtime: Any, token: str, task_id: int) -> None:
        acquired = time.perf_counter()
        pid = os.fork()
        if pid:
            self.children.add(pid)
            return
        code = 1
        try:  # the child: one task, then exit without returning into the parent's loop
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # Not the parent's SIGINT handler (stop): Flower's retry policy SIGINTs its own
            # process on a 401 (an expired task token), and the parent's stop would then
            # SIGTERM every sibling task alive at the fork (or whatever reused their pids).
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.children = set()
            code = run_task(runtime, self.settings, token, task_id, acquired)
        except BaseException:  # noqa: BLE001 - a child must never unwind into the loop
            log.error("task %s failed:\n%s", task_id, traceback.format_exc(limit=20))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def serve(self) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        from cleanroom.errors import ConfigError

        runtime = warm_up(self.settings)
        client = _acquire_client(self.settings)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        poll = runtime.config.executor.poll_seconds
        log.info("site %s: taking tasks from %s every %.2fs", runtime.site,
                 self.settings.runtime_api_address, poll)
        failures = 0
        while not self.stopping:
            self._reap()
            try:
                res = client.AcquireTask(request)
                failures = 0
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 401:
                    raise ConfigError("the SuperNode refused this executor: SuperExec "
                                      "authentication failed (secret mismatch)") from None
                failures += 1
                self._complain(failures, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the SuperNode may not be up yet
                failures += 1
                self._complain(failures, exc)
                continue
            if res.HasField("task") and res.token:
                self._fork(runtime, res.token, int(res.task.task_id))
                continue  # look again at once: a run may have queued more
            time.sleep(poll)
        client.close()

    @staticmethod
    def _complain(failures: int, exc: Exception) -> None:
        if failures in (1, 20) or failures % 300 == 0:
            log.warning("AcquireTask failed (%d in a row): %s", failures, exc)
        time.sleep(min(2.0, 0.2 * failures))

    def stop(self, *_: Any) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cleanroom.site_agent.executor",
                                     description="The site's warm, gated SuperExec.")
    parser.add_argument("--config", type=Path, required=True, help="site.toml")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API (127.0.0.1:PORT)")
    parser.add_argument("--secret-file", type=Path, required=True,
                        help="the SuperExec secret the SuperNode was started with")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    host = args.runtime_api_address.rpartition(":")[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        parser.error("--runtime-api-address must be on loopback (the Runtime API is plain "
                     "HTTP)")
    settings = ExecutorSettings(args.config.resolve(), args.runtime_api_address,
                                args.secret_file.read_bytes())
    executor = Executor(settings)
    signal.signal(signal.SIGTERM, executor.stop)
    signal.signal(signal.SIGINT, executor.stop)
    from cleanroom.errors import CleanroomError

    try:
        executor.serve()
    except CleanroomError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
