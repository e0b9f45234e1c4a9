"""Rooms a lost decode rank left behind: release their hand-off entries for it.

With two servers (``--disaggregation-mode prefill`` and ``decode``), a decode rank that
dies takes its parked requests with it. Their prefill halves may be done already (the
KV held in a hand-off entry, ``scheduler.pd_prefill``) or still coming, and nobody
would ever release those entries: the prefill ranks would hold that KV, and refuse to
flush their caches, until ``--disaggregation-bootstrap-timeout`` (300 s by default).
The prefill server cannot tell: it does not know which decode rank a room went to.

The decode server's API process knows: each request's room, prompt and decode rank.
When a rank is lost, ``OrphanedRooms`` takes over that rank's claim cells in the
hand-off table (``shm.bootstrap``: cell ``claim[p][s][d]`` has one writer, decode rank
d, and it is gone) and writes, for each of its requests, the release the rank would
have written had it lived: once the rank's process has exited (never beside it), for
the entry with the request's room and prompt (never another request's), unless
another decode rank claimed it. The prefill rank then frees the KV at its next step.
A room whose prefill has not handed off yet is looked for again every ``POLL_S``
until its hand-off appears or the bootstrap timeout passes (then the prefill rank's
own expiry frees it).

One per decode API process; each releases only its own requests' rooms, so two API
processes never write one cell (a room sent to both is a client error that decode
ranks refuse anyway). Event-loop thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from scheduler.pd import prompt_hash
from shm.bootstrap import BootstrapTable
from shm.bootstrap_layout import FAILED, KV_READY
from shm.segment import pid_alive

logger = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass(slots=True)
class Orphan:
    decode_rank: int
    rank_pid: int  # the lost rank's process: nothing is written while it lives
    prompt_hash: int
    give_up_ns: int  # the bootstrap timeout: past it, prefill's own expiry frees the KV


class OrphanedRooms:
    def __init__(self, handoff: BootstrapTable, timeout_s: float):
        self.handoff = handoff
        self.timeout_ns = int(timeout_s * 1e9)
        self._rooms: dict[int, Orphan] = {}
        self.num_released = 0

    def __len__(self) -> int:
        return len(self._rooms)

    def adopt(self, decode_rank: int, rank_pid: int, room: int, input_ids: list[int],
              now_ns: int | None = None) -> None:
        """Release ``room``'s hand-off for lost decode rank ``decode_rank`` as soon as
        its process (``rank_pid``) has exited and the entry is there."""
        if not 0 <= decode_rank < self.handoff.num_decode_ranks:
            return  # a column this table does not have: nothing can have been claimed
        now = time.monotonic_ns() if now_ns is None else now_ns
        self._rooms[room] = Orphan(decode_rank, rank_pid, prompt_hash(input_ids),
                                   now + self.timeout_ns)

    def poll(self, now_ns: int | None = None) -> int:
        """Release every adopted room whose hand-off is there; forget those released,
        someone else's, or past the timeout. Returns how many were released."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        released = 0
        for room, orphan in list(self._rooms.items()):
            if orphan.rank_pid and pid_alive(orphan.rank_pid):
                continue  # still exiting: its cells may still be written by it
            entry = self.handoff.lookup(room)
            if entry is None:
                if now > orphan.give_up_ns:
                    del self._rooms[room]
                continue
            del self._rooms[room]
            if entry.prompt_hash != orphan.prompt_hash or entry.state not in (KV_READY, FAILED):
                continue  # another request's room (the decode rank would have refused it)
            claimer = self.handoff.decode_claimer(orphan.decode_rank)
            if claimer.claimed_by_other(entry):
                continue  # another decode rank took it: its release frees it
            claimer.release(entry)
            released += 1
            logger.info("bootstrap_room %d: its decode rank %d was lost; released the KV "
                        "prefill rank %d held for it", room, orphan.decode_rank, entry.region)
        self.num_released += released
        return released

    def close(self) -> None:
        self._rooms.clear()
        self.handoff.close()
