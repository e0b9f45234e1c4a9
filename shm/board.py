"""The load board: every rank's load in one shared-memory array, read lock-free.

One POSIX segment of int64 cells (native little-endian), laid out as::

    cell 0                                                         HEADER_LEN
    +-------+---------+-----------+-----------------+---------+----------+---------+-----------+
    | magic | version | num_ranks | num_dispatchers | row_len | disp_off | disp_len| owner_pid |
    +-------+---------+-----------+-----------------+---------+----------+---------+-----------+
    rank rows, rank r at HEADER_LEN + r * row_len (row_len rounded up to 8 cells = 64 B):
    +-----+----------+----------+-----------+----------+----------+----------+-----------+
    | seq | base_reqs| base_toks| base_pfill| num_reqs | num_wait | num_toks | num_pfill | ...
    +-----+----------+----------+-----------+----------+----------+----------+-----------+
      ... | max_tok | max_run | pid | acked_reqs[0..D) | acked_tokens[0..D) | pad |
    liveness block at live_off = HEADER_LEN + N * row_len, column-major (each column
    padded to a multiple of 8 cells; cell r of a column is rank r's):
    +------------------------+-----+--------------------+-----+
    | heartbeat_ns[0..N)     | pad | status[0..N)       | pad |
    +------------------------+-----+--------------------+-----+
    dispatcher blocks, dispatcher d at disp_off + d * disp_len:
    +---------------------------+-----------------------------+-----+
    | dispatched_reqs[0..N)     | dispatched_tokens[0..N)     | pad |
    +---------------------------+-----------------------------+-----+

Who writes what (exactly one writer per cell; ``+=`` on shared memory is not atomic):
- header: the creator, once, before anyone attaches.
- rank row r: the scheduler of rank r, through its ``RankWriter``, every cell but
  ``seq`` under the row's seqlock.
  ``base_reqs = num_reqs - sum(acked_reqs)``, ``base_toks = num_toks -
  sum(acked_tokens)`` and ``base_pfill = num_pfill - sum(acked_tokens)`` are derived
  by the writer so that a reader needs one cell per quantity, not 1 + 2D, to get the
  rank's load net of what it has already acknowledged. ``num_pfill`` is the prompt
  tokens the rank has yet to prefill (queued or mid-prefill): the work a new
  request's first token waits behind.
- ``heartbeat_ns[r]`` (CLOCK_MONOTONIC, shared by all processes on the node, so it
  only grows, also across a restart of the rank) and ``status[r]``: rank r's
  scheduler, as single-cell stores outside the seqlock; the launcher may set
  ``status`` to DEAD only after that scheduler has exited. They live in columns so
  that "is every rank READY" is one compare of ``8N`` bytes (``shm.board_liveness``).
- dispatcher block d: dispatcher d, through its ``DispatcherWriter``. The counters
  only grow, but for a ``cancel`` that takes back a request never sent (never acked).

The effective load a dispatcher uses for rank r is::

    effective(r) = base(r) + sum over d of dispatched[d][r]
                 = reported(r) + sum over d of (dispatched[d][r] - acked[d][r])

(tokens and prefill tokens both add ``dispatched_tokens``: a request in flight is
all prompt, none of it prefilled yet.)

A dispatcher bumps ``dispatched`` *before* it sends the request; the scheduler bumps
``acked`` in the same seqlocked publish that starts counting the request in its
reported load. A reader reads the row first and the dispatched cells after, so it
never sees an ack without its dispatch: every request is counted exactly once.

Seqlock: the writer stores ``-(seq+1)`` (negative: "writing"), the fields, then
``seq+2``; a reader retries a row whose seq was negative or changed. Negative rather
than the textbook odd value because one C-level ``min()`` over all rows' seqs tells
the hot path whether any row was mid-write, where an odd test costs a Python-level
loop (0.6 us of a 2 us budget at N=8 here). Pure Python gives no fences, so this is
correct only where the hardware keeps stores in order and loads in order (x86-64's
TSO). ``LoadBoard`` refuses to open elsewhere unless ``DPSERVE_ALLOW_WEAK_MEMORY=1``,
in which case reads may rarely be torn (and are still bounded and self-healing, since
every value is rewritten after each batch).
"""

from __future__ import annotations

import os
from os import sched_yield
import platform
import struct
from time import monotonic_ns
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from operator import add

import numpy as np

from shm.board_liveness import Liveness
from shm.segment import SharedSegment, ShmLayoutError, segment_name

MAGIC = 0x445053_424F415244  # "DPS" "BOARD"
LAYOUT_VERSION = 3
HEADER_LEN = 8
H_MAGIC, H_VERSION, H_NUM_RANKS, H_NUM_DISP, H_ROW_LEN, H_DISP_OFF, H_DISP_LEN, H_OWNER = range(8)

# Rank-row columns.
SEQ, BASE_REQS, BASE_TOKENS, BASE_PREFILL = range(4)
NUM_REQS, NUM_WAITING, NUM_TOKENS, NUM_PREFILL = range(4, 8)
MAX_TOTAL_TOKENS, MAX_RUNNING, PID = range(8, 11)
ACKED = 11  # acked_reqs[0..D) then acked_tokens[0..D)
# Liveness-block columns (cell offsets from live_off are column * round8(N) + rank).
HEARTBEAT_COL, STATUS_COL = 0, 1

STRONG_ORDER_MACHINES = {"x86_64", "amd64", "i386", "i686"}


class RankStatus(IntEnum):
    STARTING = 0
    READY = 1
    DRAINING = 2
    DEAD = 3


_READY = int(RankStatus.READY)  # a plain int: enum attribute access is slow on the hot path


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def check_memory_order() -> None:
    """Refuse weakly ordered CPUs: the plain-Python seqlock relies on x86 TSO."""
    machine = platform.machine().lower()
    if machine in STRONG_ORDER_MACHINES or os.environ.get("DPSERVE_ALLOW_WEAK_MEMORY") == "1":
        return
    raise RuntimeError(
        f"the load board's seqlock needs x86-64 store/load ordering; this CPU is {machine}. "
        "Set DPSERVE_ALLOW_WEAK_MEMORY=1 to run anyway (rare torn reads are possible)."
    )


@dataclass(frozen=True)
class BoardLayout:
    num_ranks: int
    num_dispatchers: int

    @property
    def row_len(self) -> int:
        return _round8(ACKED + 2 * self.num_dispatchers)

    @property
    def live_off(self) -> int:
        return HEADER_LEN + self.num_ranks * self.row_len

    @property
    def live_col_len(self) -> int:
        return _round8(self.num_ranks)

    def heartbeat_cell(self, rank: int) -> int:
        return self.live_off + HEARTBEAT_COL * self.live_col_len + rank

    def status_cell(self, rank: int) -> int:
        return self.live_off + STATUS_COL * self.live_col_len + rank

    @property
    def disp_off(self) -> int:
        return self.live_off + 2 * self.live_col_len

    @property
    def disp_len(self) -> int:
        return _round8(2 * self.num_ranks)

    @property
    def num_cells(self) -> int:
        return self.disp_off + self.num_dispatchers * self.disp_len

    def row(self, rank: int) -> int:
        return HEADER_LEN + rank * self.row_len


@dataclass(frozen=True)
class BoardSnapshot:
    """A consistent copy of every rank row plus the dispatched counters (all numpy)."""

    num_reqs: np.ndarray
    num_waiting_reqs: np.ndarray
    num_tokens: np.ndarray
    num_prefill_tokens: np.ndarray  # prompt tokens not prefilled yet
    max_total_num_tokens: np.ndarray
    max_running_requests: np.ndarray
    heartbeat_ns: np.ndarray
    status: np.ndarray
    pid: np.ndarray
    acked_reqs: np.ndarray  # [rank, dispatcher]
    acked_tokens: np.ndarray  # [rank, dispatcher]
    dispatched_reqs: np.ndarray  # [dispatcher, rank]
    dispatched_tokens: np.ndarray  # [dispatcher, rank]

    @property
    def effective_reqs(self) -> np.ndarray:
        return self.num_reqs + (self.dispatched_reqs.T - self.acked_reqs).sum(axis=1)

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
    of rank r, ``dispatcher_writer(d)`` in dispatcher d. Readers call ``snapshot()``
    (everything, for /get_load and metrics) or ``read_effective()`` (the hot path).
    """

    def __init__(self, segment: SharedSegment, layout: BoardLayout):
        self.segment = segment
        self.layout = layout
        self.name = segment.name
        self.num_ranks = layout.num_ranks
        self.num_dispatchers = layout.num_dispatchers
        self._cells = np.frombuffer(segment.buf, dtype=np.int64, count=layout.num_cells)
        self._mv = memoryview(segment.buf).cast("q")
        n, d = layout.num_ranks, layout.num_dispatchers
        self._rows = self._cells[HEADER_LEN:layout.live_off].reshape(n, layout.row_len)
        live = self._cells[layout.live_off:layout.disp_off].reshape(2, layout.live_col_len)
        self._heartbeats, self._statuses = live[HEARTBEAT_COL, :n], live[STATUS_COL, :n]
        self._disp = self._cells[layout.disp_off:].reshape(d, layout.disp_len)[:, : 2 * n].reshape(d, 2, n)
        self._base_reqs_np = self._rows[:, BASE_REQS]
        self._base_seq_np = self._rows[:, SEQ]
        self._disp_reqs_np = [self._disp[i, 0] for i in range(d)]
        # The seqlocked read: per row seq, base_reqs, base_toks (padding skipped); the
        # dispatcher blocks: per dispatcher its 2N counters.
        row_len = layout.row_len
        row_fmt = "qqq" + "x" * 8 * (row_len - 3)
        disp_fmt = "q" * (2 * n) + "x" * 8 * (layout.disp_len - 2 * n)
        self._seq_unpack = struct.Struct("<" + ("q" + "x" * 8 * (row_len - 1)) * n).unpack_from
        self._rows_unpack = struct.Struct("<" + row_fmt * n).unpack_from
        self._hot_off = HEADER_LEN * 8
        self._n3 = 3 * n
        # The same read with base_pfill too (the prefill_tokens method).
        self._rows4_unpack = struct.Struct("<" + ("qqqq" + "x" * 8 * (row_len - 4)) * n).unpack_from
        # The request-only read: one cell per row (base_reqs), no seq.
        req_fmt = "x" * 8 * BASE_REQS + "q" + "x" * 8 * (row_len - BASE_REQS - 1)
        self._req_unpack = struct.Struct("<" + req_fmt * n).unpack_from
        self._disp_unpack = struct.Struct("<" + disp_fmt * d).unpack_from
        self._disp_off_bytes = layout.disp_off * 8
        self._buf = segment.buf
        # Each reader's (process's) cached liveness answer; see shm.board_liveness.
        self.liveness = Liveness(segment.buf, n, layout.heartbeat_cell(0), layout.status_cell(0), _READY)

    # ---- lifetime -------------------------------------------------------------------
    @classmethod
    def create(cls, num_ranks: int, num_dispatchers: int = 1, launch_id: str = "board",
               kind: str = "board") -> "LoadBoard":
        check_memory_order()
        if not 1 <= num_ranks <= 4096:
            raise ValueError(f"num_ranks must be in [1, 4096], got {num_ranks}")
        if not 1 <= num_dispatchers <= 256:
            raise ValueError(f"num_dispatchers must be in [1, 256], got {num_dispatchers}")
        layout = BoardLayout(num_ranks, num_dispatchers)
        seg = SharedSegment.create(segment_name(kind, launch_id), layout.num_cells * 8)
        header = np.frombuffer(seg.buf, dtype=np.int64, count=HEADER_LEN)
        header[:] = [MAGIC, LAYOUT_VERSION, num_ranks, num_dispatchers, layout.row_len,
                     layout.disp_off, layout.disp_len, os.getpid()]
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
        self._mv.release()
        del self._cells, self._rows, self._disp, self._heartbeats, self._statuses
        del self._base_reqs_np, self._disp_reqs_np, self._base_seq_np
        self.segment.__exit__(None, None, None) if self.segment.is_owner else self.segment.close()

    def __enter__(self) -> "LoadBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- single-writer handles --------------------------------------------------------
    def rank_writer(self, rank: int) -> "RankWriter":
        from shm.board_writers import RankWriter
        self._check_rank(rank)
        return RankWriter(self, rank)

    def dispatcher_writer(self, dispatcher: int) -> "DispatcherWriter":
        from shm.board_writers import DispatcherWriter
        if not 0 <= dispatcher < self.num_dispatchers:
            raise ValueError(f"dispatcher {dispatcher} out of range [0, {self.num_dispatchers})")
        return DispatcherWriter(self, dispatcher)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} out of range [0, {self.num_ranks})")

    # ---- readers ----------------------------------------------------------------------
    def snapshot(self) -> BoardSnapshot:
        """Every row, each consistent under its seqlock, then the dispatched counters."""
        rows = np.empty_like(self._rows)
        for r in range(self.num_ranks):
            src = self._rows[r]
            while True:
                seq = int(src[SEQ])
                if seq < 0:
                    sched_yield()  # the writer is mid-publish, maybe preempted
                    continue
                rows[r] = src
                if int(src[SEQ]) == seq:
                    break
        disp = self._disp.copy()  # after the rows: acked never exceeds dispatched
        d = self.num_dispatchers
        return BoardSnapshot(
            num_reqs=rows[:, NUM_REQS], num_waiting_reqs=rows[:, NUM_WAITING],
            num_tokens=rows[:, NUM_TOKENS], num_prefill_tokens=rows[:, NUM_PREFILL],
            max_total_num_tokens=rows[:, MAX_TOTAL_TOKENS],
            max_running_requests=rows[:, MAX_RUNNING], heartbeat_ns=self._heartbeats.copy(),
            status=self._statuses.copy(), pid=rows[:, PID],
            acked_reqs=rows[:, ACKED:ACKED + d], acked_tokens=rows[:, ACKED + d:ACKED + 2 * d],
            dispatched_reqs=disp[:, 0, :], dispatched_tokens=disp[:, 1, :],
        )

    def snapshot_seqs(self):
        """Every row's seqlock counter (a copy): each publish adds 2, so the growth of the
        sum counts the publishes, which benchmarks use to measure a writer's rate."""
        return self._rows[:, SEQ].copy()

    def read_effective(self, stale_ns: int, now_ns: int | None = None, with_tokens: bool = True):
        """Hot path: (eff_reqs, eff_tokens, alive) as three lists, one entry per rank.

        ``with_tokens=False`` skips the token sums (``eff_tokens`` is then None) for
        methods that balance by requests only.

        ``alive`` comes from ``self.liveness`` (see ``shm.board_liveness``); when every
        rank is alive it is one shared tuple of True: callers must not mutate it.

        The rows come from ``read_bases`` (seqlocked), the dispatched counters from one
        unpack after them: rows before the dispatcher blocks, so acks are read before
        dispatches (see the module docstring). Why struct and not numpy: a C call per
        block, where each numpy call costs about 1 us on these machines.
        """
        base_reqs, base_toks = self.read_bases()
        disp = self._disp_unpack(self._buf, self._disp_off_bytes)
        n = self.num_ranks
        # A chain of lazy map(add), one link per dispatcher, sums at C speed.
        reqs, toks = base_reqs, base_toks
        for o in range(0, len(disp), 2 * n):
            reqs = map(add, reqs, disp[o:o + n])
            toks = map(add, toks, disp[o + n:o + 2 * n])
        reqs, toks = list(reqs), (list(toks) if with_tokens else None)
        return reqs, toks, self.liveness.check(stale_ns, now_ns)

    def read_bases(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(base_reqs, base_toks) of every row, each row read under its seqlock: what a
        board's only dispatcher needs besides its own counters and liveness."""
        cells, n3 = self._seqlocked_cells(self._rows_unpack, 3), self._n3
        return cells[1:n3:3], cells[2:n3:3]

    def _seqlocked_cells(self, unpack, width: int) -> tuple[int, ...]:
        """``unpack``'s ``width`` leading cells of every row (seq first), once no row was
        mid-write and every seq stayed the same across the read."""
        buf, unpack_seqs, off, end = self._buf, self._seq_unpack, self._hot_off, width * self.num_ranks
        tries = 0
        while True:
            cells = unpack(buf, off)
            seqs = cells[0:end:width]
            if min(seqs) >= 0 and seqs == unpack_seqs(buf, off):
                return cells
            tries += 1
            if tries & 7 == 0:
                # A writer preempted mid-publish holds its row negative until it runs
                # again: give up the core rather than spin through its time slice.
                sched_yield()

    def dispatched_totals(self) -> tuple[list[int], list[int]]:
        """(dispatched_reqs, dispatched_tokens) per rank, summed over every dispatcher.
        Read after the rows, so that acks are read before dispatches."""
        disp = self._disp_unpack(self._buf, self._disp_off_bytes)
        n = self.num_ranks
        reqs, toks = [0] * n, [0] * n
        for o in range(0, len(disp), 2 * n):
            reqs = list(map(add, reqs, disp[o:o + n]))
            toks = list(map(add, toks, disp[o + n:o + 2 * n]))
        return reqs, toks

    def read_prefill_bases(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(base_reqs, base_toks, base_pfill) of every row, each row read under its
        seqlock (``read_bases`` with the prefill column)."""
        cells, n4 = self._seqlocked_cells(self._rows4_unpack, 4), 4 * self.num_ranks
        return cells[1:n4:4], cells[2:n4:4], cells[3:n4:4]

    def read_requests(self, stale_ns: int, own_counts: list[int] | None = None):
        """Hot path of the request-count methods: (eff_reqs, alive), no seqlock.

        Every value used is ONE cell with one writer (``base_reqs`` already nets the
        rank's acks out of its count), and an aligned 8-byte load is atomic on the
        CPUs ``check_memory_order`` admits, so each read is a value some publish
        wrote: the seqlock is for values that must agree across cells, which these
        methods never combine. ``own_counts``: on a one-dispatcher board, that
        dispatcher's own ``dispatched_reqs`` (it is their only writer, so its copy is
        exact and saves reading them back).
        """
        base = self._req_unpack(self._buf, self._hot_off)
        if own_counts is not None and self.num_dispatchers == 1:
            reqs = list(map(add, base, own_counts))
        else:
            disp = self._disp_unpack(self._buf, self._disp_off_bytes)  # after the rows
            n = self.num_ranks
            reqs = base
            for o in range(0, len(disp), 2 * n):
                reqs = map(add, reqs, disp[o:o + n])
            reqs = list(reqs)
        return reqs, self.liveness.check(stale_ns)

    def base_requests_reader(self):
        """A no-argument callable returning every rank's ``base_reqs`` cell (a tuple):
        the one read a single dispatcher's ``total_requests`` needs besides liveness,
        since it knows its own ``dispatched_reqs`` (see ``read_requests``)."""
        return partial(self._req_unpack, self._buf, self._hot_off)

    def effective_requests_np(self) -> np.ndarray:
        """Effective requests per rank as one numpy array (a new one), no seqlock and no
        liveness: ``read_requests``'s reasoning, for boards where numpy is faster."""
        disp = self._disp_reqs_np
        if len(disp) == 1:
            return self._base_reqs_np + disp[0]
        eff = self._base_reqs_np.copy()  # the rows first: acks before dispatches
        for counts in disp:
            eff += counts
        return eff

    def effective_np(self) -> tuple[np.ndarray, np.ndarray]:
        """(eff_reqs, eff_tokens) as numpy arrays, every row read under its seqlock:
        ``read_effective``'s loads for boards where numpy is the faster read."""
        snap, disp = self._seqlocked_np(BASE_TOKENS + 1)
        return snap[:, BASE_REQS] + disp[0], snap[:, BASE_TOKENS] + disp[1]

    def effective_prefill_np(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(eff_reqs, eff_tokens, eff_prefill_tokens) as numpy arrays, every row read
        under its seqlock (``effective_np`` with the prefill column)."""
        snap, disp = self._seqlocked_np(BASE_PREFILL + 1)
        return (snap[:, BASE_REQS] + disp[0], snap[:, BASE_TOKENS] + disp[1],
                snap[:, BASE_PREFILL] + disp[1])

    def _seqlocked_np(self, num_cols: int) -> tuple[np.ndarray, np.ndarray]:
        """A copy of every row's first ``num_cols`` cells, each row under its seqlock,
        then the dispatched counters summed over dispatchers ([kind, rank])."""
        rows, seq_col = self._rows, self._base_seq_np
        tries = 0
        while True:
            snap = rows[:, :num_cols].copy()
            seq = snap[:, SEQ]
            # Committed (none negative) and unchanged since (a second read, bytewise).
            if seq[seq.argmin()] >= 0 and seq.tobytes() == seq_col.tobytes():
                break
            tries += 1
            if tries & 7 == 0:
                sched_yield()
        disp = self._disp[0] if self.num_dispatchers == 1 else self._disp.sum(axis=0)  # after the rows
        return snap, disp

    def read_effective_np(self, stale_ns: int, now_ns: int | None = None):
        """Vectorised ``read_effective``: three numpy arrays."""
        reqs, tokens = self.effective_np()
        return reqs, tokens, np.array(self.liveness.check(stale_ns, now_ns), dtype=bool)
