"""An in-process Flower Grid: runs each node's ClientApp directly, in this process.

Every message really crosses a "wire": it is serialised to Flower's protobuf bytes and parsed
back on the other side, exactly as the SuperLink would carry it, and each byte string can be
handed to a tap (the confidentiality tests inspect them). Nodes keep their Flower ``Context``
across messages like a SuperNode does. Used by the fast tests and by ``--backend inprocess``.

With ``workers`` > 1 the nodes of a batch are served by a thread pool: one node never runs two
messages at once (a lock per node), different nodes overlap their waits (fsync of the sealed
ledger, file reads) and whatever releases the GIL (AES-GCM, hashing, torch kernels); the site's
trainer serialises training itself (:mod:`cleanroom.site_agent.trainer`). Replies are handed
to ``on_reply`` as they arrive (progress), and :meth:`InProcessGrid.stream` yields them one by
one, holding at most ``workers`` replies that were not consumed yet (a streaming aggregator
never needs every reply in memory at once).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

CLIENT_APP_EXCEPTION = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION

WireTap = Callable[[str, int, bytes], None]  # (direction "down"/"up", node_id, bytes)
ReplyHook = Callable[[Message, int, int], None]  # (reply, done, total), in the caller's thread


@dataclass
class Node:
    node_id: int
    app: ClientApp
    context: Context
    lock: threading.Lock = field(default_factory=threading.Lock)


class SiteHost:
    """Every node's ClientApp in ONE separate process (spawned): the nodes' memory is that
    process's, apart from the coordinator's (``python -m benchmarks memory``). Requests travel
    as the same protobuf bytes, one at a time. ``app_factory`` must be picklable (a
    module-level function or a ``functools.partial`` of one) and return the ClientApp."""

    def __init__(self, app_factory: Callable[[], ClientApp], node_configs: dict[int, dict],
                 run_id: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_host_main, args=(child, app_factory,
                                                          dict(node_configs), run_id),
                                 name="cleanroom-sites", daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.peak_rss_bytes = 0

    def call(self, node_id: int, data: bytes) -> bytes:
        with self._lock:
            self._conn.send_bytes(node_id.to_bytes(8, "big") + data)
            return self._conn.recv_bytes()

    def close(self) -> None:
        """Stop the process; ``peak_rss_bytes`` is then its peak resident memory."""
        with self._lock:
            if self._proc.is_alive():
                self._conn.send_bytes(b"")
                self.peak_rss_bytes = int.from_bytes(self._conn.recv_bytes(), "big")
                self._proc.join(timeout=60)
            self._conn.close()


def _host_main(conn: object, app_factory: Callable[[], ClientApp],
               node_configs: dict[int, dict], run_id: int) -> None:
    import resource

    app = app_factory()
    nodes = {nid: Node(nid, app, Context(run_id=run_id, node_id=nid, node_config=dict(cfg),
                                         state=RecordDict(), run_config={}))
             for nid, cfg in node_configs.items()}
    while True:
        request = conn.recv_bytes()  # type: ignore[attr-defined]
        if not request:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            conn.send_bytes(peak.to_bytes(8, "big"))  # type: ignore[attr-defined]
            return
        node = nodes[int.from_bytes(request[:8], "big")]
        proto = ProtoMessage()
        proto.ParseFromString(request[8:])
        reply = _run_app(node, message_from_proto(proto))
        conn.send_bytes(message_to_proto(reply).SerializeToString())  # type: ignore[attr-defined]


def _run_app(node: Node, received: Message) -> Message:
    """The node's ClientApp on one message; an exception becomes an error reply (as in
    Flower)."""
    with node.lock:
        try:
            reply = node.app(received, node.context)
        except Exception as exc:  # noqa: BLE001 - becomes an error reply, as in Flower
            log.debug("ClientApp on node %d raised:\n%s", node.node_id, traceback.format_exc())
            reply = Message(Error(code=CLIENT_APP_EXCEPTION,
                                  reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
    reply.metadata.__dict__["_src_node_id"] = node.node_id
    return reply


class InProcessGrid(Grid):
    """Grid over in-process nodes; ``workers`` > 1 runs nodes concurrently (threads)."""

    def __init__(self, nodes: dict[int, Node], run_id: int = 1, *, workers: int = 1,
                 tap: WireTap | None = None, on_reply: ReplyHook | None = None,
                 host: SiteHost | None = None) -> None:
        self.nodes = nodes
        self.host = host
        self._run = Run.create_empty(run_id)
        # Flower 1.41 stamps new instruction messages with the process's task identity; here
        # the process plays the ServerApp (replies take their metadata from the instruction).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self._replies: dict[str, Message] = {}
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cleanroom-node") \
            if workers > 1 else None
        self.tap = tap
        self.on_reply = on_reply
        self._bytes_lock = threading.Lock()
        self.bytes_down = 0
        self.bytes_up = 0

    @classmethod
    def build(cls, app_for: Callable[[int], ClientApp], node_configs: dict[int, dict],
              run_id: int = 1, **kw: object) -> InProcessGrid:
        nodes = {nid: Node(nid, app_for(nid), Context(run_id=run_id, node_id=nid,
                                                      node_config=dict(cfg), state=RecordDict(),
                                                      run_config={}))
                 for nid, cfg in node_configs.items()}
        return cls(nodes, run_id, **kw)  # type: ignore[arg-type]

    @classmethod
    def in_subprocess(cls, app_factory: Callable[[], ClientApp], node_configs: dict[int, dict],
                      run_id: int = 1, **kw: object) -> InProcessGrid:
        """The nodes run in a separate process (:class:`SiteHost`), one message at a time."""
        host = SiteHost(app_factory, node_configs, run_id)
        nodes = {nid: Node(nid, None, Context(run_id=run_id, node_id=nid,  # type: ignore[arg-type]
                                              node_config=dict(cfg), state=RecordDict(),
                                              run_config={}))
                 for nid, cfg in node_configs.items()}
        kw.pop("workers", None)
        return cls(nodes, run_id, host=host, **kw)  # type: ignore[arg-type]

    def set_run(self, run: Run) -> None:
        self._run = run
        TaskIdentity.run_id = run.run_id

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def _wire(self, direction: str, node_id: int, msg: Message) -> Message:
        data = message_to_proto(msg).SerializeToString()
        self._count(direction, node_id, data)
        proto = ProtoMessage()
        proto.ParseFromString(data)
        return message_from_proto(proto)

    def _count(self, direction: str, node_id: int, data: bytes) -> None:
        with self._bytes_lock:
            if direction == "down":
                self.bytes_down += len(data)
            else:
                self.bytes_up += len(data)
        if self.tap is not None:
            self.tap(direction, node_id, data)

    def _deliver(self, msg: Message) -> Message:
        node = self.nodes[msg.metadata.dst_node_id]
        if self.host is not None:
            data = message_to_proto(msg).SerializeToString()
            self._count("down", node.node_id, data)
            data = self.host.call(node.node_id, data)
            self._count("up", node.node_id, data)
            proto = ProtoMessage()
            proto.ParseFromString(data)
            return message_from_proto(proto)
        received = self._wire("down", node.node_id, msg)
        reply = _run_app(node, received)
        return self._wire("up", node.node_id, reply)

    def _stamp(self, messages: Iterable[Message]) -> list[Message]:
        batch = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.nodes:
                raise ValueError(f"unknown node {msg.metadata.dst_node_id}")
            md = msg.metadata.__dict__
            md["_message_id"] = uuid.uuid4().hex
            md["_run_id"] = self._run.run_id
            md["_src_node_id"] = SUPERLINK_NODE_ID
            md["_created_at"] = time.time()
            batch.append(msg)
        return batch

    def stream(self, messages: Iterable[Message], *,
               ordered: bool = False) -> Iterator[Message]:
        """Deliver ``messages`` and yield each reply as soon as it is in (in completion order
        with workers, else in order; ``ordered``: always in the order of ``messages``, a
        reply waiting for the ones before it). At most ``workers`` deliveries are in flight,
        so no more than ``workers`` replies wait for the consumer."""
        batch = self._stamp(messages)
        total, done = len(batch), 0
        if self._pool is None:
            for msg in batch:
                reply = self._deliver(msg)
                done += 1
                if self.on_reply is not None:
                    self.on_reply(reply, done, total)
                yield reply
            return
        queue = iter(batch)
        running: list[Future[Message]] = []  # in the order of ``messages``
        try:
            while True:
                while len(running) < self.workers and (msg := next(queue, None)) is not None:
                    running.append(self._pool.submit(self._deliver, msg))
                if not running:
                    return
                if ordered:
                    wait(running[:1])
                    finished = running[:1]
                else:
                    ready, _ = wait(running, return_when=FIRST_COMPLETED)
                    finished = [f for f in running if f in ready]
                for future in finished:
                    running.remove(future)
                    reply = future.result()
                    done += 1
                    if self.on_reply is not None:
                        self.on_reply(reply, done, total)
                    yield reply
        finally:
            for future in running:  # a consumer that stopped early: finish what runs
                future.cancel()
            wait(running)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        for reply in self.stream(batch):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in batch]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """The replies in the order of ``messages`` as they come (:meth:`stream`): a strategy
        that folds each reply as it arrives (the attested aggregator does) holds at most
        ``workers`` of them, and a run folds them in the same order every time."""
        return self.stream(messages, ordered=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.host is not None:
            self.host.close()
