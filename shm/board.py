"""The load board: every rank's load in one shared-memory array, read lock-free.

The cells, their offsets and the writer of each are drawn in ``shm.board_layout``.

The effective load a dispatcher uses for rank r is::

    effective(r) = base(r) + sum over d of dispatched[d][r]
                 = reported(r) + sum over d of (dispatched[d][r] - acked[d][r])

(tokens and prefill tokens both add ``dispatched_tokens``: a request in flight is
all prompt, none of it prefilled yet.)

A dispatcher bumps ``dispatched`` *before* it sends the request; the scheduler bumps
``acked`` in the same seqlocked publish that starts counting the request in its
reported load. A reader reads the rows first and the dispatched cells after, so it
never sees an ack without its dispatch: every request is counted exactly once.

Two read paths, nothing else reads the cells:

- ``read_rows``, the seqlocked row read: a copy of every row's leading cells, taken
  while no row was mid-write and no seq changed (but for abandoned rows, below, read as
  they stand). ``read_loads`` (the token methods' picks) and ``snapshot`` (/get_load,
  metrics) are built on it.
- ``read_requests``, the single-cell read: one ``base_reqs`` cell per row plus the
  dispatched requests, no seqlock (``total_requests``'s picks, the queue check).

Liveness (status and heartbeat) is read by ``self.liveness`` (``shm.board_liveness``).

What ``num_tokens`` means, with a prefix cache on the rank (``scheduler.radix_cache``):
the tokens the rank must hold or compute for the requests it has. That is the KV of
running requests (a cached prefix several of them read counted once) plus the prompt
tokens not computed yet. Cached tokens that no request reads are evictable at any time
and are not load: a rank whose pool is full of such entries reads as idle.

Seqlock: the writer stores ``-(seq+1)`` (negative: "writing"), the fields, then
``seq+2``; a reader reads every seq, copies the rows, reads every seq again, and
retries while some row's seq was negative or changed. Negative
rather than the textbook odd value so that "is any row mid-write" is one ``argmin``.
A writer killed mid-publish leaves its row negative for good, and one stopped there
(SIGSTOP, a debugger) for as long as it stays stopped: a reader that waited on such a
row would hang its process (an API process's event loop, so every route and even its
SIGTERM). So a row whose writer's process is gone (the row's ``pid``), or that has
stayed mid-write at one seq for ``STUCK_NS``, is *abandoned*: readers take it as it
stands, torn or not (its rank is dead or frozen, which liveness tells the dispatchers;
a frozen writer that resumes rewrites it whole), and keep the seqlock for every other
row. Each reader remembers the rows it found abandoned, so it waits once per stuck
row, not once per read.
Pure Python gives no fences, so this is correct only where the hardware keeps stores
in order and loads in order (x86-64's TSO). ``LoadBoard`` refuses to open elsewhere
unless ``DPSERVE_ALLOW_WEAK_MEMORY=1``, in which case reads may rarely be torn (and
are still bounded and self-healing, since every value is rewritten after each batch).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from os import sched_yield
from typing import NamedTuple

import numpy as np

from shm.board_layout import (ACKED, BASE_PREFILL, BASE_REQS, BASE_TOKENS, H_DISP_OFF, H_MAGIC,
                              H_NUM_DISP, H_NUM_RANKS, H_ROW_LEN, H_VERSION, HEADER_LEN,
                              HEARTBEAT_COL, LAYOUT_VERSION, LOAD_COLS, MAGIC, MAX_DISPATCHERS,
                              MAX_RANKS, MAX_RUNNING, MAX_TOTAL_TOKENS, NUM_KV, NUM_PREFILL,
                              NUM_REQS, NUM_TOKENS, NUM_WAITING, PID, SEQ, STATUS_COL,
                              BoardLayout, RankStatus)
from shm.board_liveness import Liveness
from shm.segment import SharedSegment, ShmLayoutError, pid_alive, segment_name

__all__ = ["LoadBoard", "BoardSnapshot", "Loads", "RankStatus", "check_memory_order"]

STRONG_ORDER_MACHINES = {"x86_64", "amd64", "i386", "i686"}
# A live writer's publish takes microseconds; preempted, a scheduler time slice or a few.
# A row mid-write this long at one seq has a stopped writer (module docstring).
STUCK_NS = 50_000_000


def check_memory_order() -> None:
    """Refuse weakly ordered CPUs: the plain-Python seqlock relies on x86 TSO."""
    machine = platform.machine().lower()
    if machine in STRONG_ORDER_MACHINES or os.environ.get("DPSERVE_ALLOW_WEAK_MEMORY") == "1":
        return
    raise RuntimeError(
        f"the load board's seqlock needs x86-64 store/load ordering; this CPU is {machine}. "
        "Set DPSERVE_ALLOW_WEAK_MEMORY=1 to run anyway (rare torn reads are possible)."
    )


class Loads(NamedTuple):
    """Every rank's effective load, one list entry per rank (``read_loads``)."""

    reqs: list[int]
    tokens: list[int]
    prefill_tokens: list[int]


@dataclass(frozen=True)
class BoardSnapshot:
    """A consistent copy of every rank row plus the dispatched counters (all numpy)."""

    num_reqs: np.ndarray
    num_waiting_reqs: np.ndarray
    num_tokens: np.ndarray
    num_prefill_tokens: np.ndarray  # prompt tokens not prefilled yet
    num_kv_tokens: np.ndarray  # KV slots held for requests (memory, not load)
    max_total_num_tokens: np.ndarray
    max_running_requests: np.ndarray
    heartbeat_ns: np.ndarray
    status: np.ndarray
    pid: np.ndarray
    acked_reqs: np.ndarray  # [rank, dispatcher]
    acked_tokens: np.ndarray  # [rank, dispatcher]
    dispatched_reqs: np.ndarray  # [dispatcher, rank]
    dispatched_tokens: np.ndarray  # [dispatcher, rank]
    seq: np.ndarray  # each row's seqlock count: every publish adds 2

    @property
    def effective_reqs(self) -> np.ndarray:
        return self.num_reqs + self.in_flight_reqs

    @property
    def effective_tokens(self) -> np.ndarray:
        return self.num_tokens + self.in_flight_tokens

    @property
    def effective_prefill_tokens(self) -> np.ndarray:
        return self.num_prefill_tokens + self.in_flight_tokens  # in flight: all prompt

    @property
    def in_flight_tokens(self) -> np.ndarray:
        """Tokens of the requests dispatched to each rank that it has not acknowledged."""
        return (self.dispatched_tokens.T - self.acked_tokens).sum(axis=1)

    @property
    def in_flight_reqs(self) -> np.ndarray:
        """Requests dispatched to each rank that it has not acknowledged yet."""
        return (self.dispatched_reqs.T - self.acked_reqs).sum(axis=1)


class LoadBoard:
    """A mapped load board. Use ``create`` (owner, unlinks) or ``attach`` (never unlinks).

    Processes obtain single-writer handles from it: ``rank_writer(r)`` in the scheduler
    of rank r, ``dispatcher_writer(d)`` in dispatcher d; they write through ``cells``
    at the offsets of ``layout``.
    """

    def __init__(self, segment: SharedSegment, layout: BoardLayout):
        self.segment = segment
        self.layout = layout
        self.name = segment.name
        self.num_ranks = n = layout.num_ranks
        self.num_dispatchers = d = layout.num_dispatchers
        # The writers' view: one int64 per cell, released by close (later use raises).
        self.cells = memoryview(segment.buf).cast("q")
        arr = np.frombuffer(segment.buf, dtype=np.int64, count=layout.num_cells)
        self._rows = arr[HEADER_LEN:layout.live_off].reshape(n, layout.row_len)
        self._seqs = self._rows[:, SEQ]
        live = arr[layout.live_off:layout.disp_off].reshape(2, layout.live_col_len)
        self._heartbeats, self._statuses = live[HEARTBEAT_COL, :n], live[STATUS_COL, :n]
        self._disp = arr[layout.disp_off:].reshape(d, layout.disp_len)[:, : 2 * n].reshape(d, 2, n)
        self._base_reqs = self._rows[:, BASE_REQS]
        self._disp_reqs = [self._disp[i, 0] for i in range(d)]
        # Rows this reader found mid-write: rank -> (the negative seq, first seen at ns,
        # abandoned). See read_rows.
        self._stuck: dict[int, tuple[int, int, bool]] = {}
        # Each reader's (process's) cached liveness answer; see shm.board_liveness.
        self.liveness = Liveness(segment.buf, n, layout.heartbeat_cell(0), layout.status_cell(0),
                                 int(RankStatus.READY))

    # ---- lifetime -------------------------------------------------------------------
    @classmethod
    def create(cls, num_ranks: int, num_dispatchers: int = 1, launch_id: str = "board",
               kind: str = "board") -> "LoadBoard":
        check_memory_order()
        if not 1 <= num_ranks <= MAX_RANKS:
            raise ValueError(f"num_ranks must be in [1, {MAX_RANKS}], got {num_ranks}")
        if not 1 <= num_dispatchers <= MAX_DISPATCHERS:
            raise ValueError(
                f"num_dispatchers must be in [1, {MAX_DISPATCHERS}], got {num_dispatchers}")
        layout = BoardLayout(num_ranks, num_dispatchers)
        seg = SharedSegment.create(segment_name(kind, launch_id), layout.num_cells * 8)
        header = np.frombuffer(seg.buf, dtype=np.int64, count=HEADER_LEN)
        header[:] = layout.header(os.getpid())
        del header
        return cls(seg, layout)

    @classmethod
    def attach(cls, name: str) -> "LoadBoard":
        check_memory_order()
        seg = SharedSegment.attach(name)
        header = np.frombuffer(seg.buf, dtype=np.int64, count=HEADER_LEN).copy()
        if header[H_MAGIC] != MAGIC or header[H_VERSION] != LAYOUT_VERSION:
            seg.close()
            raise ShmLayoutError(f"{name} is not a load board of layout version {LAYOUT_VERSION}")
        layout = BoardLayout(int(header[H_NUM_RANKS]), int(header[H_NUM_DISP]))
        if (layout.row_len, layout.disp_off) != (header[H_ROW_LEN], header[H_DISP_OFF]):
            seg.close()
            raise ShmLayoutError(f"{name}: header disagrees with layout {layout}")
        return cls(seg, layout)

    def close(self) -> None:
        """Drop every view, then unmap (and unlink if this process created it)."""
        self.cells.release()
        del self._rows, self._seqs, self._disp, self._heartbeats, self._statuses
        del self._base_reqs, self._disp_reqs
        self.segment.__exit__(None, None, None) if self.segment.is_owner else self.segment.close()

    def __enter__(self) -> "LoadBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- single-writer handles --------------------------------------------------------
    def rank_writer(self, rank: int) -> "RankWriter":
        from shm.board_writers import RankWriter
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} out of range [0, {self.num_ranks})")
        return RankWriter(self, rank)

    def dispatcher_writer(self, dispatcher: int) -> "DispatcherWriter":
        from shm.board_writers import DispatcherWriter
        if not 0 <= dispatcher < self.num_dispatchers:
            raise ValueError(f"dispatcher {dispatcher} out of range [0, {self.num_dispatchers})")
        return DispatcherWriter(self, dispatcher)

    # ---- the seqlocked row read ---------------------------------------------------------
    def read_rows(self, num_cols: int) -> np.ndarray:
        """A copy of every row's first ``num_cols`` cells ([rank, column], seq first),
        taken while no row was mid-write and no row's seq changed across the copy; an
        abandoned row (its writer gone, or stopped mid-write for ``STUCK_NS``: module
        docstring) is copied as it stands, possibly torn.

        The seqs are read on their own before the copy and again after it. The copy's
        own seq cells cannot serve as the first read: numpy copies a block with
        ``memcpy``, whose loads do not go in address order (glibc's vector copy loads
        the block's tail first), so a row's fields could be loaded before its seq and
        a publish landing in between would pass the check, torn.
        """
        rows, seqs = self._rows, self._seqs
        tries = 0
        while True:
            before = seqs.copy()
            copy = rows[:, :num_cols].copy()
            if before[before.argmin()] >= 0 and before.tobytes() == seqs.tobytes():
                return copy
            if self._stuck and self._only_abandoned(before, seqs):
                return copy  # every row mid-write is abandoned (module docstring)
            tries += 1
            if tries & 7 == 0:
                # A writer preempted mid-publish holds its row negative until it runs
                # again: give up the core rather than spin through its time slice.
                sched_yield()
                self._note_stuck(before)

    def _note_stuck(self, seqs: np.ndarray) -> None:
        """Note when each row mid-write in ``seqs`` was first seen at its seq, and mark
        it abandoned once its writer is gone or ``STUCK_NS`` has passed."""
        now = time.monotonic_ns()
        stuck = {}
        for rank in np.flatnonzero(seqs < 0).tolist():
            seq = int(seqs[rank])
            was = self._stuck.get(rank)
            seen = was[1] if was is not None and was[0] == seq else now
            abandoned = now - seen >= STUCK_NS
            if not abandoned:
                pid = int(self._rows[rank, PID])
                abandoned = pid > 0 and not pid_alive(pid)
            stuck[rank] = (seq, seen, abandoned)
        self._stuck = stuck

    def _only_abandoned(self, before: np.ndarray, seqs: np.ndarray) -> bool:
        """Whether the read that gave ``before`` is good but for abandoned rows: every
        row mid-write is one still at the seq it was abandoned at, and every other row's
        seq was unchanged across the copy."""
        after = seqs.copy()
        for rank in np.flatnonzero(before < 0).tolist():
            was = self._stuck.get(rank)
            if was is None or not was[2] or was[0] != before[rank] or after[rank] != before[rank]:
                return False
        return before.tobytes() == after.tobytes()

    def read_loads(self) -> Loads:
        """Every rank's effective requests, tokens and prefill tokens: the base columns
        under the seqlock, then (after them) every dispatcher's counters."""
        rows = self.read_rows(LOAD_COLS)
        disp = self._disp[0] if self.num_dispatchers == 1 else self._disp.sum(axis=0)
        return Loads((rows[:, BASE_REQS] + disp[0]).tolist(),
                     (rows[:, BASE_TOKENS] + disp[1]).tolist(),
                     (rows[:, BASE_PREFILL] + disp[1]).tolist())

    def snapshot(self) -> BoardSnapshot:
        """Every row (under the seqlock), then the dispatched counters and liveness."""
        rows = self.read_rows(self.layout.row_len)
        disp = self._disp.copy()  # after the rows: acked never exceeds dispatched
        d = self.num_dispatchers
        return BoardSnapshot(
            num_reqs=rows[:, NUM_REQS], num_waiting_reqs=rows[:, NUM_WAITING],
            num_tokens=rows[:, NUM_TOKENS], num_prefill_tokens=rows[:, NUM_PREFILL],
            num_kv_tokens=rows[:, NUM_KV],
            max_total_num_tokens=rows[:, MAX_TOTAL_TOKENS],
            max_running_requests=rows[:, MAX_RUNNING], heartbeat_ns=self._heartbeats.copy(),
            status=self._statuses.copy(), pid=rows[:, PID],
            acked_reqs=rows[:, ACKED:ACKED + d], acked_tokens=rows[:, ACKED + d:ACKED + 2 * d],
            dispatched_reqs=disp[:, 0, :], dispatched_tokens=disp[:, 1, :], seq=rows[:, SEQ],
        )

    # ---- the single-cell read ----------------------------------------------------------
    def read_requests(self) -> list[int]:
        """Every rank's effective requests, without the seqlock.

        Every value used is ONE cell with one writer (``base_reqs`` already nets the
        rank's acks out of its count), and an aligned 8-byte load is atomic on the CPUs
        ``check_memory_order`` admits, so each read is a value some publish wrote: the
        seqlock is for values that must agree across cells, which this read never
        combines.
        """
        disp = self._disp_reqs
        if len(disp) == 1:
            return (self._base_reqs + disp[0]).tolist()
        eff = self._base_reqs.copy()  # the rows first: acks before dispatches
        for counts in disp:
            eff += counts
        return eff.tolist()
