"""The site's warm, gated executor in-process (no SuperNode): a refused task never reaches
Flower's installer or loader and answers with a typed error the operator can read; an
approved one runs Flower's own ClientApp runner with the inputs already pulled, in a folder
of its own; the warm process loads what a message needs and starts no thread; and the Flower
seams it relies on are still there."""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime import run_clientapp as flower

from cleanroom.coordinator.provision import ProvisionRequest, provision
from cleanroom.site_agent import executor
from cleanroom.site_agent.approvals import ApprovalRequest
from cleanroom.site_agent.config import load_site_config
from cleanroom.site_agent.runtime import build_runtime
from cleanroom.task import build_fab, task_digest

HEART = Path(__file__).resolve().parents[2] / "models" / "heart_disease"
ROGUE = """
[project]
name = "rogue"
version = "1.0.0"
[tool.flwr.app]
publisher = "mallory"
[tool.flwr.app.components]
serverapp = "server_app:app"
clientapp = "client_app:app"
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fed") / "fed"
    provision(ProvisionRequest(out=out, sites=["cleveland"], site_torch_threads=1))
    return out / "sites" / "cleveland" / "site.toml"


@pytest.fixture(scope="module")
def rogue_fab(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("rogue")
    (folder / "pyproject.toml").write_text(ROGUE)
    (folder / "server_app.py").write_text("app = None\n")
    (folder / "client_app.py").write_text("raise SystemExit('imported')\n")
    return build_fab(folder)


class Recorder:
    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.outputs: list[tuple[str, str]] = []


@pytest.fixture()
def task(monkeypatch, tmp_path):
    """A fake task: what the SuperNode would hand over for ``fab``, Flower's push functions
    recorded, its installer and runner armed to fail the test if reached."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 5)
    monkeypatch.setattr(TaskIdentity, "_task_id", 11)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    rec = Recorder()

    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("the FAB reached Flower's installer or runner")

    monkeypatch.setattr(flower, "push_message", lambda _c, msg, _ctx: rec.pushed.append(msg))
    monkeypatch.setattr(flower, "push_task_output",
                        lambda _c, _ctx, status, details: rec.outputs.append((status, details)))
    monkeypatch.setattr(flower, "install_from_fab", forbidden)
    monkeypatch.setattr(flower, "run_clientapp", forbidden)
    monkeypatch.setattr(flower, "pull_task_input", forbidden)

    def make(fab: bytes, fab_id: str, version: str = "1.0.0") -> tuple[Recorder, Message]:
        message = Message(RecordDict(), dst_node_id=5, message_type="train")
        message.metadata.__dict__["_message_id"] = message.object_id
        run = Run.create_empty(7)
        run.fab_id, run.fab_version = fab_id, version
        run.fab_hash = hashlib.sha256(fab).hexdigest()
        inputs = (message, Context(run_id=7, node_id=5, node_config={}, state=RecordDict(),
                                   run_config={}), run,
                  Fab(hashlib.sha256(fab).hexdigest(), fab, {}))
        monkeypatch.setattr(executor, "pull_task_input", lambda _client: inputs)
        return rec, message

    return make


def settings(site: Path) -> executor.ExecutorSettings:
    return executor.ExecutorSettings(site, "127.0.0.1:1", b"s" * 32)


def test_an_unapproved_task_is_refused_before_flower_sees_its_fab(site, task, rogue_fab):
    runtime = build_runtime(load_site_config(site))
    rec, message = task(rogue_fab, "mallory/rogue")
    assert executor.run_task(runtime, settings(site), "token", 11, 0.0) == 0
    [reply] = rec.pushed
    assert reply.has_error() and reply.error.code == 403
    assert reply.error.reason.startswith("task-not-approved: task mallory/rogue 1.0.0")
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert rec.outputs and rec.outputs[0][1] == reply.error.reason
    [event] = [e for e in runtime.activity.recent() if e["event"] == "task-refused"]
    assert event["run_id"] == "7" and event["reason"] == reply.error.reason
    assert event["fab_id"] == "mallory/rogue" and len(event["task_digest"]) == 64


def test_an_approved_task_runs_flowers_runner_in_its_own_folder(site, task, monkeypatch):
    runtime = build_runtime(load_site_config(site))
    fab = build_fab(HEART)
    rec, message = task(fab, "cleanroom/cleanroom-heart-disease")
    seen: dict[str, Any] = {}

    def runner(**kwargs: Any) -> None:
        seen.update(kwargs)
        seen["inputs"] = flower.pull_task_input(None)
        seen["home"] = Path(os.environ["FLWR_HOME"])
        seen["home"].mkdir(parents=True)
        (seen["home"] / "installed").write_text("x")
        raise SystemExit(0)  # Flower's runner ends with sys.exit

    monkeypatch.setattr(flower, "run_clientapp", runner)
    assert executor.run_task(runtime, settings(site), "the-token", 12, 0.0) == 0
    assert seen["token"] == "the-token" and seen["parent_pid"] == os.getppid()
    assert seen["runtime_dependency_install"] is False
    assert seen["inputs"][0] is message  # pulled once, handed over
    assert seen["home"].name == "12" and seen["home"].parent.name == executor.TASK_HOMES
    assert not seen["home"].exists()  # removed after the task
    assert rec.pushed == []  # the reply is Flower's runner's to push


def test_a_per_run_approval_made_after_start_counts(site, task, rogue_fab, monkeypatch):
    runtime = build_runtime(load_site_config(site))
    from cleanroom.task import fab_digest

    runtime.approvals.approve(ApprovalRequest(run_id="7", task_digest=fab_digest(rogue_fab),
                                              epsilon=0.5))
    view = executor.gate_view(runtime)
    assert view["approvals"]["7"] == fab_digest(rogue_fab)
    task(rogue_fab, "mallory/rogue")
    called = []
    monkeypatch.setattr(flower, "run_clientapp", lambda **kw: called.append(kw))
    executor.run_task(runtime, settings(site), "t", 13, 0.0)
    assert called, "an approved run's task was refused"
    runtime.approvals.revoke("7")


def test_warm_up_loads_what_a_message_needs_and_starts_no_thread(site):
    before = set(threading.enumerate())  # other tests of the session may have left some
    runtime = executor.warm_up(settings(site))
    digest = task_digest(HEART)
    assert digest in runtime._tasks  # the policy's approved task, loaded once
    assert runtime._data  # with its registered data
    assert set(threading.enumerate()) <= before
    import sys

    for name in executor.PRELOAD:
        assert name in sys.modules


def test_the_runtime_api_must_be_on_loopback(site, tmp_path):
    secret = tmp_path / "s"
    secret.write_bytes(b"x" * 32)
    with pytest.raises(SystemExit):
        executor.main(["--config", str(site), "--runtime-api-address", "10.0.0.5:9094",
                       "--secret-file", str(secret)])


def test_flower_seams_the_executor_relies_on():
    """Flower 1.42's ClientApp runner looks these names up in its module at call time (the
    executor hands over the inputs it pulled by replacing ``pull_task_input``)."""
    source = inspect.getsource(flower.run_clientapp)
    for call in ("pull_task_input(client)", "install_from_fab(fab.content",
                 "push_message(client, reply_message, context)", "push_task_output("):
        assert call in source, call
    params = inspect.signature(flower.run_clientapp).parameters
    assert {"runtime_api_address", "token", "insecure", "certificates", "parent_pid",
            "runtime_dependency_install"} <= set(params)


class BeatingClient:
    """A Runtime API client that only counts task heartbeats."""

    def __init__(self) -> None:
        self.beats = 0

    def SendTaskHeartbeat(self, _request: Any) -> Any:  # Flower's method name
        self.beats += 1

        class Ok:
            success = True
        return Ok()

    def close(self) -> None:
        pass


def test_a_slow_pull_keeps_its_task_alive_and_a_fast_one_sends_nothing(monkeypatch):
    """Flower expires a task token after 60 s without a heartbeat and then answers the
    message with an error reply of its own, one reply too many for the SuperNode's
    one-reply-per-pull loop: a pull that waits (the SuperNode still fetching the message)
    sends heartbeats; a fast one sends none."""
    import time

    monkeypatch.setattr(executor, "KEEPALIVE_AFTER", 0.05)
    monkeypatch.setattr(executor, "KEEPALIVE_EVERY", 0.05)
    client = BeatingClient()
    with executor.kept_alive(client):
        time.sleep(0.5)
    beats = client.beats
    assert beats >= 3
    time.sleep(0.2)
    assert client.beats == beats  # stopped with the body
    monkeypatch.setattr(executor, "KEEPALIVE_AFTER", 5.0)
    fast = BeatingClient()
    with executor.kept_alive(fast):
        pass
    assert fast.beats == 0


def test_a_message_that_never_arrives_whole_ends_its_task_without_a_reply(site, task,
                                                                           monkeypatch):
    """The SuperNode stored a message, then could not fetch its content (its run ended when
    the coordinator was killed) and gave it up: the task fails, and no reply is pushed (it
    would go out in place of the next message's)."""
    runtime = build_runtime(load_site_config(site))
    rec, _ = task(b"fab", "cleanroom/x")

    def unavailable(_client: Any) -> Any:
        raise RuntimeError("object 3f2a... not available after 7200 s")

    monkeypatch.setattr(executor, "pull_task_input", unavailable)
    monkeypatch.setattr(executor, "_task_client", lambda *_a: BeatingClient())
    assert executor.run_task(runtime, settings(site), "token", 13, 0.0) == 1
    assert rec.pushed == []
    [(status, details)] = rec.outputs
    assert status == "failed" and details.startswith("message content unavailable: object")


def test_a_task_that_flower_interrupts_leaves_its_sibling_tasks_alone(monkeypatch):
    """Flower's retry policy answers a 401 (an expired task token) by SIGINTing its own
    process. In a forked task that signal must end that task only: with the warm parent's
    handler inherited, it ran the parent's stop, which SIGTERMs every task alive at the
    fork, a sibling still training included (or a process that reused its pid)."""
    import signal
    import subprocess
    import sys
    import time

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    warm = executor.Executor(executor.ExecutorSettings(Path("site.toml"), "127.0.0.1:1",
                                                       b"s" * 32))
    warm.children.add(sibling.pid)  # a task still running when the next one is forked

    def interrupted(*_: Any) -> int:
        os.kill(os.getpid(), signal.SIGINT)  # what flwr's HTTP retry invoker does on a 401
        time.sleep(1.0)
        return 0

    monkeypatch.setattr(executor, "run_task", interrupted)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGTERM, warm.stop)  # as executor.main installs them
        signal.signal(signal.SIGINT, warm.stop)
        warm._fork(None, "token", 13)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    [child] = warm.children - {sibling.pid}
    try:
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 1  # the interrupted task failed
        time.sleep(0.2)
        assert sibling.poll() is None, "the interrupted task stopped its sibling"
        assert not warm.stopping  # nor did the parent start stopping
    finally:
        sibling.kill()
        sibling.wait()


class HostileNode:
    """The SuperNode's Runtime API as a task sees it, answering what the test says."""

    def __init__(self, messages: list[Message], trees: int | None = None,
                 objects: dict[str, bytes] | None = None) -> None:
        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import get_object_tree

        self.messages = [message_to_proto(m) for m in messages]
        self.trees = [get_object_tree(m) for m in messages][:trees]
        self.objects = objects if objects is not None else {
            oid: content for m in messages for oid, content in _deflated(m).items()}
        self.confirmed: list[str] = []

    def PullTaskInput(self, _request: Any) -> Any:  # Flower's method names
        from flwr.proto.message_pb2 import Context as ContextProto
        from flwr.proto.run_pb2 import Run as RunProto
        from flwr.proto.runtime_pb2 import PullTaskInputResponse

        return PullTaskInputResponse(task_id=11, run=RunProto(run_id=7),
                                     context=ContextProto(run_id=7, node_id=5))

    def PullMessages(self, _request: Any) -> Any:
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(messages_list=self.messages,
                                       message_object_trees=self.trees)

    def PullObject(self, request: Any) -> Any:
        from flwr.proto.message_pb2 import PullObjectResponse

        content = self.objects.get(request.object_id)
        return PullObjectResponse(object_found=content is not None, object_available=True,
                                  object_content=content or b"")

    def ConfirmMessageReceived(self, request: Any) -> Any:
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse

        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def _deflated(obj: Any) -> dict[str, bytes]:
    out = {obj.object_id: obj.deflate()}
    for child in (obj.children or {}).values():
        out.update(_deflated(child))
    return out


def test_a_hostile_supernodes_message_list_is_refused_or_taken_as_flower_takes_it(
        task, monkeypatch):
    """No message, a message without its object tree, a tree whose objects are missing:
    the pull fails (run_task then ends the task without a reply); two messages offered for
    one task: only the first is this task's, confirmed once (as Flower's own runner)."""
    from flwr.app import ConfigRecord
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    first = Message(RecordDict({"c": ConfigRecord({"n": 1})}), dst_node_id=5,
                    message_type="train")
    second = Message(RecordDict({"c": ConfigRecord({"n": 2})}), dst_node_id=5,
                     message_type="evaluate")
    with pytest.raises(RuntimeError, match="without a message"):
        executor.pull_task_input(HostileNode([]))
    with pytest.raises(IndexError):
        executor.pull_task_input(HostileNode([first], trees=0))
    with pytest.raises(ObjectPullError):
        executor.pull_task_input(HostileNode([first], objects={}))
    node = HostileNode([first, second])
    message, context, run, _ = executor.pull_task_input(node)
    assert message.metadata.message_type == "train"
    assert message.content["c"]["n"] == 1 and message.object_id == first.object_id
    assert node.confirmed == [first.object_id]
    assert (context.node_id, run.run_id) == (5, 7)
