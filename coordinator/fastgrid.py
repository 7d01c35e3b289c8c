"""Grid wrappers: a delegating base, and one that polls for replies quickly.

Flower's deployment Grid (1.41 and 1.42) sleeps 3 s between pulls in ``send_and_receive`` and
returns the replies only when all are in; with a few messages per round that dominates round
time, and the coordinator holds every site's reply at once. :class:`FastPollGrid` pushes every
message at once, then hands out the replies as they are pulled (every ``interval`` seconds)
until every reply is in or ``timeout`` passes: a strategy that folds each reply as it arrives
(the attested aggregator does) holds one reply at a time, not one per site.

When a node cannot be reached (it missed its heartbeats: crashed, partitioned), the SuperLink
answers for it with an error reply whose sender is the SuperLink itself
(``SUPERLINK_NODE_ID``); :class:`FastPollGrid` hands it on as the unreachable node's reply, so
the round records that site (not a ``node-1``) as quarantined.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid


class DelegatingGrid(Grid):
    """A Grid that hands every call to another Grid; subclasses change one behaviour."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class FastPollGrid(DelegatingGrid):
    """Push at once, poll every ``interval`` seconds, yield each reply as it is pulled."""

    def __init__(self, grid: Grid, interval: float = 0.05) -> None:
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterator[Message]:
        # Pushed now (not when the replies are first asked for); the deadline counts from now.
        messages = list(messages)
        ids = list(self.push_messages(messages))
        sent_to = {mid: getattr(getattr(m, "metadata", None), "dst_node_id", None)
                   for mid, m in zip(ids, messages, strict=False)}
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._replies(set(ids), deadline, sent_to)

    def _replies(self, pending: set[str], deadline: float | None,
                 sent_to: dict[str, int | None]) -> Iterator[Message]:
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(list(pending)):
                answered = reply.metadata.reply_to_message_id
                if answered in pending:  # one reply per message sent, never a stray one
                    pending.discard(answered)
                    yield _for_unreachable_node(reply, sent_to.get(answered))
            if pending:
                time.sleep(self.interval)


def _for_unreachable_node(reply: Message, node_id: int | None) -> Message:
    """The SuperLink's own error reply for a node it could not reach, as that node's reply
    (only an error, only from the SuperLink: a node's reply keeps its authenticated sender)."""
    if (node_id is not None and reply.metadata.src_node_id == SUPERLINK_NODE_ID
            and reply.has_error()):
        reply.metadata.__dict__["_src_node_id"] = node_id  # Metadata has no setter for it
    return reply
