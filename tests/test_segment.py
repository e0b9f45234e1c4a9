"""Segment ownership, space checks and reclamation of crashed runs' segments."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

from shm.board import LoadBoard
from shm.segment import (NAME_PREFIX, ShmError, ShmOwnerError, ShmSpaceError, SharedSegment,
                         find_segment, list_segments, new_launch_id, segment_name)


def test_creator_unlinks_attacher_does_not():
    name = segment_name("t", new_launch_id())
    with SharedSegment.create(name, 4096) as owner:
        owner.buf[0:3] = b"abc"
        other = SharedSegment.attach(name)
        assert bytes(other.buf[0:3]) == b"abc"
        with pytest.raises(ShmError):
            other.unlink()
        other.close()
        assert name in list_segments()
    assert name not in list_segments()


def test_attach_missing_segment_is_a_named_error():
    with pytest.raises(ShmError, match="does not exist"):
        SharedSegment.attach(segment_name("missing", new_launch_id()))


def test_oversized_segment_fails_cleanly_not_with_sigbus():
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    name = segment_name("huge", new_launch_id())
    with pytest.raises(ShmSpaceError, match="shm.cleanup"):
        SharedSegment.create(name, free + (1 << 30))
    assert name not in list_segments()


def test_board_views_keep_the_mapping_alive_until_closed():
    board = LoadBoard.create(2, 1, launch_id=new_launch_id())
    name = board.name
    snap = board.snapshot()
    board.close()
    # The snapshot is a copy: reading it after close must not touch the unmapped segment.
    assert int(snap.num_reqs.sum()) == 0
    assert name not in list_segments()


def _create_and_hang(launch_id: str, ready) -> None:
    LoadBoard.create(4, 1, launch_id=launch_id)
    ready.set()
    signal.pause()


def test_segments_of_a_sigkilled_creator_are_reclaimed_by_cleanup():
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    launch_id = new_launch_id()
    child = ctx.Process(target=_create_and_hang, args=(launch_id, ready), daemon=True)
    child.start()
    try:
        assert ready.wait(30), "child never created its board"
        name = segment_name("board", launch_id, pid=child.pid)
        assert name in list_segments()
        # A live creator's segment is never reclaimed.
        out = subprocess.run([sys.executable, "-m", "shm.cleanup"], capture_output=True, text=True, timeout=60)
        assert name not in out.stdout and name in list_segments()
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert name in list_segments(), "SIGKILL leaves the segment behind"
        # --prefix finds them from a shell whose own namespace is another one.
        other = {**os.environ, "DPSERVE_SHM_PREFIX": "elsewhere"}
        for given in (NAME_PREFIX, NAME_PREFIX.rstrip(".")):
            out = subprocess.run([sys.executable, "-m", "shm.cleanup", "--dry-run", "--prefix",
                                  given], capture_output=True, text=True, timeout=60, env=other)
            assert f"would remove {name}" in out.stdout, (given, out.stdout, out.stderr)
        out = subprocess.run([sys.executable, "-m", "shm.cleanup"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"removed {name}" in out.stdout
        assert name not in list_segments()
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
        from shm.segment import reclaim_stale_segments
        reclaim_stale_segments()


def test_a_crashed_launchers_metrics_folder_is_reclaimed(tmp_path):
    """Several API processes keep their counters in ``dpserve-metrics.<launcher pid>.*``;
    a SIGKILLed launcher leaves it: removed once that pid is gone, never a live one's."""
    from shm.segment import METRICS_DIR_PREFIX, reclaim_stale_metrics_dirs

    dead = mp.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join()
    stale = tmp_path / f"{METRICS_DIR_PREFIX}{dead.pid}.abc"
    live = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}.def"
    other = tmp_path / f"{METRICS_DIR_PREFIX}notapid"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    assert reclaim_stale_metrics_dirs(str(tmp_path), dry_run=True) == [str(stale)]
    assert stale.exists()
    assert reclaim_stale_metrics_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_name_prefix_namespace_is_checked():
    from shm.segment import name_prefix
    assert name_prefix("dpserve") == "dpserve."
    assert name_prefix("my-run_2") == "my-run_2."
    for bad in ("", "a/b", "a.b", "ü"):
        with pytest.raises(ValueError, match="DPSERVE_SHM_PREFIX"):
            name_prefix(bad)


def _squat(name: str, mode: int, uid: int | None = None) -> str:
    """Create ``name`` in /dev/shm the way another user could: a plain file."""
    path = "/dev/shm" + name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
    try:
        os.fchmod(fd, mode)
        os.ftruncate(fd, 4096)
        if uid is not None:
            os.fchown(fd, uid, -1)
    finally:
        os.close(fd)
    return path


def test_segments_are_created_exclusively_with_mode_0600():
    name = segment_name("t", new_launch_id())
    old_umask = os.umask(0)  # a permissive umask must not widen the mode
    try:
        with SharedSegment.create(name, 4096):
            assert os.stat("/dev/shm" + name).st_mode & 0o777 == 0o600
            with pytest.raises(Exception):
                SharedSegment.create(name, 4096)  # never opens what exists
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("squatter", ["mode", "uid"])
def test_a_squatted_segment_is_refused_with_a_clear_error(squatter):
    """A name created first by someone else (another uid, or a mode other than 0600) is
    refused by attach and by find_segment, with a message that says what to do."""
    if squatter == "uid" and os.getuid() != 0:
        pytest.skip("chown to another uid needs root")
    launch_id = new_launch_id()
    name = segment_name("handoff", launch_id)  # this (live) pid: find_segment considers it
    path = _squat(name, 0o644, None) if squatter == "mode" else _squat(name, 0o600, 65534)
    try:
        with pytest.raises(ShmOwnerError, match="not created by a dpserve server of this user"):
            SharedSegment.attach(name)
        with pytest.raises(ShmOwnerError, match=f"Remove /dev/shm{name}"):
            find_segment("handoff", launch_id)
    finally:
        os.unlink(path)
    assert find_segment("handoff", launch_id) is None
