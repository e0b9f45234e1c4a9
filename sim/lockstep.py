"""Lockstep for simulated ranks: every rank's step lasts as long as the slowest rank's.

With DP attention and expert parallelism (the servers of the published SGLang runs in ``docs/results.md``), the MoE layers'
all-to-all joins all ranks in every forward pass, so a rank with a light batch waits
for the heaviest one, and ranks with nothing to do run an idle batch to take part.
``--sim-lockstep`` reproduces that with one shared-memory segment (int64 cells)::

    cell 0                       HEADER_LEN
    +-------+---------+-----------+---------+-----------+-----+
    | magic | version | num_ranks | row_len | owner_pid | pad |
    +-------+---------+-----------+---------+-----------+-----+
    rank r's row at HEADER_LEN + r * ROW_LEN (128 B):
    +--------+-----+------+----------------+-------------+-------------+-----+
    | joined | pid | step | arrival_ns[2]  | cost_ns[2]  | busy[2]     | pad |
    +--------+-----+------+----------------+-------------+-------------+-----+

Who writes what: the header, the creator (the launcher) once; row r, rank r only
(single writer per cell). ``arrival/cost/busy[k % 2]`` describe rank r's step k and are
written before ``step = k``; a reader reads ``step`` first (x86-64 keeps stores and
loads in order, the assumption ``shm.board`` documents too), so seeing ``step >= k``
means step k's cells are there. Two slots suffice: nobody starts step k+2 before
every member reached k+1, so slot k % 2 is not overwritten while anyone reads it.

One step k of rank r (``LockstepMember.step``): publish (arrival, cost, busy), wait
until every member reached k (sleep-polling: first until the step's provisional end,
then 50 us doubling to 1 ms; never spinning), then sleep until

    end(k) = max(arrival of the members with a non-empty batch) + max(cost of all)

which every member computes alike, so all finish step k together. An idle member's
arrival does not count, so a rank that noticed the step a little late (it was
blocked waiting for requests) does not delay the busy ones.

Idle members keep stepping (``wants_idle_steps``) while another member is ahead of
them or any member's last step was busy; the scheduler loop then runs an empty batch
(cost ``base_s``). A member is a rank whose ``joined`` is 1; a member whose process
died (pid gone) is dropped by the others after ``CHECK_DEAD_AFTER_S`` of waiting, and
any wait longer than ``MAX_WAIT_S`` is abandoned with a warning rather than hanging.

Ownership: the launcher creates the segment (``LockstepSegment.create``) before the
ranks start and unlinks it after they stopped; ranks attach (``LockstepMember``).
"""

from __future__ import annotations

import atexit
import logging
import os
import time

import numpy as np

from shm.segment import SharedSegment, ShmLayoutError, pid_alive, segment_name

logger = logging.getLogger(__name__)

MAGIC = 0x4C4F434B53544550  # "LOCKSTEP"
LAYOUT_VERSION = 1
HEADER_LEN = 8
H_MAGIC, H_VERSION, H_NUM_RANKS, H_ROW_LEN, H_OWNER = range(5)
ROW_LEN = 16
JOINED, PID, STEP, ARRIVAL, COST, BUSY = 0, 1, 2, 3, 5, 7  # ARRIVAL/COST/BUSY: 2 slots

MIN_POLL_S = 50e-6
MAX_POLL_S = 1e-3
CHECK_DEAD_AFTER_S = 0.5
MAX_WAIT_S = 30.0


class LockstepSegment:
    """The launcher's handle: creates the segment, unlinks it in ``close``."""

    def __init__(self, segment: SharedSegment):
        self.segment = segment
        self.name = segment.name

    @classmethod
    def create(cls, num_ranks: int, launch_id: str, group: str = "") -> "LockstepSegment":
        """``group`` tells apart several lockstep groups of one launch (PD: the prefill
        ranks step together, the decode ranks together, as two servers would)."""
        kind = f"lockstep-{group}" if group else "lockstep"
        seg = SharedSegment.create(segment_name(kind, launch_id),
                                   8 * (HEADER_LEN + num_ranks * ROW_LEN))
        header = np.frombuffer(seg.buf, dtype=np.int64, count=HEADER_LEN)
        header[[H_VERSION, H_NUM_RANKS, H_ROW_LEN, H_OWNER]] = (
            LAYOUT_VERSION, num_ranks, ROW_LEN, os.getpid())
        header[H_MAGIC] = MAGIC  # last: a reader that sees it sees the rest
        del header
        return cls(seg)

    def close(self) -> None:
        self.segment.__exit__(None, None, None)  # unmap and unlink (owner)


class LockstepMember:
    """Rank ``dp_rank``'s side: join, ``step`` once per forward pass, ``leave``."""

    def __init__(self, segment: SharedSegment, dp_rank: int):
        cells = np.frombuffer(segment.buf, dtype=np.int64)
        if cells[H_MAGIC] != MAGIC or cells[H_VERSION] != LAYOUT_VERSION:
            raise ShmLayoutError(f"{segment.name} is not a lockstep segment of this version")
        num_ranks = int(cells[H_NUM_RANKS])
        if not 0 <= dp_rank < num_ranks:
            raise ValueError(f"dp_rank {dp_rank} out of range for {num_ranks} lockstep ranks")
        self.segment = segment
        self.dp_rank = dp_rank
        self.table = cells[HEADER_LEN:HEADER_LEN + num_ranks * ROW_LEN].reshape(num_ranks, ROW_LEN)
        self.row = self.table[dp_rank]
        self.step_no = 0
        self.excluded: set[tuple[int, int]] = set()  # (rank, pid) found dead
        self._joined = False

    @classmethod
    def attach(cls, name: str, dp_rank: int) -> "LockstepMember":
        member = cls(SharedSegment.attach(name), dp_rank)
        member.join()
        atexit.register(member.leave)
        return member

    # ---- membership ------------------------------------------------------------------
    def join(self) -> None:
        """Enter at the step the members are at (the lowest one), then become a member."""
        others = self._members(include_self=False)
        self.step_no = int(self.table[others, STEP].min()) if others.any() else 0
        self.row[[PID, STEP]] = (os.getpid(), self.step_no)
        self.row[JOINED] = 1
        self._joined = True

    def leave(self) -> None:
        if self._joined:
            self.row[JOINED] = 0
            self._joined = False

    def close(self) -> None:
        self.leave()
        del self.row, self.table
        self.segment.close()

    def _members(self, include_self: bool = True) -> np.ndarray:
        mask = self.table[:, JOINED] == 1
        if not include_self:
            mask[self.dp_rank] = False
        for rank, pid in self.excluded:
            if self.table[rank, PID] == pid:
                mask[rank] = False
        return mask

    # ---- stepping --------------------------------------------------------------------
    @property
    def wants_idle_steps(self) -> bool:
        """True when this rank must run a (possibly empty) step now: a member is ahead
        of it, or some member's last step had a batch."""
        steps = self.table[:, STEP].copy()  # before the slot cells: see the docstring
        members = self._members()
        if (steps[members] > self.step_no).any():
            return True
        at_mine = members & (steps == self.step_no)
        return bool(self.table[at_mine, BUSY + (self.step_no & 1)].any())

    def step(self, cost_s: float, busy: bool, arrival_ns: int | None = None) -> float:
        """Take part in the next step; returns when it ends. ``cost_s``: this rank's own
        step time; ``busy``: whether its batch is non-empty. Returns seconds waited
        beyond this rank's own cost (the lockstep penalty)."""
        k = self.step_no + 1
        slot = k & 1
        arrival = arrival_ns if arrival_ns is not None else time.monotonic_ns()
        self.row[[ARRIVAL + slot, COST + slot, BUSY + slot]] = (
            arrival if busy else 0, int(cost_s * 1e9), int(busy))
        self.row[STEP] = k  # publish last
        self.step_no = k
        end_ns = self._wait_all(k, slot, arrival)
        left = (end_ns - time.monotonic_ns()) / 1e9
        if left > 0:
            time.sleep(left)
        return max(0.0, (end_ns - arrival) / 1e9 - cost_s)

    def _wait_all(self, k: int, slot: int, arrival: int) -> int:
        """Block until every member reached step k; returns the step's end (ns)."""
        poll_s, started = MIN_POLL_S, time.monotonic()
        while True:
            steps = self.table[:, STEP].copy()
            members = self._members()
            arrived = members & (steps >= k)
            starts = self.table[arrived, ARRIVAL + slot]
            start = int(starts.max()) if starts.any() else arrival
            end_ns = start + int(self.table[arrived, COST + slot].max())
            lagging = members & ~arrived
            if not lagging.any():
                return end_ns
            waited = time.monotonic() - started
            if waited > CHECK_DEAD_AFTER_S:
                self._drop_dead(np.flatnonzero(lagging))
            if waited > MAX_WAIT_S:
                logger.warning("lockstep: ranks %s did not reach step %d in %.0f s; going on "
                               "without them", np.flatnonzero(lagging).tolist(), k, MAX_WAIT_S)
                return end_ns
            to_end = (end_ns - time.monotonic_ns()) / 1e9
            if to_end > MAX_POLL_S:
                time.sleep(to_end - MAX_POLL_S / 2)  # nobody can end the step earlier
            else:
                time.sleep(poll_s)
                poll_s = min(2 * poll_s, MAX_POLL_S)

    def _drop_dead(self, ranks) -> None:
        for rank in ranks:
            pid = int(self.table[rank, PID])
            if not pid_alive(pid):
                logger.warning("lockstep: rank %d (pid %d) is gone; stepping without it", rank, pid)
                self.excluded.add((int(rank), pid))
