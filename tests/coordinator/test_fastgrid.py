"""FastPollGrid: pushes at once, yields each reply as it is pulled, stops at the deadline."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from cleanroom.coordinator.fastgrid import FastPollGrid


class FakeGrid:
    """Replies become available one per pull; records every call."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers = list(answers)  # reply_to ids handed out, one per pull (None: nothing)
        self.pushed: list[Any] = []
        self.pulls: list[list[str]] = []

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls.append(sorted(ids))
        if not self.answers:
            return []
        answer = self.answers.pop(0)
        return [] if answer is None else [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=answer))]


def _grid(answers: list[str | None]) -> tuple[FastPollGrid, FakeGrid]:
    inner = FakeGrid(answers)
    return FastPollGrid(inner, interval=0.0), inner  # type: ignore[arg-type]


def test_pushes_before_any_reply_is_asked_for() -> None:
    grid, inner = _grid(["m0", "m1"])
    replies = grid.send_and_receive(["a", "b"], timeout=5)
    assert inner.pushed == ["a", "b"] and inner.pulls == []
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1"]


def test_yields_each_reply_before_pulling_the_next() -> None:
    grid, inner = _grid(["m1", None, "m0"])
    replies = iter(grid.send_and_receive(["a", "b"], timeout=5))
    first = next(replies)
    assert first.metadata.reply_to_message_id == "m1" and len(inner.pulls) == 1
    assert next(replies).metadata.reply_to_message_id == "m0"
    assert inner.pulls == [["m0", "m1"], ["m0"], ["m0"]]  # only what is still pending
    assert list(replies) == []


def test_stray_and_duplicate_replies_are_dropped() -> None:
    grid, _ = _grid(["m0", "m0", "x9", "m1"])
    got = [r.metadata.reply_to_message_id for r in grid.send_and_receive(["a", "b"], timeout=5)]
    assert got == ["m0", "m1"]


def test_deadline_counts_from_the_push() -> None:
    grid, inner = _grid([None] * 1000)
    replies = grid.send_and_receive(["a"], timeout=0.0)
    assert list(replies) == [] and inner.pulls == []


def _reply(src: int, reply_to: str, error: bool) -> Any:
    from flwr.app import Error, Message, Metadata, RecordDict

    meta = Metadata(run_id=1, message_id=f"r-{reply_to}", src_node_id=src, dst_node_id=0,
                    reply_to_message_id=reply_to, group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    return Message(Error(code=0, reason="Node Unavailable"), metadata=meta) if error else \
        Message(RecordDict(), metadata=meta)


def test_the_superlinks_error_reply_for_an_unreachable_node_is_that_nodes() -> None:
    """A crashed or partitioned node: the SuperLink answers with an error from itself
    (node 1); the round must see it as the unreachable site's reply, not as 'node-1'."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    sent = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 22, 33)]

    class Replies(FakeGrid):
        def pull_messages(self, ids: Iterable[str]) -> list[Any]:
            return [_reply(SUPERLINK_NODE_ID, "m0", error=True),  # node 11 unreachable
                    _reply(SUPERLINK_NODE_ID, "m1", error=False),  # not an error: untouched
                    _reply(33, "m2", error=True)]  # a node's own error keeps its sender

    grid = FastPollGrid(Replies([]), interval=0.0)  # type: ignore[arg-type]
    got = {r.metadata.reply_to_message_id: r.metadata.src_node_id
           for r in grid.send_and_receive(sent, timeout=5)}
    assert got == {"m0": 11, "m1": SUPERLINK_NODE_ID, "m2": 33}
