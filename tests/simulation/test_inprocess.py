"""The in-process Grid: threads, streaming, progress, and sites in a separate process."""

from __future__ import annotations

import os
from functools import partial

from flwr.app import ConfigRecord, RecordDict

from cleanroom.simulations.inprocess import InProcessGrid
from tests.simulation import apps

NODES = {1000 + i: {"partition-id": i} for i in range(12)}


def _messages(grid: InProcessGrid, fail: int | None = None) -> list:
    return [grid.create_message(RecordDict({"config": ConfigRecord({"fail": nid == fail})}),
                                "query", nid, "1") for nid in NODES]


def test_threads_overlap_sites_and_keep_the_reply_order() -> None:
    apps.RUNNING["most"] = 0
    seen = []
    app = apps.echo_app(delay=0.05)
    grid = InProcessGrid.build(lambda _nid: app, NODES, workers=4,
                               on_reply=lambda r, done, total: seen.append((done, total)))
    try:
        replies = list(grid.send_and_receive(_messages(grid, fail=1003)))
    finally:
        grid.close()
    assert [r.metadata.src_node_id for r in replies] == list(NODES)  # request order
    assert 1 < apps.RUNNING["most"] <= 4
    assert seen == [(i, len(NODES)) for i in range(1, len(NODES) + 1)]
    failed = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in failed] == [1003]
    assert "asked to fail" in failed[0].error.reason
    assert grid.bytes_down > 0 and grid.bytes_up > 0


def test_stream_holds_at_most_workers_unconsumed_replies() -> None:
    app = apps.echo_app()
    grid = InProcessGrid.build(lambda _nid: app, NODES, workers=3)
    delivered = []
    original = grid._deliver
    grid._deliver = lambda msg: delivered.append(msg) or original(msg)  # type: ignore[method-assign]
    try:
        stream = grid.stream(_messages(grid))
        first = next(stream)
        assert len(delivered) <= 3  # nothing runs ahead of the consumer
        rest = list(stream)
    finally:
        grid.close()
    assert {r.metadata.src_node_id for r in [first, *rest]} == set(NODES)


def test_sites_in_a_separate_process() -> None:
    grid = InProcessGrid.in_subprocess(partial(apps.echo_app), NODES, run_id=3)
    try:
        replies = list(grid.send_and_receive(_messages(grid, fail=1005)))
    finally:
        grid.close()
    ok = [r for r in replies if not r.has_error()]
    assert len(ok) == len(NODES) - 1
    pids = {int(r.content.metric_records["m"]["pid"]) for r in ok}
    assert pids and os.getpid() not in pids  # served by another process
    assert [int(r.content.metric_records["m"]["partition"]) for r in ok] == \
        [cfg["partition-id"] for nid, cfg in NODES.items() if nid != 1005]
    assert "asked to fail" in next(r for r in replies if r.has_error()).error.reason
    assert grid.host is not None and grid.host.peak_rss_bytes > 0
