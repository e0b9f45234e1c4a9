"""Watches the ranks from the API's event loop: their outputs and their liveness.

- ``loop.add_reader`` on each rank's output pipe: ``BatchOutput``s are decoded and
  each ``ReqOutput`` delivered to its request (``InFlight``).
- ``loop.add_reader`` on each rank's process sentinel: it becomes readable the moment
  the process exits, however it died.
- a task every ``MONITOR_INTERVAL_S`` re-checks both and looks for stalled ranks.

It also matches each rank's ``FlushCacheResult`` to the ``/flush_cache`` call waiting for
it (``expect_flush``): a rank answers its ``FlushCacheReq``s in the order it received them,
so each rank keeps a FIFO of waiting futures and an answer resolves the oldest. A waiter
that gave up (timed out) stays in the FIFO until its late answer pops it, so later
answers still meet their own callers. A lost rank fails its waiters at once.

A rank whose process exits, whose output pipe reaches EOF or that sends ``RankError``
is *lost*: every request in flight on it fails at once (so a client learns within
well under 2 s), it is never sent anything again, an alive-but-lost rank is
killed (ranks ignore SIGTERM: ``server.ranks``), and once its process has exited its board
row is set DEAD so no dispatcher picks it. A rank whose heartbeat is older than the
stale bound fails its in-flight requests too (they might never end) and is asked to
abort them, but is kept: the dispatcher skips it while stale and picks it again if
its heartbeat comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec

from scheduler.messages import (BatchOutput, FlushCacheResult, PrefixCopyStats, RankError,
                                RankStats, decode_to_server)
from scheduler.roles import rank_name
from server.errors import ServiceUnavailable
from server.inflight import InFlight, RequestHandle
from server.rank_pipe import FrameReader
from server.ranks import EngineProcesses, RankHandle

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.25


class RankMonitor:
    def __init__(self, processes: EngineProcesses, inflight: InFlight, stale_ns: int,
                 abort: Callable[[RequestHandle, str], None]):
        self.processes = processes
        self.ranks: list[RankHandle] = processes.ranks
        self.inflight = inflight
        self.stale_ns = stale_ns
        self.abort = abort  # asks a rank to free a request (the engine client's)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._readers: dict[int, FrameReader] = {}
        self._flushes: dict[int, deque[asyncio.Future]] = {r.dp_rank: deque() for r in self.ranks}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for rank in self.ranks:
            self._readers[rank.dp_rank] = FrameReader(rank.out_conn)
            loop.add_reader(rank.out_conn.fileno(), self._on_readable, rank)
            loop.add_reader(rank.process.sentinel, self._on_process_exit, rank)
        self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for rank in self.ranks:
            self._stop_watching(rank)
        self._loop = None

    def expect_flush(self, dp_rank: int) -> asyncio.Future:
        """A future for the answer to the ``FlushCacheReq`` just sent to ``dp_rank``:
        its ``FlushCacheResult``, or ``ServiceUnavailable`` if the rank is lost first.
        Call it right after the send, from the loop (no answer can arrive in between)."""
        waiter = asyncio.get_running_loop().create_future()
        self._flushes[dp_rank].append(waiter)
        return waiter

    def rank_lost(self, rank: RankHandle, reason: str) -> None:
        if rank.lost_reason is None:
            rank.lost_reason = reason
            rank.lost_at = time.monotonic()
            logger.error("%s lost: %s; its requests fail, the others keep serving",
                         rank_name(self.processes.role, rank.dp_rank), reason)
            message = f"{rank_name(self.processes.role, rank.dp_rank)} failed: {reason}"
            self.inflight.fail_rank(rank.dp_rank, message)
            self._fail_flushes(rank, message)
        if rank.process.is_alive():
            # Nobody listens to it any more, so stop it (it ignores SIGTERM: server.ranks);
            # its exit then marks it DEAD.
            rank.process.kill()
        else:
            self._stop_watching(rank)
            self.processes.mark_dead(rank)

    # ---- event-loop callbacks -----------------------------------------------------------
    def _on_readable(self, rank: RankHandle) -> None:
        if not self._drain(rank):
            self._on_rank_gone(rank)

    def _drain(self, rank: RankHandle) -> bool:
        """Handle what the rank's output pipe holds; False once it reaches EOF."""
        reader = self._readers.get(rank.dp_rank)
        if reader is None:
            return False
        frames, eof = reader.read()
        for data in frames:
            try:
                msg = decode_to_server(data)
            except msgspec.DecodeError as exc:
                logger.error("rank %d sent an undecodable message: %s", rank.dp_rank, exc)
                continue
            self._on_message(rank, msg)
        return not eof

    def _on_message(self, rank: RankHandle, msg) -> None:
        if isinstance(msg, BatchOutput):
            now = time.monotonic()
            for out in msg.outputs:
                self.inflight.deliver(rank.dp_rank, out, now)
        elif isinstance(msg, RankStats):
            rank.stats.add(msg)
        elif isinstance(msg, PrefixCopyStats):
            rank.stats.copies = msg
        elif isinstance(msg, FlushCacheResult):
            self._on_flush_result(rank, msg)
        elif isinstance(msg, RankError):
            logger.error("rank %d reported a fatal error: %s", rank.dp_rank, msg.message)
            self.rank_lost(rank, msg.message.splitlines()[0] if msg.message else "fatal error")

    def _on_flush_result(self, rank: RankHandle, msg: FlushCacheResult) -> None:
        waiters = self._flushes[rank.dp_rank]
        if not waiters:
            logger.warning("rank %d answered a cache flush nobody asked for", rank.dp_rank)
            return
        if not msg.success:
            logger.warning("%s rank %d did not flush its prefix cache: %s",
                           self.processes.role, rank.dp_rank, msg.message)
        waiter = waiters.popleft()
        if not waiter.done():  # else its caller gave up waiting
            waiter.set_result(msg)

    def _fail_flushes(self, rank: RankHandle, message: str) -> None:
        waiters = self._flushes[rank.dp_rank]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ServiceUnavailable(message))

    def _on_process_exit(self, rank: RankHandle) -> None:
        if rank.lost_reason is None:
            self._drain(rank)  # its last outputs, and a RankError saying why
        self._on_rank_gone(rank)

    def _on_rank_gone(self, rank: RankHandle) -> None:
        rank.process.join(0.1)  # the pipe closes a moment before the exit status exists
        code = rank.process.exitcode
        self.rank_lost(rank, "its output pipe closed" if code is None
                       else f"its process exited with code {code}")

    def _stop_watching(self, rank: RankHandle) -> None:
        if self._loop is None:
            return
        for fd_of in (rank.out_conn.fileno, lambda: rank.process.sentinel):
            try:
                self._loop.remove_reader(fd_of())
            except (OSError, ValueError):
                pass  # already closed

    # ---- periodic backstop ------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for rank in self.ranks:
                if rank.lost_reason is None and not rank.process.is_alive():
                    self._on_process_exit(rank)
                elif rank.lost_reason is not None and not rank.is_marked_dead:
                    self.rank_lost(rank, rank.lost_reason)  # terminate/kill, then mark
            self._fail_stalled()

    def _fail_stalled(self) -> None:
        snap = self.processes.board.snapshot()
        oldest = time.monotonic_ns() - self.stale_ns
        for rank in self.ranks:
            if rank.lost_reason is None and snap.heartbeat_ns[rank.dp_rank] < oldest:
                message = (f"{rank_name(self.processes.role, rank.dp_rank)} stopped "
                           f"responding (no heartbeat for {self.stale_ns / 1e9:.1f} s)")
                for handle in self.inflight.fail_rank(rank.dp_rank, message):
                    self.abort(handle, "rank stalled")
