"""Hostile daemon markers (``state/daemon.json``): what a restart's take-over reads must never
make it stop processes that are not its predecessor's, write its marker elsewhere, or hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom.process import TAG_VAR, DaemonError, Supervisor


@pytest.fixture()
def tagged() -> Iterator[subprocess.Popen[bytes]]:
    """A live process carrying the tag 'not-yours' (another daemon's child)."""
    env = {**os.environ, TAG_VAR: "not-yours"}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                            start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def take_over(marker: Path) -> list[int]:
    return Supervisor(marker.parent / "logs").take_over(marker, "the test daemon")


def test_a_symlinked_marker_is_refused_and_neither_followed_nor_written_through(tmp_path,
                                                                                tagged):
    """daemon.json -> another daemon's marker: following it would stop that daemon's
    children (the marker records its own path, which the link resolves to) and the write
    would replace the other daemon's record with ours."""
    other = tmp_path / "other" / "daemon.json"
    other.parent.mkdir()
    recorded = json.dumps({"pid": 1 << 30, "started": "1", "tag": "not-yours",
                           "marker": str(other.resolve())})
    other.write_text(recorded)
    marker = tmp_path / "state" / "daemon.json"
    marker.parent.mkdir()
    marker.symlink_to(other)
    with pytest.raises(DaemonError, match="is a symlink"):
        take_over(marker)
    assert tagged.poll() is None
    assert other.read_text() == recorded and marker.is_symlink()
    dangling = tmp_path / "dangling" / "daemon.json"  # a link to where a file would be made
    dangling.parent.mkdir()
    dangling.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(DaemonError, match="is a symlink"):
        take_over(dangling)
    assert not (tmp_path / "elsewhere.json").exists()


def test_a_fifo_or_folder_marker_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo" / "daemon.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            take_over(fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("take_over blocked on a FIFO marker")
    assert isinstance(outcome[0], DaemonError) and "not a regular file" in str(outcome[0])
    folder = tmp_path / "dir" / "daemon.json"
    folder.mkdir(parents=True)
    with pytest.raises(DaemonError, match="not a regular file"):
        take_over(folder)


@pytest.mark.parametrize("content", [
    b"\xff\xfe not utf-8", b"[1, 2]", b'"a string"', b"null", b"",
    json.dumps({"pid": True, "started": None, "tag": 5}).encode(),
    json.dumps({"pid": -1, "started": [], "tag": ""}).encode(),
    json.dumps({"pid": "1", "tag": ["not-yours"]}).encode(),
])
def test_a_marker_of_the_wrong_shape_stops_nothing_and_is_replaced(tmp_path, tagged, content):
    marker = tmp_path / "daemon.json"
    marker.write_bytes(content)
    assert take_over(marker) == []
    assert tagged.poll() is None
    assert json.loads(marker.read_text())["pid"] == os.getpid()


def test_a_huge_marker_is_not_read_whole(tmp_path, tagged):
    """Only the first 64 KiB are read: a padded marker naming a tag is ignored, not parsed."""
    from cleanroom.process import MARKER_MAX

    marker = tmp_path / "daemon.json"
    marker.write_text(json.dumps({"pid": 1 << 30, "started": "1", "tag": "not-yours",
                                  "pad": "x" * MARKER_MAX}))
    assert take_over(marker) == []
    assert tagged.poll() is None
    assert json.loads(marker.read_text())["pid"] == os.getpid()


def test_the_tag_this_daemon_inherited_is_never_swept(tmp_path, tagged, monkeypatch):
    """A daemon started by a supervisor (deploy-local, a test harness) carries that
    supervisor's tag, as do its siblings; a marker recording it (forged, or written by a
    tool that copied its own environment) must not make the daemon stop its siblings."""
    monkeypatch.setenv(TAG_VAR, "not-yours")
    marker = tmp_path / "daemon.json"
    marker.write_text(json.dumps({"pid": 1 << 30, "started": "1", "tag": "not-yours"}))
    assert take_over(marker) == []
    assert tagged.poll() is None


def test_the_marker_is_replaced_whole(tmp_path):
    """Written to a temporary file and renamed: a crash mid-write leaves the old record or
    the new, never a torn one that would hide the predecessor's tag."""
    marker = tmp_path / "daemon.json"
    marker.write_text("{}")
    inode = marker.stat().st_ino
    sup = Supervisor(tmp_path / "logs")
    sup.take_over(marker, "the test daemon")
    assert marker.stat().st_ino != inode
    assert json.loads(marker.read_text())["tag"] == sup.tag
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
