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
