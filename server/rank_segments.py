"""The shared memory a rank leaves behind: reclaimed at start, retired at its death.

Every segment is named after the process that created it (``shm.segment``), so what a
rank leaves is found by its pid: a crashed run's segments are reclaimed at the next
start (``reclaim_stale``); a rank that dies while the server goes on has its board row
set DEAD, its prefix summary withdrawn and its KV segment unlinked at once
(``retire_dead_rank``), by whichever API process notices (each writes the same).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import posix_ipc

from shm.board import LoadBoard, RankStatus
from shm.prefix_summary import PrefixSummary
from shm.segment import (ShmError, list_segments, owner_pid, reclaim_stale_metrics_dirs,
                         reclaim_stale_segments)

if TYPE_CHECKING:
    from server.ranks import RankHandle

logger = logging.getLogger(__name__)


def reclaim_stale() -> None:
    """Unlink the segments crashed runs left (``shm.segment.reclaim_stale_segments``),
    saying which: run before a launch creates its own."""
    removed = reclaim_stale_segments()
    if removed:
        logger.info("reclaimed %d stale shared-memory segment(s): %s", len(removed), removed)
    removed = reclaim_stale_metrics_dirs()
    if removed:
        logger.info("removed %d crashed launcher's metrics folder(s): %s", len(removed), removed)


def retire_dead_rank(board: LoadBoard, summary: PrefixSummary | None, rank: RankHandle) -> None:
    """What a dead rank leaves to the API, once its process has exited (so none of its
    own writers can race these stores; each API process that notices writes the same):
    DEAD in its board row; its prefix summary withdrawn (its cache died with it), so
    peers neither copy from its pool nor count its hits; its segments (a PD or
    cross-rank KV pool) unlinked now, not at shutdown, and peers that mapped them unmap
    them when they next look (``shm.kv_segment.PeerSegments``)."""
    board.rank_writer(rank.dp_rank).set_status(RankStatus.DEAD)
    if summary is not None:
        try:
            summary.writer(rank.dp_rank).close()
        except ShmError:
            pass  # another API process is withdrawing it this moment
    unlink_segments_of({rank.process.pid})
    rank.is_marked_dead = True


def unlink_segments_of(pids: set[int]) -> None:
    """Unlink the segments created by ``pids`` (processes that exited)."""
    for name in list_segments():
        if owner_pid(name) in pids:
            try:
                posix_ipc.unlink_shared_memory(name)
                logger.info("unlinked %s, left by a stopped rank", name)
            except posix_ipc.ExistentialError:
                pass
