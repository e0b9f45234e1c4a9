"""Which ranks a dispatcher may pick: status READY and a heartbeat within ``stale_ns``.

Every pick needs this answer, so it must cost next to nothing when nothing changed,
and still be exact. Two facts of the board make that possible:

- the ``status`` cells are one contiguous column (``shm.board``), so "is every status
  what it was last time" is a single compare of ``8N`` bytes;
- a heartbeat cell only grows: its writer stores CLOCK_MONOTONIC, which is shared by
  all processes of the node and never goes back, also when a rank restarts.

So once a full check found every READY rank fresh, with ``floor`` the oldest of their
heartbeats, the same answer holds for as long as the status bytes are unchanged and
``floor >= now - stale_ns``: each of those heartbeats is at least as new as it was. The
full check (unpack every heartbeat) then runs about once per ``stale_ns``, or when a
status changes. While some READY rank is stale the answer is not cached (that rank may
come back with its next heartbeat), so a degraded board pays the full check per pick.
"""

from __future__ import annotations

import struct
from time import monotonic_ns

_NEVER = 1 << 63  # the floor when no rank is READY: nothing to age out


class Liveness:
    """One reader's cached view of the board's liveness block (not shared, not locked)."""

    def __init__(self, buf, num_ranks: int, heartbeat_cell: int, status_cell: int, ready: int):
        self._buf = buf
        self.num_ranks = num_ranks
        self._hb_off = heartbeat_cell * 8
        self._status_start = status_cell * 8
        self._status_end = self._status_start + 8 * num_ranks
        fmt = struct.Struct(f"<{num_ranks}q")
        self._unpack_hb = fmt.unpack_from
        self._unpack_status = fmt.unpack
        self._ready = ready
        self.all_ready = fmt.pack(*[ready] * num_ranks)  # the status bytes of a healthy board
        self.all_alive = (True,) * num_ranks
        # The cache: the status bytes, the oldest heartbeat among the ranks judged alive,
        # and the answer. ``status_bytes`` None: nothing cached.
        self.status_bytes: bytes | None = None
        self.floor = _NEVER
        self.alive: tuple[bool, ...] = self.all_alive

    def check(self, stale_ns: int, now_ns: int | None = None) -> tuple[bool, ...]:
        """``alive[r]``: rank r is READY and its heartbeat is not older than ``stale_ns``.

        When every rank is alive the result is ``all_alive`` (one shared tuple).
        """
        status = self._buf[self._status_start:self._status_end]
        if now_ns is None:
            now_ns = monotonic_ns()
        oldest = now_ns - stale_ns
        if status == self.status_bytes and self.floor >= oldest:
            return self.alive
        return self.refresh(status, oldest)

    def refresh(self, status: bytes, oldest: int) -> tuple[bool, ...]:
        """The full check: read every heartbeat; cache the answer when it is safe to."""
        ready = self._ready
        statuses = self._unpack_status(status)
        heartbeats = self._unpack_hb(self._buf, self._hb_off)
        floor, stale_ready = _NEVER, False
        alive = []
        for st, hb in zip(statuses, heartbeats):
            if st != ready:
                alive.append(False)
            elif hb >= oldest:
                alive.append(True)
                if hb < floor:
                    floor = hb
            else:
                alive.append(False)
                stale_ready = True
        result = self.all_alive if status == self.all_ready and not stale_ready else tuple(alive)
        if stale_ready:
            self.status_bytes = None  # its next heartbeat may revive it: check every time
        else:
            self.status_bytes, self.floor, self.alive = status, floor, result
        return result
